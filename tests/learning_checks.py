"""What every family's learning check (tests/test_learning*.py) shares: the tiny pipeline made memorisable, the
sketches and their splits, finetune.run on a split, and the distance between what a folder generates and a sketch's
latent. Each check keeps its own settings, thresholds and measured figures; tests/test_learning.py says why the tiny
pipeline must be made memorisable."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import composed
from PIL import Image

from stages.finetune import Folders, run
from stylestudy.data import dataset, latents, sketches
from stylestudy.models import families, vae_shaping

SEED = 0
RESOLUTION = 32
INFERENCE_STEPS = 10
STYLE_PROMPT = "A black and white sketch of"
# Plain AdamW in fp32, one image a step; the EMA follows within the run (its decay is at most (1 + n) / (10 + n)).
TRAINING = {"learning_rate": 2e-3, "train_batch_size": 1, "gradient_accumulation_steps": 1, "lr_scheduler": "constant",
            "lr_warmup_steps": 0, "optimizer": "adamw", "gradient_checkpointing": False, "mixed_precision": "no",
            "use_ema": True, "ema_decay": 0.99, "checkpoint_every": 0, "validate_every": 0}
ENCODING = {"cache_latents": True, "resolution": RESOLUTION, "center_crop": True, "random_flip": False,
            "mixed_precision": "no", "dataloader_num_workers": 0}


def pixels(raw: Path, row: dict) -> torch.Tensor:
    """The image as training sees it: resized, center-cropped, not flipped, in [-1, 1], with a batch axis."""
    return dataset.train_transforms(RESOLUTION, True, False)(Image.open(raw / row["file_name"]))[None]


def make_memorisable(sd: Path, image: torch.Tensor, v_prediction: bool = False, spread_shift: bool = False) -> None:
    """A near-deterministic VAE posterior and unit-variance (shifted) latents of `image`; with `v_prediction` the
    folder's scheduler predicts v; with `spread_shift` the VAE's shift_factor is set one latent standard deviation past
    the latents' mean (FLUX's 0.1159 is lost in the tiny VAE's spread, and so was a training bug that dropped it)."""
    import json

    from diffusers import AutoencoderKL

    if v_prediction:
        config_file = sd / "scheduler" / "scheduler_config.json"
        config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"prediction_type": "v_prediction"}))
    vae = AutoencoderKL.from_pretrained(sd / "vae")
    vae_shaping.make_posterior_deterministic(vae)  # SD3's and FLUX's VAE have no quant_conv: the encoder's conv_out
    if spread_shift:
        with torch.no_grad():
            latent = vae.encode(image).latent_dist.mean
        vae.register_to_config(shift_factor=float(latent.mean() + latent.std()))
    vae_shaping.scale_to_unit_variance(vae, image)
    vae.save_pretrained(sd / "vae", safe_serialization=True)


def both_and_swap(rows: list[dict]) -> dict[str, list[dict]]:
    """The splits of two sketches: both with their captions; the second under the first one's caption (what a LoRA
    re-steers a caption to)."""
    return {"both": rows, "swap": [rows[1] | {"text": rows[0]["text"]}]}


def prepare(root: Path, model: str, build: Callable[[Path], object], count: int,
            splits: Callable[[list[dict]], dict[str, list[dict]]], training: dict, **memorisable: bool) \
        -> SimpleNamespace:
    """`count` synthetic sketches under root/raw, each of `splits(rows)` as root/split-<name>/train.jsonl, the tiny
    pipeline `build` writes made memorisable on the first sketch, and the smoke params of `-S model=<model>` with
    `training` over its finetune section."""
    sketches.make_synthetic_sketches(root / "raw", count, RESOLUTION, SEED)
    rows = dataset.read_metadata(root / "raw")
    for name, split in splits(rows).items():
        dataset.write_jsonl(root / f"split-{name}" / "train.jsonl", split)
    build(root / "sd")
    make_memorisable(root / "sd", pixels(root / "raw", rows[0]), **memorisable)
    params = composed("profile=smoke", f"model={model}")
    return SimpleNamespace(root=root, sd=root / "sd", raw=root / "raw", rows=rows,
                           params=params["finetune"] | training, family=families.from_params(params["model"]),
                           encoding=latents.EncodeSettings(**params["encode"] | ENCODING))


