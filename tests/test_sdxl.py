"""The SDXL family: its folder recognised and its kin refused in one line, the time ids of every training image as
diffusers' SDXL training script computes them (cached and encoded every step alike), the conditioning as the pipeline
computes it, the VAE kept in fp32, and the settings params refuse for it.

Broken once to see them fail: with the flip applied before the crop record is taken (the record of the unflipped crop)
the flipped cases of the recipe test fail; with `mirrored` left out of the encode stage the cached-versus-uncached test
fails; with the VAE loaded in the encoders' dtype the fp32 test fails."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import params_refusal, params_with
from PIL import Image

from stylestudy.core.config import UserError, load_params
from stylestudy.data import dataset, latents
from stylestudy.models import builders, families
from stylestudy.models.families import Conditioning, sd2, sdxl
from stylestudy.train import batches

pytestmark = pytest.mark.usefixtures("one_thread")
RESOLUTION = 32


@pytest.fixture(scope="module")
def encoders(sdxl_dir: Path):
    return sdxl.FAMILY.load_encoders(sdxl_dir, torch.device("cpu"), torch.float32)


def copy_with(folder: Path, target: Path, index: dict | None = None) -> Path:
    """A copy of a pipeline folder with model_index.json entries replaced."""
    shutil.copytree(folder, target)
    path = target / "model_index.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | (index or {})))
    return target


def refusal(folder: Path, expected=None) -> str:
    with pytest.raises(UserError) as refused:
        families.check_pipeline_folder(folder, expected)
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_an_sdxl_folder_is_recognised(sdxl_dir: Path) -> None:
    assert families.check_pipeline_folder(sdxl_dir) is sdxl.FAMILY
    pipe = families.load_pipeline(sdxl_dir)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and families.family_of_pipeline(pipe) is sdxl.FAMILY
    assert pipe.unet.config.addition_embed_type == "text_time"


def test_a_refiner_inpainting_or_another_family_s_folder_is_refused_in_one_line(sdxl_dir: Path, tmp_path: Path) -> None:
    refiner = copy_with(sdxl_dir, tmp_path / "refiner", {"_class_name": "StableDiffusionXLImg2ImgPipeline"})
    message = refusal(refiner, sdxl.FAMILY)
    assert "SDXL refiner" in message and "StableDiffusionXLImg2ImgPipeline" in message and "sdxl" in message
    shutil.rmtree(refiner / "text_encoder")  # a refiner saved as a text-to-image folder: bigG only
    message = refusal(copy_with(refiner, tmp_path / "bare", {"_class_name": "StableDiffusionXLPipeline"}))
    assert "no text_encoder/" in message and "refiner" in message and "StableDiffusionXLPipeline" in message
    inpainting = copy_with(sdxl_dir, tmp_path / "inpaint", {"_class_name": "StableDiffusionInpaintPipeline"})
    message = refusal(inpainting, sdxl.FAMILY)
    assert "inpainting" in message and "StableDiffusionInpaintPipeline" in message and "is sdxl" in message
    nine = copy_with(sdxl_dir, tmp_path / "nine")
    config = nine / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"in_channels": 9}))
    message = refusal(nine)
    assert "9 input channels" in message and "inpainting" in message and "sdxl" in message
    message = refusal(sdxl_dir, sd2.FAMILY)
    assert "StableDiffusionXLPipeline" in message and "model.family is sd2" in message and "model=sdxl" in message


def test_sd2_folder_is_refused_for_sdxl(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "sd"
    modules = builders.build_sd_modules("tiny")
    StableDiffusionPipeline(**modules, tokenizer=builders.sd_tokenizer_from_open_clip(), scheduler=None,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    message = refusal(folder, sdxl.FAMILY)
    assert "StableDiffusionPipeline" in message and "model.family is sdxl" in message and "model=sd2" in message


def recipe(image: Image.Image, flip: bool, crop_at: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """diffusers' train_text_to_image_sdxl.py preprocessing, written out: original size, resize of the shorter side,
    flip, then the crop (the center one, or at crop_at), whose top-left in that image is the crop coordinate."""
    from torchvision import transforms
    from torchvision.transforms import functional as F

    original = (image.height, image.width)
    image = transforms.Resize(RESOLUTION, interpolation=transforms.InterpolationMode.BILINEAR)(image)
    image = F.hflip(image) if flip else image
    if crop_at is None:
        y1 = max(0, int(round((image.height - RESOLUTION) / 2.0)))
        x1 = max(0, int(round((image.width - RESOLUTION) / 2.0)))
        image = transforms.CenterCrop(RESOLUTION)(image)
    else:
        y1, x1 = crop_at
        image = F.crop(image, y1, x1, RESOLUTION, RESOLUTION)
    pixels = transforms.Normalize([0.5], [0.5])(transforms.ToTensor()(image))
    return pixels, [*original, y1, x1, RESOLUTION, RESOLUTION]


def wide_image() -> Image.Image:
    """120 x 60: resized to 64 x 32, an even margin, so the center crop is symmetric."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 120, 3), dtype=np.uint8))


@pytest.mark.parametrize("center_crop", [True, False])
def test_time_ids_are_diffusers_sdxl_recipe(center_crop: bool) -> None:
    image, transform = wide_image(), dataset.train_transforms(RESOLUTION, center_crop, True)
    flips = set()
    for seed in range(6):
        torch.manual_seed(seed)
        pixels, crop = transform.framed(image)
        torch.manual_seed(seed)
        if not center_crop:
            torch.randint(0, 1, (1,)), torch.randint(0, 33, (1,))  # RandomCrop's two draws come first
        flip = bool(torch.rand(1) < 0.5)
        flips.add(flip)
        expected_pixels, time_ids = recipe(image, flip, None if center_crop else tuple(crop[2:4].tolist()))
        assert crop.tolist() == time_ids and crop.dtype == torch.int64
        torch.testing.assert_close(pixels, expected_pixels, rtol=0, atol=0)
    assert flips == {True, False}
    if center_crop:
        assert recipe(image, False)[1] == [60, 120, 0, 16, 32, 32]


