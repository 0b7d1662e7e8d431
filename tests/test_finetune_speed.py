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

from stylestudy.models import builders
from stylestudy.train import build, checkpoints, losses
from stylestudy.data import dataset, latents, sketches
from stylestudy.core.config import load_params

REPO = Path(__file__).resolve().parents[1]

P = {"gradient_accumulation_steps": 2, "max_train_steps": 0, "epochs": 3, "lr_scheduler": "linear",
     "lr_warmup_steps": 0, "optimizer": "adamw", "learning_rate": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999,
     "adam_weight_decay": 0.0, "adam_epsilon": 1e-8, "use_ema": False, "ema_decay": 0.9}


class TwoProcesses:
    """What accelerate does with two processes: each one gets half of the batches."""

    num_processes = 2
    distributed_type = "MULTI_GPU"

    def prepare(self, *objects):
        prepared = [obj[: len(obj) // 2] if isinstance(obj, list) else obj for obj in objects]
        return prepared[0] if len(prepared) == 1 else prepared

    def unwrap_model(self, model):
        return model


def test_steps_come_from_the_shard_each_process_sees():
    parts = {"unet": torch.nn.Linear(2, 2)}
    loop = build.prepare_training(parts, list(range(20)), P, TwoProcesses())
    assert len(loop["dataloader"]) == 10
    assert loop["max_steps"] == 3 * 5  # 10 batches per process, accumulation 2, 3 epochs
    assert loop["lr_scheduler"].lr_lambdas[0](15 * 2) == 0.0  # the schedule ends after two scheduler steps a step


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict], dict]:
    """A tiny pipeline, 12 synthetic sketches and the smoke profile's finetune params."""
    from dvc.utils.hydra import compose_and_dump

    root = tmp_path_factory.mktemp("inputs")
    builders.save_random_sd(root / "sd", 0, "tiny")
    sketches.make_synthetic_sketches(root / "raw", 12, 32, 0)
    compose_and_dump(root / "params.yaml", str(REPO / "conf"), None, "config", str(REPO), ["profile=smoke"])
    p = load_params("finetune", root / "params.yaml") | {"train_batch_size": 4}
    return root / "sd", root / "raw", dataset.read_metadata(root / "raw"), p


def first_batch(inputs: tuple, **settings) -> tuple[dict, dict]:
    """Epoch 0's first batch and the model parts, from a fresh build with `settings` over the smoke params."""
    from accelerate.utils import set_seed

    sd_dir, raw, rows, p = inputs
    p = p | settings | {"mixed_precision": "no"}
    accelerator = build.build_accelerator(p, 0)
    set_seed(0)
    parts = build.load_components(sd_dir, p, accelerator)
    dataloader = accelerator.prepare(build.make_dataloader(raw, rows, parts, p, 0))
    return next(iter(checkpoints.epoch_batches(dataloader, 0, 0, accelerator))), parts


def test_cached_latents_are_those_of_the_same_flipped_images(inputs: tuple) -> None:
    encoded, parts = first_batch(inputs, cache_latents=False)
    cached, cached_parts = first_batch(inputs, cache_latents=True)
    assert cached_parts["vae"] is None and cached_parts["text_encoder"] is None  # freed once the cache is made
    with torch.no_grad():
        dist = parts["vae"].encode(encoded["pixel_values"]).latent_dist
        text = parts["text_encoder"](encoded["input_ids"], return_dict=False)[0]
    assert torch.allclose(cached["latent_mean"], dist.mean, atol=1e-5)
    assert torch.allclose(cached["latent_std"], dist.std, atol=1e-5)
    assert torch.allclose(cached["encoder_hidden_states"], text, atol=1e-5)
    torch.manual_seed(1)
    assert losses.training_loss(cached, cached_parts, cached_parts["unet"], inputs[3], 0)["loss"].item() > 0


def test_cache_falls_back_without_center_crop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="stylestudy.data.latents")
    assert not latents.cacheable({"cache_latents": True, "center_crop": False})
    assert "cache_latents needs center_crop" in caplog.text
    assert latents.cacheable({"cache_latents": True, "center_crop": True})


def test_fused_adamw_is_foreach_on_a_cpu() -> None:
    optimizer = build.make_optimizer(torch.nn.Linear(2, 2).parameters(), P | {"optimizer": "adamw_fused"})
    assert optimizer.defaults["foreach"] and not optimizer.defaults["fused"]


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
