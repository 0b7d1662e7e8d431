"""stylestudy/train/validation.py on a tiny pipeline: deterministic, leaves no trace (RNG, mode, grads), outlives the VAE."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from stylestudy.models import builders, loading
from stylestudy.data import dataset, sketches
from stylestudy.train.validation import ValidationSet

P = {"resolution": 32, "validation_prompt": "a horse next to a tree", "validation_images": 2, "validation_steps": 3}
SEED = 7


def make_parts(sd_dir: Path) -> dict:
    """The parts finetune.load_components builds, on the CPU in fp32."""
    from diffusers import DDPMScheduler

    pipe = loading.load_sd_pipeline(sd_dir)
    pipe.unet.train()
    return {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "vae": pipe.vae, "unet": pipe.unet,
            "noise_scheduler": DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler"),
            "frozen_dtype": torch.float32, "device": torch.device("cpu"),
            "latent_scale": pipe.vae.config.scaling_factor, "main_process": True}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("validation")
    builders.save_random_sd(root / "sd", 0, "tiny")
    sketches.make_synthetic_sketches(root / "raw", 6, 40, 0)
    return root / "sd", root / "raw", dataset.read_metadata(root / "raw")


@pytest.fixture(scope="module")
def built(inputs: tuple) -> tuple[ValidationSet, dict]:
    """A validation set built as finetune builds it, then the VAE and text encoder freed as the latent cache does."""
    sd_dir, raw, rows = inputs
    parts = make_parts(sd_dir)
    state = torch.get_rng_state()
    validation = ValidationSet.build(raw, rows, parts, P, SEED)
    assert torch.equal(torch.get_rng_state(), state)
    parts["vae"] = parts["text_encoder"] = None
    return validation, parts


def same_images(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_val_loss_is_fixed_and_leaves_no_trace(built: tuple) -> None:
    validation, parts = built
    unet = parts["unet"]
    assert parts["vae"] is None and parts["text_encoder"] is None
    state = torch.get_rng_state()
    first, second = validation.val_loss(unet), validation.val_loss(unet)
    assert first == second and first > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert unet.training
    assert all(param.grad is None for param in unet.parameters())


def test_val_loss_moves_when_the_unet_trains(built: tuple) -> None:
    validation, parts = built
    unet = copy.deepcopy(parts["unet"])
    before = validation.val_loss(unet)
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn((2, 4, 16, 16), generator=generator)
    text = torch.randn((2, 77, 32), generator=generator)
    loss = unet(noisy, torch.tensor([10, 500]), text, return_dict=False)[0].pow(2).mean()
    loss.backward()
    torch.optim.SGD(unet.parameters(), lr=0.1).step()
    assert validation.val_loss(unet) != before


def test_val_loss_follows_the_prediction_type(built: tuple) -> None:
    from diffusers import DDPMScheduler

    validation, parts = built
    config = validation.noise_scheduler.config
    v_prediction = dataclasses.replace(
        validation, noise_scheduler=DDPMScheduler.from_config(config, prediction_type="v_prediction"))
    assert v_prediction.val_loss(parts["unet"]) != validation.val_loss(parts["unet"])


def test_images_are_deterministic_sized_and_leave_no_trace(built: tuple) -> None:
    validation, parts = built
    unet = parts["unet"]
    state = torch.get_rng_state()
    first, second = validation.images(unet), validation.images(unet)
    assert torch.equal(torch.get_rng_state(), state)
    assert unet.training and all(param.grad is None for param in unet.parameters())
    assert len(first) == P["validation_images"]
    assert all(image.size == (32, 32) and image.mode == "RGB" for image in first)
    assert same_images(first, second)
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))  # seeds seed and seed + 1


def test_image_i_comes_from_seed_plus_i(built: tuple) -> None:
    validation, parts = built
    alone = dataclasses.replace(validation, seed=SEED + 1, n_images=1).images(parts["unet"])
    assert same_images(alone, validation.images(parts["unet"])[1:])


def test_without_val_images_only_images_are_logged(inputs: tuple, tmp_path: Path) -> None:
    from dvclive import Live

    sd_dir, raw, _ = inputs
    parts = make_parts(sd_dir)
    validation = ValidationSet.build(raw, [], parts, P | {"validation_images": 1}, SEED)
    assert validation.val_loss(parts["unet"]) is None
    with Live(str(tmp_path / "live"), dvcyaml=False, save_dvc_exp=False) as live:
        assert validation.log(live, parts["unet"], 1) is None
    assert not (tmp_path / "live/plots/metrics/val_loss.tsv").exists()
    assert (tmp_path / "live/plots/images/validation/0.png").is_file()


def test_log_writes_val_loss_and_images_where_dvc_yaml_declares_them(built: tuple, tmp_path: Path) -> None:
    from dvclive import Live

    validation, parts = built
    with Live(str(tmp_path / "live"), dvcyaml=False, save_dvc_exp=False) as live:
        for step in (1, 2):
            live.log_metric("loss", 0.5)
            validation.log(live, parts["unet"], step)
            live.next_step()
    rows = (tmp_path / "live/plots/metrics/val_loss.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["step", "val_loss"] and len(rows) == 3
    images = sorted(p.name for p in (tmp_path / "live/plots/images/validation").iterdir())
    assert images == ["0.png", "1.png"]


def test_half_precision_vae_and_text_encoder_as_on_a_gpu(inputs: tuple) -> None:
    """On CUDA the frozen VAE and text encoder run in fp16/bf16 beside an fp32 UNet: inputs are cast both ways."""
    sd_dir, raw, rows = inputs
    parts = make_parts(sd_dir) | {"frozen_dtype": torch.bfloat16}
    parts["vae"].to(dtype=torch.bfloat16)
    parts["text_encoder"].to(dtype=torch.bfloat16)
    validation = ValidationSet.build(raw, rows[:2], parts, P | {"validation_images": 1, "validation_steps": 2}, SEED)
    assert np.isfinite(validation.val_loss(parts["unet"]))
    assert validation.images(parts["unet"])[0].size == (32, 32)
