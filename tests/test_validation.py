"""stylestudy/train/validation.py on a tiny pipeline: deterministic, leaves no trace (RNG, mode, grads), keeps no text
encoder."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from stylestudy.data import dataset, sketches
from stylestudy.models import builders
from stylestudy.models.families import FrozenEncoders, sd2
from stylestudy.train.validation import ValidationSet

P = {"validation_prompt": "a horse next to a tree", "validation_images": 2, "validation_steps": 3}
RESOLUTION = 32
SEED = 7


def make_parts(sd_dir: Path, dtype=torch.float32) -> dict:
    """What finetune builds, on the CPU: the frozen encoders (in `dtype`), the UNet in fp32, the noise process."""
    return {"encoders": sd2.FAMILY.load_encoders(sd_dir, torch.device("cpu"), dtype),
            "unet": sd2.FAMILY.load_denoiser(sd_dir).train(), "noise": sd2.FAMILY.load_noise_process(sd_dir)}


def build(raw: Path, rows: list[dict], parts: dict, p: dict = P) -> ValidationSet:
    return ValidationSet.build(raw, rows, parts["encoders"], parts["noise"], p, RESOLUTION, SEED)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict]]:
    root = tmp_path_factory.mktemp("validation")
    builders.save_random_sd(root / "sd", 0, "tiny")
    sketches.make_synthetic_sketches(root / "raw", 6, 40, 0)
    return root / "sd", root / "raw", dataset.read_metadata(root / "raw")


@pytest.fixture(scope="module")
def built(inputs: tuple) -> tuple[ValidationSet, dict]:
    """A validation set built as finetune builds it; the frozen encoders are not kept."""
    sd_dir, raw, rows = inputs
    parts = make_parts(sd_dir)
    state = torch.get_rng_state()
    validation = build(raw, rows, parts)
    assert torch.equal(torch.get_rng_state(), state)
    return validation, {"unet": parts["unet"]}


def same_images(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def test_val_loss_is_fixed_and_leaves_no_trace(built: tuple) -> None:
    validation, parts = built
    unet = parts["unet"]
    kept = vars(validation).values()  # it outlives the text encoders: finetune frees them once the data is cached
    assert not any(isinstance(value, FrozenEncoders) for value in kept)
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
    config = validation.noise.scheduler.config
    v_prediction = dataclasses.replace(
        validation, noise=sd2.DDPMNoise(DDPMScheduler.from_config(config, prediction_type="v_prediction")))
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
    validation = build(raw, [], parts, P | {"validation_images": 1})
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
    parts = make_parts(sd_dir, torch.bfloat16)
    validation = build(raw, rows[:2], parts, P | {"validation_images": 1, "validation_steps": 2})
    assert np.isfinite(validation.val_loss(parts["unet"]))
    assert validation.images(parts["unet"])[0].size == (32, 32)
