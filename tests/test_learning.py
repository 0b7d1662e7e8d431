"""A learning check that broken training cannot pass: fine-tuned on one image, the tiny pipeline generates that image.

finetune.run trains the smoke setting's tiny pipeline on one synthetic sketch and its caption until it has memorised
it; then the fine-tuned folder generates from that caption (fixed seed, a few steps, output_type="latent"), and the
latent must lie much closer to the image's latent than what the untouched pipeline generates, and closer than a third
of the latent's own size. Breaking the latent scale factor, the target of the prediction type, the noise schedule or
the EMA copy in the training code makes it fail (the numbers are in the comments by the thresholds).

Three changes to the random tiny pipeline make memorising one image possible in a few hundred CPU steps (measured
without each: the generated latent stays as far from the image's latent as the zero latent is):
- v-prediction (SD 2's 768-pixel model uses it; finetune reads it from the scheduler config). With epsilon
  prediction the x0 a sampler starts from at high noise is the UNet's error times sqrt((1 - a_t) / a_t), 14x at
  t = 999, and this UNet, whose 32-channel group norms are instance norms, never gets it that exact;
- a near-deterministic VAE posterior, as a trained VAE has: the random one's std (1.1) is four times its mean, so
  every step would train on a different, mostly random latent;
- the scaling factor chosen as SD's was, 1 / std of the latents: unit-variance latents, so that a latent trained
  without the factor (or with it twice) lands far from the image's latent.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import composed
from PIL import Image

from stages import builders, data, models, sketches
from stages.finetune import Folders, run

SEED = 0
RESOLUTION = 32
INFERENCE_STEPS = 10
LOGVAR = -20.0  # posterior std exp(-10) = 5e-5, against latents of std ~0.3 before scaling
TRAINING = {"max_train_steps": 400, "learning_rate": 2e-3, "train_batch_size": 1, "gradient_accumulation_steps": 1,
            "lr_scheduler": "constant", "lr_warmup_steps": 0, "optimizer": "adamw", "gradient_checkpointing": False,
            "mixed_precision": "no", "use_ema": True, "ema_decay": 0.99, "checkpoint_every": 0, "validate_every": 0,
            "cache_latents": True, "resolution": RESOLUTION, "center_crop": True, "random_flip": False}
LORA = {"method": "lora", "lora_rank": 8, "lora_alpha": 8, "learning_rate": 3e-3, "max_train_steps": 200}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny ops gain nothing from more threads, and one thread makes the numbers the same on every machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pixels(raw: Path, row: dict) -> torch.Tensor:
    """The image as training sees it: resized, center-cropped, not flipped, in [-1, 1], with a batch axis."""
    return data.train_transforms(RESOLUTION, True, False)(Image.open(raw / row["file_name"]))[None]


def make_memorisable(sd: Path, image: torch.Tensor) -> None:
    """v-prediction, a near-deterministic VAE posterior and a unit-variance scaling factor (see the docstring)."""
    from diffusers import AutoencoderKL

    config_file = sd / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"prediction_type": "v_prediction"}))
    vae = AutoencoderKL.from_pretrained(sd / "vae")
    channels = vae.config.latent_channels  # quant_conv gives the posterior's mean, then its log-variance
    with torch.no_grad():
        vae.quant_conv.weight[channels:] = 0
        vae.quant_conv.bias[channels:] = LOGVAR
        latent = vae.encode(image).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latent.std()))
    vae.save_pretrained(sd / "vae", safe_serialization=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The prepared tiny pipeline, two synthetic sketches and a one-row split for each, smoke finetune params."""
    root = tmp_path_factory.mktemp("learning")
    sketches.make_synthetic_sketches(root / "raw", 2, RESOLUTION, SEED)
    rows = data.read_metadata(root / "raw")
    splits = {"first": rows[:1], "both": rows, "swap": [rows[1] | {"text": rows[0]["text"]}]}
    for name, split in splits.items():
        data.write_jsonl(root / f"split-{name}" / "train.jsonl", split)
    builders.save_tiny_sd(root / "sd", SEED)
    make_memorisable(root / "sd", pixels(root / "raw", rows[0]))
    return SimpleNamespace(root=root, sd=root / "sd", raw=root / "raw", rows=rows,
                           params=composed("profile=smoke")["finetune"] | TRAINING)


