"""How finetune runs on one or several processes: the accelerate config that `finetune.launch` names, checked before
`accelerate launch` starts anything, and what the processes of one run do about each other.

The stage command is `python -m stages.finetune ARGS`. Its preflight (`check`) stops with one line on a config file
that is missing or not an accelerate config, more processes than the machine has GPUs, and settings the config cannot
run. One plain process then trains in that same process; anything else (several processes, DeepSpeed, FSDP, a choice
of GPUs) becomes `accelerate launch --config_file CONFIG --num_processes N -m stages.finetune ARGS` in its place
(`relaunch`), whose processes skip the preflight.

Multi-process configs run their processes through torchrun, the CPU one (conf/accelerate/cpu.yaml) included:
accelerate's own MULTI_CPU type starts one process unless mpirun starts the others, so the CPU config is a MULTI_GPU
one whose processes, finding no GPU, join one gloo group over localhost (build.build_accelerator).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn, TYPE_CHECKING

from stylestudy.core.config import OUR_LOGGERS, UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

CPU_CONFIG = "conf/accelerate/cpu.yaml"
# Settings that FULL_SHARD processes cannot run: outside a forward pass each holds only its shard of the weights.
FSDP_REFUSES = {
    "optimizer": ("adamw8bit", "bitsandbytes' 8-bit AdamW does not support FSDP's sharded parameters; "
                  "set finetune.optimizer=adamw_fused or adamw"),
    "use_ema": (True, "the EMA copy here is not sharded (it would keep the whole UNet on every process); "
                "set finetune.use_ema=false, or use conf/accelerate/deepspeed_zero2.yaml, which keeps EMA"),
    "method": ("lora", "a LoRA adapter is small enough to copy to every GPU: use conf/accelerate/ddp.yaml"),
}


def read_config(path: Path) -> Any:
    """The accelerate config at `path`, read by accelerate's own loader; one line when it is missing or not one."""
    hint = f"set finetune.launch.config_file to one of conf/accelerate/*.yaml (now {path})"
    if not path.is_file():
        raise UserError(f"{path}: no such accelerate config file; {hint}")
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file  # imports torch: after the cheap check

    try:
        return load_config_from_file(str(path))
    except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError, KeyError) as error:
        mark = getattr(error, "problem_mark", None)  # a YAML syntax error: where and what
        first = (str(error).splitlines() or [type(error).__name__])[0]
        reason = f"line {mark.line + 1}: {error.problem}" if mark else first
        raise UserError(f"{path}: not a readable accelerate config ({reason}); {hint}") from None


def cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_processes(config: Any, path: Path, n: int, gpus: int) -> None:
    """More processes than this machine can run with `config` (n in all, spread over its num_machines): one line,
    with the remedy."""
    kind, machines = str(config.distributed_type).split(".")[-1], config.num_machines or 1
    if kind == "NO" and n > 1:
        raise UserError(f"params.yaml: finetune.launch.num_processes is {n} but {path} runs one process; set it to 1, "
                        "or use conf/accelerate/ddp.yaml for several GPUs")
    if n % machines:
        raise UserError(f"params.yaml: finetune.launch.num_processes is {n}, not a multiple of the {machines} machines "
                        f"of {path}; set it to the same number of processes on every machine, in all")
    here, each = n // machines, f" ({n // machines} on each of {machines} machines)" if machines > 1 else ""
    if gpus and here > gpus:
        raise UserError(f"params.yaml: finetune.launch.num_processes is {n}{each} but this machine has {gpus} CUDA "
                        f"GPU(s), one per process; set finetune.launch.num_processes={gpus * machines} or lower")
    if not gpus and n > 1 and not config.use_cpu:
        raise UserError(f"params.yaml: finetune.launch.num_processes is {n} but this machine has no CUDA GPU for "
                        f"{path}; set it to 1, or run CPU processes with finetune.launch.config_file={CPU_CONFIG}")


