"""The generate stage's speed settings, and bench/generate_speed.py at tiny size on the CPU (figures unchecked)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import generate

REPO = Path(__file__).resolve().parents[1]
PLAIN = {"dtype": "auto", "compile": False, "channels_last": False, "fuse_qkv": False, "vae_batch_size": 8,
         "scheduler": "dpmsolver++", "resolution": 32, "num_inference_steps": 3, "guidance_scale": 7.5,
         "memory": "none"}
TEXTS, SEEDS = ["a pencil sketch of a horse", "zebra running", "a statue of a man on horse"], [7, 8, 9]



def pixels(images: list) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_dtype_auto_is_fp32_on_a_cpu_and_fp16_on_cuda() -> None:
    assert generate.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert generate.resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert generate.resolve_dtype("fp16", torch.device("cpu")) == torch.bfloat16  # CPU kernels have no fast fp16
    assert generate.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_speed_settings_keep_the_images(sd_dir: Path) -> None:
    plain = generate.load_pipeline(sd_dir, PLAIN)
    fast_settings = PLAIN | {"channels_last": True, "fuse_qkv": True, "vae_batch_size": 2}
    fast = generate.load_pipeline(sd_dir, fast_settings)
    assert type(fast.unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]).__name__ \
        == "FusedAttnProcessor2_0"
    reference = pixels(generate.generate_images(plain, TEXTS, SEEDS, PLAIN))
    ours = pixels(generate.generate_images(fast, TEXTS, SEEDS, fast_settings))
    assert np.abs(ours - reference).max() <= 1  # float rounding at most, in 8-bit pixels


def test_an_image_does_not_depend_on_its_batch(sd_dir: Path) -> None:
    pipe = generate.load_pipeline(sd_dir, PLAIN)
    together = pixels(generate.generate_images(pipe, TEXTS, SEEDS, PLAIN))
    alone = pixels(generate.generate_images(pipe, TEXTS[1:2], SEEDS[1:2], PLAIN))
    assert np.abs(together[1] - alone[0]).max() <= 1


@pytest.mark.slow
def test_bench_prints_the_table_psnr_and_evaluation(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    # One thread: the test stays fast when other processes share the CPU (oversubscribed threads spin).
    result = subprocess.run(
        [sys.executable, "bench/generate_speed.py", "--arch", "tiny", "--resolution", "32", "--prompts", "2",
         "--images-per-prompt", "2", "--naive-steps", "4", "--steps", "3", "--json", str(figures)],
        cwd=REPO, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for line in ("(a) naive: PNDM 4 steps, batch 1", "(b) diffusers: DPM-Solver++ 3 steps, batch 4", "(c) ours: same"):
        assert re.search(re.escape(line) + r".*\s[\d.]+\s+[\d.]+\s+[\d.]+\s+-$", out, re.MULTILINE), out
    psnr = re.search(r"PSNR of \(c\) against \(b\) with an fp32 VAE: (\S+) dB", out)
    assert psnr and float(psnr.group(1)) >= 30, out
    assert re.search(r"study evaluation from loaded models \(8 images, CLIP, BLIP; ours\): [\d.]+ s", out), out
    saved = json.loads(figures.read_text())
    assert [row["images_per_s"] > 0 for row in saved["configurations"]] == [True] * 3
    assert saved["environment"]["device"].startswith("CPU")