def finetune(inputs: SimpleNamespace, start: Path, split: str, name: str, options: dict | None = None) -> Path:
    """finetune.run from the pipeline folder `start` on the rows of split-`split`; the fine-tuned folder."""
    root = inputs.root / name
    folders = Folders(sd=start, guide=root / "guide", raw=inputs.raw, split=inputs.root / f"split-{split}",
                      out=root / "out", live=root / "live", scratch=root / "scratch")
    run(folders, inputs.params | (options or {}), SEED, "A black and white sketch of")
    return folders.out


def distance(folder: Path, inputs: SimpleNamespace, image: int, caption: int) -> tuple[float, float]:
    """RMS distance between what `folder` generates from a caption and an image's latent; the latent's RMS (the
    distance of the zero latent)."""
    pipe = models.load_sd_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels(inputs.raw, inputs.rows[image])).latent_dist.mean
        target = latent * pipe.vae.config.scaling_factor
        # guidance_scale 1: the caption's prediction alone (the empty prompt was never trained on).
        generated = pipe(inputs.rows[caption]["text"], num_inference_steps=INFERENCE_STEPS, guidance_scale=1.0, height=RESOLUTION,
                         width=RESOLUTION, generator=torch.Generator().manual_seed(SEED), output_type="latent").images
    return float((generated - target).pow(2).mean().sqrt()), float(target.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def full(inputs: SimpleNamespace) -> Path:
    return finetune(inputs, inputs.sd, "first", "full")


def test_full_finetune_memorises_the_image(inputs: SimpleNamespace, full: Path) -> None:
    base, size = distance(inputs.sd, inputs, 0, 0)
    tuned, _ = distance(full, inputs, 0, 0)
    print(f"full: base {base:.3f}, fine-tuned {tuned:.3f}, ratio {base / tuned:.2f}, latent RMS {size:.3f}")
    assert base / tuned > 4.5, f"generated latent {tuned:.3f} from the image's, the base model's {base:.3f}"
    assert tuned < size / 3, f"generated latent {tuned:.3f} from the image's, whose RMS is {size:.3f}"


@pytest.fixture(scope="module")
def both(inputs: SimpleNamespace) -> Path:
    """A full fine-tune on both sketches, each with its caption: a base model that can draw the second one."""
    return finetune(inputs, inputs.sd, "both", "both", {"train_batch_size": 2, "max_train_steps": 200})


def test_lora_finetune_memorises_the_image(inputs: SimpleNamespace, both: Path) -> None:
    base, size = distance(both, inputs, 1, 0)
    tuned, _ = distance(finetune(inputs, both, "swap", "lora", LORA), inputs, 1, 0)
    print(f"lora: base {base:.3f}, fine-tuned {tuned:.3f}, ratio {base / tuned:.2f}, latent RMS {size:.3f}")
    assert base / tuned > 2.0, f"generated latent {tuned:.3f} from the image's, the base model's {base:.3f}"
    assert tuned < size / 2, f"generated latent {tuned:.3f} from the image's, whose RMS is {size:.3f}"


def unet_weights(folder: Path) -> torch.Tensor:
    """Every UNet weight of a pipeline folder, flattened into one vector."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return torch.cat([tensors[name].flatten().float() for name in sorted(tensors)])


def test_the_saved_unet_is_the_ema_copy(inputs: SimpleNamespace) -> None:
    """The EMA lags the trained weights: after a few steps it has moved from the base weights, less far than they."""
    options = {"max_train_steps": 10, "ema_decay": 0.9}
    ema = unet_weights(finetune(inputs, inputs.sd, "first", "ema", options))
    online = unet_weights(finetune(inputs, inputs.sd, "first", "online", options | {"use_ema": False}))
    base = unet_weights(inputs.sd)
    moved, lag = (ema - base).norm() / (online - base).norm(), (ema - online).norm() / (online - base).norm()
    print(f"ema: moved {moved:.3f} of the trained weights' way, {lag:.3f} of it behind them")
    assert 0.5 < moved < 0.99 and 0.01 < lag < 0.5