def finetune(inputs: SimpleNamespace, start: Path, split: str, name: str, options: dict | None = None) -> Path:
    """finetune.run from the pipeline folder `start` on the rows of split-`split`; the fine-tuned folder."""
    root = inputs.root / name
    folders = Folders(sd=start, guide=root / "guide", raw=inputs.raw, split=inputs.root / f"split-{split}",
                      out=root / "out", live=root / "live", scratch=root / "scratch")
    run(folders, inputs.params | (options or {}), inputs.encoding, SEED, STYLE_PROMPT, inputs.family)
    return folders.out


def generated(pipe, inputs: SimpleNamespace, caption: int = 0) -> torch.Tensor:
    """The (unpacked) latent a pipeline generates from a sketch's caption (guidance 1: the caption's prediction alone,
    the empty prompt was never trained on; FLUX's distilled guidance at the value it trained with)."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        images = pipe(inputs.rows[caption]["text"], num_inference_steps=INFERENCE_STEPS, guidance_scale=1.0,
                      height=RESOLUTION, width=RESOLUTION, generator=torch.Generator().manual_seed(SEED),
                      output_type="latent", **inputs.family.generation_kwargs()).images
    if images.dim() == 3:  # FluxPipeline returns its packed tokens
        return pipe._unpack_latents(images, RESOLUTION, RESOLUTION, pipe.vae_scale_factor)
    return images


def distance(folder: Path, inputs: SimpleNamespace, image: int, caption: int = 0) -> tuple[float, float]:
    """RMS distance between what `folder` generates from a caption and sketch `image`'s latent; the latent's RMS (the
    zero latent's distance)."""
    pipe = families.load_pipeline(folder)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels(inputs.raw, inputs.rows[image])).latent_dist.mean
    # written out, not the family's to_latents: a wrong shift or scale in training must not move the target with it
    config = pipe.vae.config
    target = (latent - (config.shift_factor or 0.0)) * config.scaling_factor
    return float((generated(pipe, inputs, caption) - target).pow(2).mean().sqrt()), float(target.pow(2).mean().sqrt())


def assert_draws_closer(label: str, inputs: SimpleNamespace, base: Path, tuned: Path, image: int, ratio: float,
                        within: float | None = None) -> None:
    """What `tuned` generates from the first caption lies more than `ratio` times closer to sketch `image`'s latent
    than what `base` generates (and, given `within`, closer than that share of the latent's RMS); prints the figures."""
    far, size = distance(base, inputs, image)
    near, _ = distance(tuned, inputs, image)
    print(f"{label}: base {far:.3f}, fine-tuned {near:.3f}, ratio {far / near:.2f}, latent RMS {size:.3f}")
    assert far / near > ratio, f"generated latent {near:.3f} from the image's, the base model's {far:.3f}"
    assert within is None or near < size * within, \
        f"generated latent {near:.3f} from the image's, whose RMS is {size:.3f}"


def assert_the_adapter_gives_the_fused_images(inputs: SimpleNamespace, base: Path, tuned: Path) -> None:
    """The adapter of `tuned`, loaded by diffusers' own load_lora_weights on the pipeline of `base`, generates the
    images of the fused folder `tuned` (within 1e-4)."""
    pipe = inputs.family.load_pipeline(base)  # the family's diffusers pipeline class, from_pretrained
    pipe.load_lora_weights(tuned / "lora", weight_name="pytorch_lora_weights.safetensors")
    fused = families.load_pipeline(tuned)
    torch.testing.assert_close(generated(pipe, inputs), generated(fused, inputs), atol=1e-4, rtol=1e-4)