def check_settings(config: Any, path: Path, p: dict) -> None:
    """finetune settings that the config's way of sharding cannot run: one line, with the remedy."""
    import importlib.util

    kind = str(config.distributed_type).split(".")[-1]
    if kind == "FSDP":
        for key, (value, why) in FSDP_REFUSES.items():
            if p[key] == value:
                shown = str(value).lower()  # as -S writes it
                raise UserError(f"params.yaml: finetune.{key}={shown} cannot run under {path} (FSDP): {why}")
        if p["validate_every"]:
            raise UserError(f"params.yaml: finetune.validate_every cannot run under {path} (FSDP): validation runs on "
                            "one process, and a forward pass needs them all; set finetune.validate_every=0")
    if kind == "DEEPSPEED":
        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(f"{path} needs DeepSpeed, which is not installed: pip install deepspeed")
        clipping = (config.deepspeed_config or {}).get("gradient_clipping", 1.0)  # accelerate fills 1.0 for auto
        if clipping != p["max_grad_norm"]:
            raise UserError(f"{path}: DeepSpeed clips gradients at {clipping} (deepspeed_config.gradient_clipping), "
                            f"finetune.max_grad_norm is {p['max_grad_norm']}; make them equal")


def check(p: dict) -> Any:
    """Everything `accelerate launch` would need, checked before it starts: the config, the process count, the
    settings. Returns the config."""
    path, n = Path(p["launch"]["config_file"]), p["launch"]["num_processes"]
    config = read_config(path)
    check_processes(config, path, n, cuda_devices())
    check_settings(config, path, p)
    return config


def started_by_launcher() -> bool:
    """Whether `accelerate launch` started this process: each of its launchers passes the mixed precision on."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ


def needs_launcher(config: Any, n: int) -> bool:
    """Whether the run needs `accelerate launch`: not for one process that neither shards nor picks GPUs nor
    compiles through accelerate, which trains in the stage's own process (launching it would only start Python and
    import torch a second time, some 5 s)."""
    kind = str(config.distributed_type).split(".")[-1]
    return n > 1 or kind not in ("NO", "MULTI_GPU") or config.gpu_ids not in (None, "all") or bool(config.dynamo_config)


def relaunch(p: dict, args: list[str]) -> NoReturn:
    """Replace this process by `accelerate launch` of stages.finetune with `args`: DVC, a kill and the exit code see
    the launcher as they saw the stage."""
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
               p["launch"]["config_file"], "--num_processes", str(p["launch"]["num_processes"]),
               "-m", "stages.finetune", *args]
    log.info("starting %d process(es): accelerate launch %s", p["launch"]["num_processes"], " ".join(command[4:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


def check_launched(accelerator: Accelerator, p: dict) -> None:
    """The processes that really started are the ones params.yaml says, or `dvc exp show` would show other numbers."""
    n = p["launch"]["num_processes"]
    if accelerator.num_processes != n:
        raise UserError(f"params.yaml: finetune.launch.num_processes is {n} but {accelerator.num_processes} "
                        "processes were launched; set it to the total number of processes (all machines)")


def effective_batch(p: dict, accelerator: Accelerator) -> int:
    """Images per optimizer step, all processes together."""
    return p["train_batch_size"] * accelerator.num_processes * p["gradient_accumulation_steps"]


def device_type() -> str:
    """The device type the processes will train on: CUDA when there is a GPU (accelerate's choice), else CPU."""
    return "cuda" if cuda_devices() else "cpu"


def die_with_launcher() -> None:
    """Under torchrun each process runs in a session of its own: a launcher killed with SIGKILL would leave them
    training and writing outputs. Linux kills this process when its parent, the launcher, dies."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the request; the rendezvous would fail anyway
        os.kill(os.getpid(), signal.SIGKILL)


def log_epoch_items(accelerator: Accelerator, epoch: int, indices: list[int], n_items: int) -> None:
    """One line per epoch, from the main process: the items each process trained on in this run and how many distinct
    items they make. Disjoint shards cover each item once; the even shards that accelerate cuts repeat the first few
    items when the data does not divide into whole batches on every process."""
    from accelerate.utils import gather_object

    per_process = gather_object([indices])  # every process takes part
    if accelerator.is_main_process:
        counts = " + ".join(str(len(shard)) for shard in per_process)
        log.info("epoch %d: %d process(es) trained on %s items, %d distinct of %d", epoch, len(per_process), counts,
                 len(set().union(*per_process)), n_items)


def quiet_unless_main(accelerator: Accelerator) -> None:
    """Our log lines and the libraries' loading bars from the main process only: the others would repeat each one
    (their warnings still show)."""
    if accelerator.is_main_process:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
