"""finetune on 2 CPU processes (gloo over localhost), through dvc.yaml's own command (the preflight, then the stage
becomes `accelerate launch`), on a fresh copy of the repository in the smoke setting, shrunk to 64 training images.

With 4 images a batch on each of 2 processes and gradient accumulation 2, docs/scaling-out.md says: an effective
batch of 16, 64 / (4 x 2) = 8 batches per process per epoch, 4 optimizer steps per epoch, 8 in 2 epochs, and an LR
schedule counted in optimizer steps. The runs must show exactly that, each process on its own half of every epoch,
one process writing the outputs and the log, the same model twice, and after a SIGKILL of the launcher a rerun that
resumes and ends bitwise equal to the uninterrupted run. A checkpoint made with 1 process is refused, with one line.
Bad launch settings are refused by the preflight with one line each, before accelerate starts anything.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import GIT_IDENTITY, composed, fresh_copy, sh

from stylestudy.train import launch
from stylestudy.core.config import UserError, compose_params

IMAGES, BATCH, PROCESSES, ACCUMULATION, EPOCHS, WARMUP = 64, 4, 2, 2, 2, 2
SETTINGS = ["profile=smoke", f"fetch.data.n_images={IMAGES}", "split.fractions.train=1.0", "split.fractions.val=0.0",
            "split.fractions.test=0.0", f"finetune.train_batch_size={BATCH}",
            f"finetune.gradient_accumulation_steps={ACCUMULATION}", f"finetune.epochs={EPOCHS}",
            "finetune.checkpoint_every=2", "finetune.validate_every=0", "finetune.lr_scheduler=linear",
            f"finetune.lr_warmup_steps={WARMUP}"]
# docs/scaling-out.md: batches of one process in an epoch, optimizer steps per epoch, in all
BATCHES = math.ceil(IMAGES / (BATCH * PROCESSES))
STEPS_PER_EPOCH = math.ceil(BATCHES / ACCUMULATION)
STEPS = EPOCHS * STEPS_PER_EPOCH
# One thread per process (two processes share two cores); CPU processes even where a GPU is present.
ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
SCRATCH, OUT, CURVES = "scratch/finetune", "models/finetuned", "reports/finetune/plots/metrics"
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "conf/accelerate"


def use(root: Path, processes: int) -> None:
    compose_params(root / "params.yaml", root, [*SETTINGS, f"finetune.launch.num_processes={processes}"])


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh copy with every stage before finetune already run."""
    root = fresh_copy(tmp_path_factory.mktemp("multiprocess"))
    use(root, PROCESSES)
    sh(root, "dvc", "repro", "fetch@sd", "fetch@guide", "encode", env=ENV)
    return root


def finetune(root: Path, check: bool = True) -> str:
    """dvc.yaml's finetune command, run by `dvc repro` even if DVC has run it before; what it printed."""
    return sh(root, "dvc", "repro", "--force", "--single-item", "finetune", env=ENV, check=check)


def start(root: Path) -> subprocess.Popen:
    env = os.environ | GIT_IDENTITY | ENV | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with (root / "killed.log").open("a") as log:
        return subprocess.Popen(["dvc", "repro", "--force", "--single-item", "finetune"], cwd=root, env=env,
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)


def logged_steps(root: Path) -> int:
    try:
        return len((root / CURVES / "loss.tsv").read_text().splitlines()) - 1
    except OSError:
        return 0


def wait_for_checkpoint(root: Path, proc: subprocess.Popen, step: int):
    """The stage's process and the processes that train, once checkpoint `step` is written and a later step logged:
    the launcher it became and the launcher's processes, or (one plain process) the stage's process alone."""
    import psutil

    deadline = time.monotonic() + 300
    while not ((root / SCRATCH / f"step-{step:08d}").is_dir() and logged_steps(root) > step):
        assert proc.poll() is None, "finetune ended before it was killed:\n" + (root / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)
    stage = next(p for p in psutil.Process(proc.pid).children(recursive=True) if "stages.finetune" in p.cmdline())
    launched = "launch" in stage.cmdline() and any("accelerate" in a for a in stage.cmdline())
    return stage, stage.children(recursive=True) if launched else [stage]