def test_cached_and_uncached_batches_carry_the_same_time_ids(encoders, tmp_path: Path) -> None:
    """100 x 60 resizes to 53 x 32: an odd margin, so the mirrored crop's left edge (11) is not the crop's (10). Our
    pipeline crops then flips, so 11 is where the flipped pixels lie in the flipped image; diffusers' script flips
    first and records its own center crop, 10: the one place where the two differ, by one pixel."""
    rows = []
    for i, size in enumerate([(100, 60), (50, 90), (64, 64)]):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}"})
    data = [batches.training_data(tmp_path, rows, encoders, latents.EncodeSettings(RESOLUTION, True, True, cache, "no",
                                                                                   0), 0.0, show_progress=False)
            for cache in (True, False)]
    assert isinstance(data[0].to_inputs, batches.FromCache) and isinstance(data[1].to_inputs, batches.EncodeEveryStep)
    lefts = set()
    for seed in range(8):
        picked = []
        for one in data:
            torch.manual_seed(seed)
            pairs = [(i, one.items[i]) for i in range(len(rows))]
            picked.append(one.to_inputs(one.collate(pairs)).conditioning)
        assert torch.equal(picked[0].crops, picked[1].crops)
        torch.testing.assert_close(picked[0].pooled, picked[1].pooled)
        assert picked[0].crops[1].tolist() == [90, 50, 12, 0, 32, 32] and picked[0].crops[2].tolist()[2:4] == [0, 0]
        lefts.add(picked[0].crops[0, 3].item())
    assert lefts == {10, 11}


def test_conditioning_is_the_pipeline_s_own(sdxl_dir: Path, encoders) -> None:
    texts = ["a horse near a tree", "zebra running"]
    conditioning = encoders.encode_text(texts)
    pipe = families.load_pipeline(sdxl_dir)
    embeds, _, pooled, _ = pipe.encode_prompt(texts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert conditioning.sequence.shape == (2, 77, 64) and conditioning.pooled.shape == (2, 32)
    torch.testing.assert_close(conditioning.sequence, embeds, rtol=0, atol=0)
    torch.testing.assert_close(conditioning.pooled, pooled, rtol=0, atol=0)
    unet = sdxl.FAMILY.load_denoiser(sdxl_dir)
    with pytest.raises(ValueError, match="time ids"):
        sdxl.FAMILY.denoise(unet, torch.zeros(2, 4, 8, 8), torch.tensor([1, 2]), conditioning)
    crops = torch.tensor([[60, 120, 0, 16, 32, 32], [32, 32, 0, 0, 32, 32]])
    with torch.no_grad():
        ours = sdxl.FAMILY.denoise(unet, torch.ones(2, 4, 8, 8), torch.tensor([1, 2]), conditioning.with_crops(crops))
        theirs = unet(torch.ones(2, 4, 8, 8), torch.tensor([1, 2]), embeds,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": crops.float()}).sample
    torch.testing.assert_close(ours, theirs)


def test_the_vae_stays_in_fp32(sdxl_dir: Path) -> None:
    encoders = sdxl.FAMILY.load_encoders(sdxl_dir, torch.device("cpu"), torch.bfloat16)
    assert encoders.vae.dtype == torch.float32 and encoders.text_encoders[1].dtype == torch.bfloat16
    assert encoders.latent_distribution(torch.zeros(1, 3, 32, 32)).mean.dtype == torch.float32
    pipe = families.load_pipeline(sdxl_dir)
    sdxl.FAMILY.cast(pipe, torch.float16)
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == torch.float16
    same = sdxl.FAMILY.configured({"family": "sdxl", "vae_precision": "same"})
    assert same.load_encoders(sdxl_dir, torch.device("cpu"), torch.bfloat16).vae.dtype == torch.bfloat16


@pytest.mark.parametrize("override, words", [
    ("generate.scheduler=flow_euler", "not a sampler of model family sdxl"),
    ("model.vae_precision=same", "overflows"),
    ("model.vae_precision=fp16", "model.vae_precision must be one of fp32, same"),
])
def test_settings_sdxl_cannot_honour_are_refused_in_one_line(tmp_path: Path, override: str, words: str) -> None:
    assert words in params_refusal(tmp_path, "finetune", "model=sdxl", override)


def test_sdxl_params_compose_with_the_smoke_profile(tmp_path: Path) -> None:
    assert load_params("model", params_with(tmp_path, "model=sdxl", "profile=smoke")) == {"family": "sdxl",
                                                                                          "vae_precision": "fp32"}
    assert load_params("model", params_with(tmp_path, "model=sdxl", "profile=smoke",
                                            "model.vae_precision=same"))["vae_precision"] == "same"  # tiny: no hub
    with pytest.raises(UserError, match="unknown key model.vae_precision"):
        load_params("model", params_with(tmp_path, "+model.vae_precision=fp32"))


def test_crop_records_travel_with_their_rows() -> None:
    both = Conditioning(torch.zeros(3, 4, 2), torch.zeros(3, 2)).with_crops(torch.arange(18).view(3, 6))
    assert torch.equal(both.rows(torch.tensor([2, 0])).crops, both.crops[[2, 0]])
    assert torch.equal(both.repeat(2).crops[3:], both.crops)
    assert both.to("cpu", torch.bfloat16).crops.dtype == torch.int64  # sizes are not rounded to half precision
    assert set(both.tensors()) == {"text", "pooled"}  # the cache stores crops with the images, not the captions
