"""What makes fine-tuning resumable: augmentation and data order that depend only on seed, epoch and index, and
checkpoints in a scratch folder that is not a DVC output.

A checkpoint is SCRATCH/step-<N>/: what accelerate's `save_state` writes (model, optimizer, LR scheduler, gradient
scaler, the RNG states of every process, registered objects such as the EMA weights), a copy of the dvclive folder
(so the loss curve of a resumed run is whole), and `checkpoint.json`, written last: the position (optimizer step,
epoch, batches done in that epoch), the run's fingerprint and the size of every file. It is written under a temporary
name, flushed to disk and renamed, so a checkpoint cut off mid-write is never found; a step-<N> folder whose files do
not match its checkpoint.json is skipped with a log line. Only the newest checkpoint is kept.

A checkpoint resumes only the run that made it: same finetune params (all but `RESUME_SAFE`, which do not change the
numbers), seed, training inputs, accelerate config file, number of processes, device type and mixed precision.
Otherwise `find_resumable` refuses with a one-line UserError naming what differs, rather than starting over: a
checkpoint can hold hours of GPU time, so a person decides (delete the folder, or set the settings back).

accelerate writes the optimizer, scheduler, RNG and EMA states with torch.save and reads them back with pickle; these
files are only ever ones this stage wrote into the project's own git-ignored scratch folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

from stylestudy.core.config import UserError
from stylestudy.core.outputs import MANIFEST, write_json

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

INFO = "checkpoint.json"  # written last: a folder without it (or with other file sizes) is not a checkpoint
LIVE = "dvclive"
# Settings that leave the weights as they are: augmentation is seeded per item, not per worker, and validation draws
# from its own generator.
RESUME_SAFE = ("checkpoint_every", "dataloader_num_workers", "validate_every", "validation_prompt",
               "validation_images", "validation_steps", "memory_budget_gb")
NAME = re.compile(r"step-(\d+)")
# Settings added since checkpoints were first written, at the value every run before them trained with: a checkpoint
# that lacks one was made with it
SINCE_ADDED = {"finetune.lora_half_base": False, "finetune.fused_backward": False, "finetune.weights_dtype": "fp32",
               "finetune.ema_device": "accelerator"}


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps done, the current epoch, and batches of that epoch already used."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class SeededItems:
    """A dataset whose random augmentation depends only on (seed, epoch, index), not on what was drawn before."""

    # Flips and crops drawn from the global RNG would depend on the batches before them and on the worker that loads
    # them; a resumed run skips those batches without loading them, so it would flip other images.
    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        import torch

        key = hashlib.sha256(f"{self.seed}/{self.epoch}/{index}".encode()).digest()
        # The CPU generator alone, which torchvision's transforms draw from: torch.manual_seed would reseed the CUDA
        # generators too, which fork_rng(devices=[]) does not restore, so on a GPU with the items loaded in the main
        # process (dataloader_num_workers: 0) the last item of each batch would seed that batch's noise and timesteps.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int.from_bytes(key[:8], "big"))
            return self.dataset[index]


def epoch_batches(dataloader: Any, epoch: int, skip: int, accelerator: Accelerator) -> Any:
    """The batches of one epoch less the first `skip` (trained on before an interruption), which are not loaded."""
    dataloader.set_epoch(epoch)
    dataloader.dataset.set_epoch(epoch)
    return accelerator.skip_first_batches(dataloader, skip) if skip else dataloader


def inputs_digest(folders: list[Path], rows: list[dict]) -> str:
    """sha256 over the training rows and the input folders: fetch's file hashes, else every file's name and size."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode())
    for folder in folders:
        manifest = folder / MANIFEST
        if manifest.is_file():
            listing: Any = json.loads(manifest.read_text()).get("files", {})
        else:
            listing = [(str(f.relative_to(folder)), f.stat().st_size) for f in sorted(folder.rglob("*")) if f.is_file()]
        digest.update(json.dumps(listing, sort_keys=True).encode())
    return digest.hexdigest()