def kill(root: Path, proc: subprocess.Popen, launcher, processes: list, launcher_only: bool) -> None:
    """SIGKILL the launcher alone (torchrun starts its processes in sessions of their own) or the whole `dvc repro`
    session; the processes must not survive it, and nothing may look finished."""
    import psutil

    if launcher_only:
        launcher.send_signal(signal.SIGKILL)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(processes, timeout=30)
    assert not alive, f"processes outlived their launcher: {alive}"
    proc.wait(timeout=60)
    assert not (root / OUT).exists()


def snapshot(root: Path) -> dict:
    """Every file of the model folder, and the logged curves, as bytes."""
    files = {str(f.relative_to(root)): f.read_bytes() for f in sorted((root / OUT).rglob("*")) if f.is_file()}
    return files | {f"{CURVES}/{c}.tsv": (root / CURVES / f"{c}.tsv").read_bytes() for c in ("loss", "lr", "grad_norm")}


def lines(printed: str, text: str) -> list[str]:
    return [line for line in printed.splitlines() if text in line]


@pytest.mark.slow
def test_checkpoint_of_one_process_is_refused_by_two(repo):
    use(repo, 1)
    proc = start(repo)
    launcher, processes = wait_for_checkpoint(repo, proc, 2)
    assert processes == [launcher] and "launch" not in launcher.cmdline()  # one plain process: no accelerate launch
    kill(repo, proc, launcher, processes, launcher_only=False)

    use(repo, PROCESSES)
    printed = finetune(repo, check=False)
    expected = (f"error: {SCRATCH}/step-00000002 was made with other number of processes; to resume it set them back, "
                f"to start over delete {SCRATCH}")
    assert lines(printed, "error: ") == [expected], printed[-3000:]
    # by the preflight: its exit code 2 stops the command before accelerate launch, whose processes would log
    assert "exited with 2" in printed and not re.search(r"^\d\d:\d\d:\d\d ", printed, re.MULTILINE), printed
    assert "Traceback" not in printed
    assert (repo / SCRATCH / "step-00000002/checkpoint.json").is_file()
    shutil.rmtree(repo / SCRATCH)


@pytest.fixture(scope="module")
def resumed(repo) -> tuple[dict, str]:
    """Killed with SIGKILL of the launcher at step 3 (checkpoint 2: epoch 0, batch 4), then run again."""
    use(repo, PROCESSES)
    shutil.rmtree(repo / SCRATCH, ignore_errors=True)
    proc = start(repo)
    launcher, processes = wait_for_checkpoint(repo, proc, 2)
    assert len(processes) == PROCESSES and "launch" in launcher.cmdline()
    kill(repo, proc, launcher, processes, launcher_only=True)
    printed = finetune(repo)
    return snapshot(repo), printed


@pytest.fixture(scope="module")
def uninterrupted(repo, resumed) -> tuple[dict, str]:
    shutil.rmtree(repo / SCRATCH, ignore_errors=True)
    printed = finetune(repo)
    return snapshot(repo), printed


@pytest.mark.slow
def test_killed_launcher_resumes_to_the_same_weights(resumed, uninterrupted):
    files, printed = resumed
    assert f"resuming from checkpoint {SCRATCH}/step-00000002 at step 2 (epoch 0, batch 4)" in printed
    assert files.keys() == uninterrupted[0].keys()
    assert [name for name in files if files[name] != uninterrupted[0][name]] == []


@pytest.mark.slow
def test_each_process_trains_on_its_own_half_of_every_epoch(uninterrupted):
    printed = uninterrupted[1]
    half = BATCHES * BATCH  # 32 + 32 items and 64 distinct: no item trained on by both processes, none left out
    assert len(lines(printed, "stylestudy.train.launch: epoch ")) == EPOCHS
    for epoch in range(EPOCHS):
        assert len(lines(printed, f"stylestudy.train.launch: epoch {epoch}: {PROCESSES} process(es) trained on {half} + {half} "
                                  f"items, {IMAGES} distinct of {IMAGES}")) == 1, printed[-3000:]


