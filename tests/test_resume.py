"""finetune survives a SIGKILL: a rerun resumes from the newest whole checkpoint and ends with the very same UNet.

The smoke setting on tiny in-process inputs, with an odd number of batches per epoch and gradient accumulation, so
that resuming crosses an epoch boundary and restarts both mid-epoch and at an epoch's end. On a CPU the resumed run
must match the uninterrupted one bit for bit: weights and the logged loss, lr and grad norm curves. Checkpoints cut
off mid-write are skipped, and one made with other settings is refused.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from stages import encode
from stylestudy.models import builders
from stylestudy.data import dataset, latents, sketches
from stylestudy.train import checkpoints
from stylestudy.core.config import UserError

REPO = Path(__file__).resolve().parents[1]
SEED = 42
UNET = "out/unet/diffusion_pytorch_model.safetensors"
CURVES = ("loss", "lr", "grad_norm")
# 60 images in batches of 4: 15 batches an epoch, 8 optimizer steps with accumulation 2, 16 in all; step 8 ends epoch 0
SETTINGS = {"train_batch_size": 4, "gradient_accumulation_steps": 2, "epochs": 2, "checkpoint_every": 4}
# One thread: tiny models gain nothing from two, and on a busy machine two threads that wait for each other are many
# times slower. Bitwise equality holds for runs with the same number of threads, as here.
ENV = os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny pipeline, synthetic sketches with every row in train.jsonl, and smoke params for finetune."""
    from dvc.utils.hydra import compose_and_dump

    root = tmp_path_factory.mktemp("inputs")
    builders.save_tiny_sd(root / "sd", SEED)
    builders.save_random_guide(root / "guide", SEED, "tiny")
    sketches.make_synthetic_sketches(root / "raw", 60, 32, SEED)
    dataset.write_jsonl(root / "split" / "train.jsonl", dataset.read_metadata(root / "raw"))
    dataset.write_jsonl(root / "split" / "val.jsonl", dataset.read_metadata(root / "raw")[:6])  # for the val loss
    compose_and_dump(root / "params.yaml", str(REPO / "conf"), None, "config", str(REPO), ["profile=smoke"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"] |= SETTINGS
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    encode.run(root / "sd", root / "raw", root / "split", root / "latents",  # as the DAG does
               latents.EncodeSettings(**params["encode"]))
    return root


def workdir(inputs: Path, name: str, options: dict | None = None) -> Path:
    """An empty folder to run finetune in, with the params.yaml of `inputs` and `options` over its finetune section."""
    cwd = inputs.parent / name
    cwd.mkdir()
    params = yaml.safe_load((inputs / "params.yaml").read_text())
    params["finetune"] |= options or {}
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "conf/accelerate", cwd / "conf/accelerate")  # finetune.launch.config_file
    return cwd


def start(cwd: Path, inputs: Path) -> subprocess.Popen:
    """finetune in a subprocess, its output going to cwd/log.txt (a pipe could fill up and stall it)."""
    args = [str(inputs / "sd"), str(inputs / "guide"), str(inputs / "raw"), str(inputs / "split"),
            str(inputs / "latents"), "out", "live", "scratch"]
    with (cwd / "log.txt").open("a") as log:
        return subprocess.Popen([sys.executable, "-m", "stages.finetune", *args], cwd=cwd, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT)


def run_once(cwd: Path, inputs: Path) -> tuple[int, str]:
    """Run finetune until it exits; return its exit code and what it printed."""
    offset = (cwd / "log.txt").stat().st_size if (cwd / "log.txt").exists() else 0
    code = start(cwd, inputs).wait()
    return code, (cwd / "log.txt").read_bytes()[offset:].decode()


def finish(cwd: Path, inputs: Path) -> str:
    """Run finetune to the end; return what it printed."""
    code, printed = run_once(cwd, inputs)
    assert code == 0, printed[-3000:]
    return printed


def logged_steps(cwd: Path) -> int:
    try:
        return len((cwd / "live/plots/metrics/loss.tsv").read_text().splitlines()) - 1
    except OSError:  # not written yet, or being put back from a checkpoint
        return 0


def kill_after_checkpoint(cwd: Path, inputs: Path, step: int) -> None:
    """Start finetune and SIGKILL it mid-step, once checkpoint `step` is written and a later step is logged."""
    proc = start(cwd, inputs)
    deadline = time.monotonic() + 300
    while not ((cwd / f"scratch/step-{step:08d}").is_dir() and logged_steps(cwd) > step):
        assert proc.poll() is None, "finetune ended before it was killed:\n" + (cwd / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cwd / "out").exists()


def plant_incomplete_checkpoints(scratch: Path, whole: Path) -> None:
    """Newer-looking checkpoints as a kill mid-write could leave them: no checkpoint.json, a truncated weights file."""
    shutil.copytree(whole, scratch / "step-00000098")
    (scratch / "step-00000098" / checkpoints.INFO).unlink()
    shutil.copytree(whole, scratch / "step-00000099")
    weights = scratch / "step-00000099" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(whole, scratch / ".step-00000097.tmp")


def unet_tensors(cwd: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(cwd / UNET)


@pytest.fixture(scope="module")
def uninterrupted(inputs) -> Path:
    cwd = workdir(inputs, "uninterrupted")
    finish(cwd, inputs)
    return cwd


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(inputs, uninterrupted):
    cwd = workdir(inputs, "interrupted")
    kill_after_checkpoint(cwd, inputs, 4)  # mid-epoch: resuming skips 8 batches of epoch 0
    assert sorted(p.name for p in (cwd / "scratch").iterdir()) == ["step-00000004"]
    plant_incomplete_checkpoints(cwd / "scratch", cwd / "scratch/step-00000004")
    kill_after_checkpoint(cwd, inputs, 8)  # at the end of epoch 0: resuming starts epoch 1
    first_resume = (cwd / "log.txt").read_text()
    assert "resuming from checkpoint scratch/step-00000004 at step 4 (epoch 0, batch 8)" in first_resume
    for name in ("step-00000098", "step-00000099"):
        assert f"ignoring incomplete checkpoint scratch/{name}" in first_resume
    assert sorted(p.name for p in (cwd / "scratch").iterdir()) == ["step-00000008"]

    printed = finish(cwd, inputs)
    assert "resuming from checkpoint scratch/step-00000008 at step 8 (epoch 0, batch 15)" in printed
    assert not (cwd / "scratch").exists()
    expected, got = unet_tensors(uninterrupted), unet_tensors(cwd)
    assert expected.keys() == got.keys()
    assert all(expected[name].equal(got[name]) for name in expected)
    for curve in CURVES:
        path = f"live/plots/metrics/{curve}.tsv"
        assert (cwd / path).read_text() == (uninterrupted / path).read_text()
    assert json.loads((cwd / "live/timing.json").read_text())["resumed_from_step"] == 8
    assert (cwd / "out/training_info.json").read_bytes() == (uninterrupted / "out/training_info.json").read_bytes()


EVERY_OPTION = {"method": "lora", "lora_rank": 4, "lora_alpha": 8, "snr_gamma": 5.0, "noise_offset": 0.1,
                "caption_dropout": 0.3,
                "clip_loss": {"weight": 0.5, "kind": "directional", "max_timestep": 600, "every": 2},
                "validate_every": 3}


@pytest.mark.slow
def test_every_option_on_still_resumes_to_the_same_weights(inputs):
    """LoRA, the CLIP-guided loss, min-SNR, noise offset, caption dropout and validation, killed once mid-run."""
    uninterrupted = workdir(inputs, "all-options", EVERY_OPTION)
    finish(uninterrupted, inputs)
    cwd = workdir(inputs, "all-options-interrupted", EVERY_OPTION)
    kill_after_checkpoint(cwd, inputs, 4)
    assert "resuming from checkpoint scratch/step-00000004 at step 4" in finish(cwd, inputs)
    expected, got = unet_tensors(uninterrupted), unet_tensors(cwd)
    assert all(expected[name].equal(got[name]) for name in expected)
    adapter = "out/lora/pytorch_lora_weights.safetensors"
    assert (cwd / adapter).read_bytes() == (uninterrupted / adapter).read_bytes()
    for curve in (*CURVES, "loss_mse", "loss_clip", "val_loss"):
        path = f"live/plots/metrics/{curve}.tsv"
        assert (cwd / path).read_text() == (uninterrupted / path).read_text(), curve
    clip = [float(line.split("\t")[1]) for line in (cwd / "live/plots/metrics/loss_clip.tsv").read_text().splitlines()[1:]]
    assert any(clip) and not all(clip), "the CLIP loss applies on every 2nd step only"


# The memory options (stylestudy/train/lowmem.py): the fused step with bf16 weights (stochastic rounding draws from
# the RNG the checkpoint carries, the fp32 optimizer states must come back fp32) and the EMA on the CPU; LoRA's half
# base. Without accumulation: 15 optimizer steps an epoch, 30 in all.
MEMORY_OPTIONS = {
    "fused_bf16": {"fused_backward": True, "gradient_accumulation_steps": 1, "mixed_precision": "bf16",
                   "weights_dtype": "bf16", "ema_device": "cpu", "max_grad_norm": 0.01},
    "lora_half_base": {"method": "lora", "lora_half_base": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MEMORY_OPTIONS))
def test_memory_options_still_resume_to_the_same_weights(inputs, name):
    """Killed once after checkpoint 4, resumed: the same weights (and adapter), loss and grad-norm curves."""
    uninterrupted = workdir(inputs, f"{name}-whole", MEMORY_OPTIONS[name])
    finish(uninterrupted, inputs)
    cwd = workdir(inputs, f"{name}-interrupted", MEMORY_OPTIONS[name])
    kill_after_checkpoint(cwd, inputs, 4)
    assert "resuming from checkpoint scratch/step-00000004 at step 4" in finish(cwd, inputs)
    expected, got = unet_tensors(uninterrupted), unet_tensors(cwd)
    assert expected.keys() == got.keys() and all(expected[k].equal(got[k]) for k in expected)
    for curve in CURVES:
        path = f"live/plots/metrics/{curve}.tsv"
        assert (cwd / path).read_text() == (uninterrupted / path).read_text(), curve
    if name == "fused_bf16":
        assert {t.dtype for t in got.values()} == {torch.bfloat16}
    else:
        adapter = "out/lora/pytorch_lora_weights.safetensors"
        assert (cwd / adapter).read_bytes() == (uninterrupted / adapter).read_bytes()


@pytest.mark.slow
def test_checkpoint_from_other_settings_is_refused(inputs):
    cwd = workdir(inputs, "refused")
    kill_after_checkpoint(cwd, inputs, 4)
    params = yaml.safe_load((cwd / "params.yaml").read_text())
    params["finetune"]["learning_rate"] *= 2
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    code, printed = run_once(cwd, inputs)
    assert code == 2
    assert printed.strip().splitlines()[-1] == (
        "error: scratch/step-00000004 was made with other finetune.learning_rate; to resume it set them back, "
        "to start over delete scratch")
    assert (cwd / "scratch/step-00000004" / checkpoints.INFO).is_file()


def fake_checkpoint(scratch: Path, step: int, run: dict) -> Path:
    folder = scratch / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    position = {"step": step, "epoch": 0, "batch": step}
    (folder / checkpoints.INFO).write_text(json.dumps({"position": position, "fingerprint": run,
                                                    "files": {"model.safetensors": 10}}))
    return folder


def test_newest_whole_checkpoint_is_found_and_torn_ones_skipped(tmp_path):
    run = {"finetune.learning_rate": 1e-4}
    fake_checkpoint(tmp_path, 3, run)
    whole = fake_checkpoint(tmp_path, 20, run)
    (fake_checkpoint(tmp_path, 30, run) / "model.safetensors").write_bytes(b"x" * 4)
    (fake_checkpoint(tmp_path, 40, run) / checkpoints.INFO).write_text('{"position": {"st')
    fake_checkpoint(tmp_path, 50, run).joinpath("model.safetensors").unlink()
    folder, info = checkpoints.find_resumable(tmp_path, run)
    assert folder == whole and info["position"] == checkpoints.Position(20, 0, 20)
    assert checkpoints.find_resumable(tmp_path / "missing", run) is None


def test_other_settings_name_what_differs(tmp_path):
    fake_checkpoint(tmp_path, 5, {"finetune.learning_rate": 1e-4, "shared.seed": 1})
    with pytest.raises(UserError, match=r"other finetune\.learning_rate, shared\.seed; .* delete"):
        checkpoints.find_resumable(tmp_path, {"finetune.learning_rate": 2e-4, "shared.seed": 2})


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_old_value(tmp_path):
    """A checkpoint written before the memory options has none of their keys: it ran as their defaults do, so a run
    at those defaults resumes it, and a run that turns one on is refused naming it."""
    old = {"finetune.learning_rate": 1e-4}
    fake_checkpoint(tmp_path, 5, old)
    assert checkpoints.find_resumable(tmp_path, old | checkpoints.SINCE_ADDED)[1]["position"].step == 5
    with pytest.raises(UserError, match=r"other finetune\.fused_backward;"):
        checkpoints.find_resumable(tmp_path, old | checkpoints.SINCE_ADDED | {"finetune.fused_backward": True})


def test_augmentation_depends_only_on_seed_epoch_and_index():
    import torch

    class Noise:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int):
            return torch.rand(3)

    items = checkpoints.SeededItems(Noise(), SEED)
    first = items[2]
    torch.rand(5)  # the global RNG moves on; the item does not change, and taking it does not move the global RNG
    state = torch.get_rng_state()
    assert items[2].equal(first) and torch.get_rng_state().equal(state)
    items.set_epoch(1)
    assert not items[2].equal(first)


def test_loading_an_item_leaves_the_cuda_generators_alone(monkeypatch):
    """On a GPU, with the items loaded in the main process, reseeding the CUDA generators per item would seed each
    batch's noise and timesteps from its last item: only the CPU generator (torchvision's) may be seeded."""
    import torch

    class Flip:
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int):
            return bool(torch.rand(1) < 0.5)

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    items = checkpoints.SeededItems(Flip(), SEED)
    assert [items[0], items[1]] == [items[0], items[1]]  # still seeded per item
    assert seeded == []