def fingerprint(p: dict, seed: int, inputs: str, processes: int, device_type: str, precision: str) -> dict:
    """What a checkpoint must share with the current run to be resumed, as a flat dict of named values: the processes,
    device type and mixed precision that run (or will run: the preflight asks before accelerate starts them)."""
    run = {f"finetune.{k}": v for k, v in p.items() if k not in (*RESUME_SAFE, "launch")}
    # Each process's RNG and data shard is in the checkpoint: another process count is refused by its own name.
    run["finetune.launch.config_file"] = p["launch"]["config_file"]
    return run | {"training seed": seed, "training inputs": inputs, "number of processes": processes,
                  "device type": device_type, "mixed precision that ran": precision}


def _step_of(folder: Path) -> int:
    match = NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else -1


def read_complete(folder: Path) -> dict | None:
    """The checkpoint.json of a whole checkpoint; None when it is missing, unreadable, or a listed file differs."""
    try:
        info = json.loads((folder / INFO).read_text())
        files, position = info["files"], Position(**info["position"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return info | {"position": position}


def latest(scratch: Path) -> tuple[Path, dict] | None:
    """The newest whole checkpoint in `scratch` and its info; incomplete ones are skipped with a log line."""
    folders = sorted((f for f in scratch.glob("step-*") if _step_of(f) >= 0), key=_step_of, reverse=True)
    for folder in folders:
        info = read_complete(folder)
        if info is not None:
            return folder, info
        log.warning("ignoring incomplete checkpoint %s", folder)
    return None


def find_resumable(scratch: Path, current: dict) -> tuple[Path, dict] | None:
    """The newest whole checkpoint if one exists; a UserError if it was made by a run with other settings."""
    found = latest(scratch)
    if found is None:
        return None
    folder, info = found
    saved, current = SINCE_ADDED | info["fingerprint"], SINCE_ADDED | current
    differ = sorted(k for k in current.keys() | saved.keys() if current.get(k) != saved.get(k))
    if differ:
        raise UserError(f"{folder} was made with other {', '.join(differ)}; to resume it set them back, "
                        f"to start over delete {scratch}")
    return found


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_to_disk(folder: Path) -> None:
    """fsync every file and folder below `folder`: a machine that dies after the rename must not keep torn files."""
    for path in [*sorted(folder.rglob("*")), folder]:
        _fsync(path)


def save(accelerator: Accelerator, scratch: Path, position: Position, run: dict, live_dir: Path) -> Path:
    """Write a checkpoint whole (every process takes part), then remove the older ones; return its folder."""
    final = scratch / f"step-{position.step:08d}"
    tmp = scratch / f".{final.name}.tmp"  # one name for all processes: they write into the same folder
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if live_dir.is_dir():
            shutil.copytree(live_dir, tmp / LIVE)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        write_json(tmp / INFO, {"position": asdict(position), "fingerprint": run, "files": files})
        _flush_to_disk(tmp)
        tmp.rename(final)
        _fsync(scratch)
        for old in scratch.iterdir():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def restore(accelerator: Accelerator, folder: Path, live_dir: Path) -> None:
    """Load a checkpoint into the prepared objects and put its dvclive history back in `live_dir`."""
    accelerator.load_state(str(folder))
    if accelerator.is_main_process:
        shutil.rmtree(live_dir, ignore_errors=True)
        if (folder / LIVE).is_dir():
            shutil.copytree(folder / LIVE, live_dir)
    accelerator.wait_for_everyone()


def resume(dataloader: Any, ema: Any, found: tuple[Path, dict] | None, live_dir: Path,
           accelerator: Accelerator) -> Position:
    """Load the checkpoint found, if any, and return where training stands."""
    position = Position()
    if found:
        folder, info = found
        restore(accelerator, folder, live_dir)
        position = info["position"]
        log.info("resuming from checkpoint %s at step %d (epoch %d, batch %d)", folder, position.step,
                 position.epoch, position.batch)
        if position.batch >= len(dataloader):
            position = Position(position.step, position.epoch + 1, 0)
    if ema:
        ema.to(accelerator.device)
    return position


def discard(accelerator: Accelerator, scratch: Path) -> None:
    """Remove the scratch folder once the final model is written."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