@pytest.mark.slow
def test_effective_batch_and_steps_are_the_readmes(repo, uninterrupted):
    files, printed = uninterrupted
    effective = BATCH * PROCESSES * ACCUMULATION
    assert len(lines(printed, f"{PROCESSES} process(es) on cpu, mixed precision bf16; effective batch {effective} "
                              f"(train_batch_size x processes x gradient_accumulation_steps), {STEPS_PER_EPOCH} "
                              f"optimizer steps per epoch, {STEPS} in all")) == 1, printed[-3000:]
    info = json.loads(files[f"{OUT}/training_info.json"])
    assert (info["num_processes"], info["distributed_type"], info["effective_batch_size"], info["steps"]) == (
        PROCESSES, "MULTI_CPU", effective, STEPS)
    # linear schedule, warmup and decay counted in optimizer steps: lr after step k of STEPS
    base = yaml.safe_load((repo / "params.yaml").read_text())["finetune"]["learning_rate"]
    rows = [line.split("\t") for line in files[f"{CURVES}/lr.tsv"].decode().splitlines()[1:]]
    expected = [base * (k / WARMUP if k < WARMUP else (STEPS - k) / (STEPS - WARMUP)) for k in range(1, STEPS + 1)]
    assert [int(step) for step, _ in rows] == list(range(STEPS))
    assert [float(lr) for _, lr in rows] == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.slow
def test_one_process_writes_the_outputs_and_the_log(repo, uninterrupted):
    files, printed = uninterrupted
    for once in (f"__main__: wrote {OUT} and reports/finetune", "__main__: finetune (full) on",
                 "mixed_precision fp16 runs as bf16"):
        assert len(lines(printed, once)) == 1, once
    losses = files[f"{CURVES}/loss.tsv"].decode().splitlines()
    assert len(losses) == 1 + STEPS  # one writer, one row a step
    # dvclive's summary is the last step's: a Live on another process would have written its own (empty) one
    summary = json.loads((repo / "reports/finetune/metrics.json").read_text())
    assert (summary["step"], summary["loss"]) == (STEPS - 1, float(losses[-1].split("\t")[1]))
    assert json.loads((repo / "reports/finetune/timing.json").read_text())["resumed_from_step"] is None
    assert not list((repo / "models").glob(".finetuned.tmp*")) and not (repo / SCRATCH).exists()


@pytest.mark.slow
def test_the_same_model_twice(repo, uninterrupted):
    finetune(repo)
    assert snapshot(repo) == uninterrupted[0]


# ------------------------------------------------------------------------------- bad launch settings: one line each


def preflight(tmp_path: Path, **launch_settings) -> subprocess.CompletedProcess:
    """`python -m stages.finetune --preflight` in an empty folder with the smoke params and `launch_settings`."""
    params = composed("profile=smoke")
    params["finetune"]["launch"] |= launch_settings
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(CONFIGS, tmp_path / "conf/accelerate")
    env = os.environ | ENV | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.finetune", "--preflight", "sd", "guide", "raw", "split",
                           "latents", "out", "live", "scratch"], cwd=tmp_path, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("settings, message", [
    ({"config_file": "conf/accelerate/missing.yaml"},
     "error: conf/accelerate/missing.yaml: no such accelerate config file; set finetune.launch.config_file to one of "
     "conf/accelerate/*.yaml (now conf/accelerate/missing.yaml)"),
    ({"config_file": "conf/accelerate/ddp.yaml", "num_processes": 2},
     "error: params.yaml: finetune.launch.num_processes is 2 but this machine has no CUDA GPU for "
     "conf/accelerate/ddp.yaml; set it to 1, or run CPU processes with "
     "finetune.launch.config_file=conf/accelerate/cpu.yaml"),
])
def test_bad_launch_settings_stop_with_one_line(tmp_path, settings, message):
    result = preflight(tmp_path, **settings)
    assert (result.returncode, result.stderr.strip()) == (2, message)


def config(name: str):
    return launch.read_config(CONFIGS / name)


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(UserError, match=r"num_processes is 4 but this machine has 2 CUDA GPU\(s\), one per process; "
                                        r"set finetune\.launch\.num_processes=2 or lower"):
        launch.check_processes(config("ddp.yaml"), Path("ddp.yaml"), 4, 2)
    launch.check_processes(config("ddp.yaml"), Path("ddp.yaml"), 2, 2)
    launch.check_processes(config("cpu.yaml"), Path("cpu.yaml"), 3, 0)  # CPU processes: any number
    with pytest.raises(UserError, match=r"one_gpu\.yaml runs one process; set it to 1"):
        launch.check_processes(config("one_gpu.yaml"), Path("one_gpu.yaml"), 2, 2)


