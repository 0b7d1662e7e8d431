"""Tiny model builders, loaders, folder checks and copies of stylestudy/models/loading.py (CPU, offline)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from stylestudy.models import builders, families, loading
from stylestudy.core.config import UserError

SEED = 0
SENTENCES = ["a pencil sketch of a horse", "A black and white drawing of a boy riding a bicycle, 2 dogs."]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """All safetensors tensors under `folder`, keyed by relative file path and tensor name."""
    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(folder.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two folders hold the same tensors under the same names."""
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and len(wa) > 0 and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="session")
def sd_pipe(sd_dir: Path):
    pipe = families.load_pipeline(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


BUILDERS = {"sd": builders.save_tiny_sd, "clip": builders.save_tiny_clip, "blip": builders.save_tiny_blip}
LOADERS = {"sd": families.load_pipeline, "clip": loading.load_clip, "blip": loading.load_blip}
CHECKS = {"sd": families.check_pipeline_folder, "clip": loading.check_clip_folder, "blip": loading.check_blip_folder}
COPIES = {"sd": families.copy_pipeline, "clip": loading.copy_clip, "blip": loading.copy_blip}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_same_seed_same_weights_other_seed_other_weights(kind: str, tmp_path: Path, request) -> None:
    built = request.getfixturevalue(f"{kind}_dir")
    BUILDERS[kind](tmp_path / "same", SEED)
    BUILDERS[kind](tmp_path / "other", SEED + 1)
    assert _same_weights(built, tmp_path / "same")
    assert not _same_weights(built, tmp_path / "other")


def test_tiny_sd_is_a_plain_diffusers_folder(sd_dir: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, use_safetensors=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert isinstance(pipe.scheduler, PNDMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.num_train_timesteps, cfg.prediction_type, cfg.steps_offset) == (1000, "epsilon", 1)
    assert pipe.text_encoder.config.vocab_size == 49408 == len(pipe.tokenizer)
    assert not list(sd_dir.rglob("*.bin"))


@pytest.mark.parametrize("size", [32, 64])
def test_tiny_sd_generates(sd_pipe, size: int) -> None:
    out = sd_pipe("a pencil sketch of a horse", num_inference_steps=2, height=size, width=size,
                  generator=torch.Generator().manual_seed(0), output_type="np")
    image = out.images[0]
    assert image.shape == (size, size, 3)
    assert image.min() >= 0 and image.max() <= 1 and image.std() > 0


def test_sd_tokenizer_matches_open_clip(sd_pipe) -> None:
    import open_clip

    reference = open_clip.get_tokenizer("ViT-H-14")(SENTENCES).tolist()
    built = builders.sd_tokenizer_from_open_clip()
    for tokenizer in (built, sd_pipe.tokenizer):  # freshly built and after save/load
        ids = tokenizer(SENTENCES, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True).input_ids
        assert ids == reference
        assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "!"
    assert reference[0][:3] == [49406, 320, 11200]  # <start>, "a", "pencil": a real tokenisation, not all [UNK]


def test_tiny_clip_loads_and_encodes(clip_dir: Path) -> None:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    ours, our_preprocess, tokenizer = loading.load_clip(clip_dir)
    assert not ours.training
    assert type(tokenizer).__name__ == "SimpleTokenizer"
    image = our_preprocess(Image.new("RGB", (50, 40), "white")).unsqueeze(0)
    assert image.shape == (1, 3, 32, 32)
    with torch.no_grad():
        image_features = ours.encode_image(image)
        text_features = ours.encode_text(tokenizer(SENTENCES))
        assert torch.equal(model.eval().encode_image(image), image_features)
    assert image_features.shape == (1, 32) and text_features.shape == (2, 32)
    assert not torch.allclose(text_features[0], text_features[1])


def test_tiny_blip_loads_and_captions(blip_dir: Path) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    BlipForConditionalGeneration.from_pretrained(blip_dir, use_safetensors=True)
    BlipProcessor.from_pretrained(blip_dir)
    model, processor = loading.load_blip(blip_dir)
    assert not model.training
    tokenizer = processor.tokenizer
    assert tokenizer.bos_token == "[DEC]" and model.config.text_config.bos_token_id == tokenizer.bos_token_id
    assert tokenizer.tokenize("a pencil sketch of a horse") == ["a", "pencil", "sketch", "of", "a", "horse"]
    inputs = processor(images=Image.new("RGB", (64, 48), "white"), return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=8)
    caption = processor.decode(ids[0], skip_special_tokens=True)
    assert ids.shape[1] > 1 and ids[0, 0] == tokenizer.bos_token_id
    assert isinstance(caption, str) and caption.strip()


def test_missing_path_is_refused(tmp_path: Path) -> None:
    for check in (families.check_pipeline_folder, loading.check_clip_folder, loading.check_blip_folder):
        with pytest.raises(UserError, match="does not exist"):
            check(tmp_path / "nope")


def test_wrong_kind_of_folder_is_refused(sd_dir: Path, clip_dir: Path, blip_dir: Path) -> None:
    with pytest.raises(UserError, match="model_index.json"):
        families.check_pipeline_folder(clip_dir)
    with pytest.raises(UserError, match="open_clip_config.json"):
        loading.check_clip_folder(sd_dir)
    with pytest.raises(UserError, match="config.json"):
        loading.check_blip_folder(clip_dir)
    with pytest.raises(UserError, match="model_type"):
        loading.check_blip_folder(sd_dir / "text_encoder")
    with pytest.raises(UserError, match="model_index.json"):
        families.load_pipeline(clip_dir)


def test_sd_folder_without_unet_is_refused(sd_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "sd"
    shutil.copytree(sd_dir, broken, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(UserError, match="unet"):
        families.check_pipeline_folder(broken)


@pytest.mark.parametrize("kind, weights", [
    ("sd", "unet/diffusion_pytorch_model"), ("clip", "open_clip_model"), ("blip", "model")])
def test_pickle_only_weights_are_refused(kind: str, weights: str, tmp_path: Path, request) -> None:
    folder = tmp_path / kind
    shutil.copytree(request.getfixturevalue(f"{kind}_dir"), folder)
    check = CHECKS[kind]
    check(folder)
    (folder / f"{weights}.safetensors").rename(folder / f"{weights}.bin")
    with pytest.raises(UserError, match="safetensors only"):
        check(folder)


@pytest.mark.parametrize("kind", ["sd", "clip", "blip"])
def test_copy_round_trip(kind: str, tmp_path: Path, request) -> None:
    src = request.getfixturevalue(f"{kind}_dir")
    COPIES[kind](src, tmp_path / "copy")
    CHECKS[kind](tmp_path / "copy")
    assert _same_weights(src, tmp_path / "copy")
    LOADERS[kind](tmp_path / "copy")
