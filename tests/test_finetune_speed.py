"""finetune's step count and speed options on tiny models, and bench/finetune_speed.py at tiny size on the CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stylestudy.core.config import load_params
from stylestudy.data import dataset, latents, sketches
from stylestudy.models import builders
from stylestudy.models.families import sd2
from stylestudy.train import batches, build, checkpoints, losses

REPO = Path(__file__).resolve().parents[1]

P = {"gradient_accumulation_steps": 2, "max_train_steps": 0, "epochs": 3, "lr_scheduler": "linear",
     "lr_warmup_steps": 0, "optimizer": "adamw", "learning_rate": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999,
     "adam_weight_decay": 0.0, "adam_epsilon": 1e-8, "use_ema": False, "ema_decay": 0.9, "fused_backward": False}


class TwoProcesses:
    """What accelerate does with two processes: each one gets half of the batches."""

    num_processes = 2
    distributed_type = "MULTI_GPU"
    mixed_precision = "bf16"
    device = torch.device("cpu")

    def prepare(self, *objects):
        prepared = [obj[: len(obj) // 2] if isinstance(obj, list) else obj for obj in objects]
        return prepared[0] if len(prepared) == 1 else prepared

    def unwrap_model(self, model):
        return model


def test_steps_come_from_the_shard_each_process_sees():
    trainee = losses.Trainee(sd2.FAMILY, torch.nn.Linear(2, 2), noise=None)
    state = build.prepare_training(trainee, list(range(20)), P, TwoProcesses())
    assert len(state.dataloader) == 10
    assert state.max_steps == 3 * 5  # 10 batches per process, accumulation 2, 3 epochs
    assert state.lr_scheduler.lr_lambdas[0](15 * 2) == 0.0  # the schedule ends after two scheduler steps a step


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict], dict]:
    """A tiny pipeline, 12 synthetic sketches and the smoke profile's finetune params."""
    from dvc.utils.hydra import compose_and_dump

    root = tmp_path_factory.mktemp("inputs")
    builders.save_random_sd(root / "sd", 0, "tiny")
    sketches.make_synthetic_sketches(root / "raw", 12, 32, 0)
    compose_and_dump(root / "params.yaml", str(REPO / "conf"), None, "config", str(REPO), ["profile=smoke"])
    p = load_params("finetune", root / "params.yaml") | {"train_batch_size": 4, "mixed_precision": "no"}
    encoding = latents.EncodeSettings(**load_params("encode", root / "params.yaml"))
    return root / "sd", root / "raw", dataset.read_metadata(root / "raw"), p, encoding


def first_batch(inputs: tuple, cache_latents: bool) -> tuple:
    """Epoch 0's first batch, what turns it into the loss's inputs, and the frozen encoders, built as finetune does."""
    import dataclasses

    sd_dir, raw, rows, p, encoding = inputs
    accelerator = build.build_accelerator(p, 0)
    encoders = sd2.FAMILY.load_encoders(sd_dir, accelerator.device, torch.float32)
    data = batches.training_data(raw, rows, encoders, dataclasses.replace(encoding, cache_latents=cache_latents), 0.0)
    dataloader = accelerator.prepare(build.make_dataloader(data, p["train_batch_size"], 0, 0))
    return next(iter(checkpoints.epoch_batches(dataloader, 0, 0, accelerator))), data.to_inputs, encoders


def test_cached_latents_are_those_of_the_same_flipped_images(inputs: tuple) -> None:
    pixels, _, encoders = first_batch(inputs, cache_latents=False)
    cached, to_inputs, _ = first_batch(inputs, cache_latents=True)
    assert isinstance(pixels, batches.PixelBatch) and isinstance(cached, batches.CachedBatch)
    dist = encoders.latent_distribution(pixels.pixels)
    assert torch.allclose(cached.latent_mean, dist.mean, atol=1e-5)
    assert torch.allclose(cached.latent_std, dist.std, atol=1e-5)
    assert torch.allclose(cached.conditioning.sequence, encoders.encode_text(pixels.captions).sequence, atol=1e-5)
    trainee = build.load_trainee(sd2.FAMILY, inputs[0], inputs[3])
    torch.manual_seed(1)
    assert losses.training_loss(to_inputs(cached), trainee, inputs[3], 0, None)["loss"].item() > 0


def test_cache_falls_back_without_center_crop(inputs: tuple, caplog: pytest.LogCaptureFixture) -> None:
    import dataclasses

    caplog.set_level("INFO", logger="stylestudy.data.latents")
    encoding = dataclasses.replace(inputs[4], cache_latents=True)
    assert not latents.cacheable(dataclasses.replace(encoding, center_crop=False))
    assert "cache_latents needs encode.center_crop" in caplog.text
    assert latents.cacheable(encoding)


def test_fused_adamw_is_foreach_on_a_cpu() -> None:
    optimizer = build.make_optimizer(torch.nn.Linear(2, 2).parameters(), P | {"optimizer": "adamw_fused"})
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]


@pytest.mark.slow
def test_bench_prints_both_configurations(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    # One thread: the test stays fast when other processes share the CPU (oversubscribed threads spin).
    result = subprocess.run(
        [sys.executable, "bench/finetune_speed.py", "--batch-sizes", "1,2", "--steps", "2", "--warmup", "1",
         "--json", str(figures)],
        cwd=REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("(a) straightforward", "(b) ours"):
        for batch in (1, 2):
            row = re.search(re.escape(name) + rf"\s+{batch}\s+([\d.]+)\s+([\d.]+)\s+(\d+)\s+-$", result.stdout,
                            re.MULTILINE)
            assert row and float(row.group(2)) > 0 and int(row.group(3)) > 0, result.stdout
    assert re.search(r"UNet model FLOPs per image, forward\+backward at 32 px: [\d.e+-]+ TFLOP", result.stdout)
    saved = json.loads(figures.read_text())
    assert saved["configurations"]["b"]["flops_per_image"] > 0