def test_only_what_one_plain_process_cannot_do_is_launched(tmp_path):
    assert not launch.needs_launcher(config("one_gpu.yaml"), 1)
    assert not launch.needs_launcher(config("cpu.yaml"), 1)
    assert launch.needs_launcher(config("cpu.yaml"), 2)
    assert launch.needs_launcher(config("ddp.yaml"), 2)
    assert launch.needs_launcher(config("fsdp.yaml"), 1)  # sharding, even on one GPU (e.g. to offload)
    assert launch.needs_launcher(config("deepspeed_zero2.yaml"), 1)
    chosen = tmp_path / "gpu_1.yaml"
    chosen.write_text((CONFIGS / "one_gpu.yaml").read_text() + "gpu_ids: '1'\n")
    assert launch.needs_launcher(launch.read_config(chosen), 1)  # the launcher sets CUDA_VISIBLE_DEVICES


def test_processes_of_several_machines_are_counted_per_machine(tmp_path):
    """A config naming 2 machines (README: several machines): num_processes counts them all, the GPUs are this one's."""
    two = tmp_path / "ddp_2_machines.yaml"
    settings = yaml.safe_load((CONFIGS / "ddp.yaml").read_text())
    two.write_text(yaml.safe_dump(settings | {"num_machines": 2, "main_process_ip": "10.0.0.1",
                                              "main_process_port": 29500, "machine_rank": 0}))
    launch.check_processes(launch.read_config(two), two, 8, 4)
    with pytest.raises(UserError, match=r"is 8 \(4 on each of 2 machines\) but this machine has 2 CUDA GPU\(s\), "
                                        r"one per process; set finetune\.launch\.num_processes=4 or lower"):
        launch.check_processes(launch.read_config(two), two, 8, 2)
    with pytest.raises(UserError, match=r"is 5, not a multiple of the 2 machines"):
        launch.check_processes(launch.read_config(two), two, 5, 4)


def test_settings_a_config_cannot_run_are_refused():
    import importlib.util

    p = composed("profile=smoke")["finetune"]
    with pytest.raises(UserError, match=r"^params\.yaml: finetune\.optimizer=adamw8bit cannot run under fsdp\.yaml "
                                        r"\(FSDP\): bitsandbytes' 8-bit AdamW does not support"):
        launch.check_settings(config("fsdp.yaml"), Path("fsdp.yaml"), p)
    with pytest.raises(UserError, match=r"finetune\.use_ema=true cannot run under"):
        launch.check_settings(config("fsdp.yaml"), Path("fsdp.yaml"), p | {"optimizer": "adamw_fused"})
    sharded = p | {"optimizer": "adamw_fused", "use_ema": False}
    with pytest.raises(UserError, match=r"finetune\.validate_every cannot run under fsdp\.yaml \(FSDP\)"):
        launch.check_settings(config("fsdp.yaml"), Path("fsdp.yaml"), sharded)
    launch.check_settings(config("fsdp.yaml"), Path("fsdp.yaml"), sharded | {"validate_every": 0})
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(UserError, match=r"needs DeepSpeed, which is not installed: pip install deepspeed$"):
            launch.check_settings(config("deepspeed_zero2.yaml"), Path("deepspeed_zero2.yaml"), p)


@pytest.mark.parametrize("text, reason", [("distributed_type: MULTI_GPU\nnum_gpus: 2\n", "num_gpus"),
                                          ("distributed_type: [MULTI_GPU\n", "expected"), ("- MULTI_GPU\n", "")])
def test_a_file_that_is_no_accelerate_config_is_refused(tmp_path, text, reason):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UserError, match=rf"bad\.yaml: not a readable accelerate config \(.*{reason}.*\); set "
                                        r"finetune\.launch\.config_file"):
        launch.read_config(tmp_path / "bad.yaml")


def test_every_shipped_config_is_one_accelerate_reads():
    names = {path.name for path in CONFIGS.glob("*.yaml")}
    assert names == {"one_gpu.yaml", "ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "cpu.yaml"}
    assert {name: str(config(name).distributed_type).split(".")[-1] for name in names} == {
        "one_gpu.yaml": "NO", "ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed_zero2.yaml": "DEEPSPEED",
        "cpu.yaml": "MULTI_GPU"}
