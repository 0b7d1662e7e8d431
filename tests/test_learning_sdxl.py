"""The learning check for the SDXL family: fine-tuned on two images, the tiny SDXL pipeline generates each of them.

As tests/test_learning.py and test_learning_sd3.py do for SD2 and SD3: finetune.run trains the smoke setting's tiny
SDXL pipeline (the whole UNet) on two synthetic sketches and their captions until it has memorised them;
StableDiffusionXLPipeline then generates from the first caption (fixed seed, 10 Euler steps, its own time ids for a
32 x 32 image, output_type="latent"), and the latent must lie much closer to the first image's latent than what the
untouched pipeline generates. LoRA re-steers that model: trained on the second sketch under the first one's caption,
it must generate the second sketch from that caption, and its adapter, loaded by diffusers' own `load_lora_weights` on
the base pipeline, must give the images of the stage's fused folder (within 1e-4).

What makes memorising possible in a few hundred CPU steps is SD2's learning check's (test_learning.py says why):
v-prediction in the folder's scheduler (the family reads it, as it would from a v-prediction SDXL), a near-deterministic
VAE posterior and unit-variance latents.

Measured (2026-12-07, this 2-core CPU under heavy load, one thread; tiny UNet with cross-attention at both levels):
full fine-tune 1.395 -> 0.192 from the first sketch's latent (ratio 7.26; latent RMS 1.038); LoRA 0.774 -> 0.199
from the second (ratio 3.89); the loaded adapter and the fused folder agree within 1e-4. Breaks tried once each in the
training code, the full fine-tune's test: the target of the other prediction type (epsilon's under a v-prediction
scheduler) 0.839 (ratio 1.66: fails); latents not multiplied by the scaling factor 0.748 (ratio 1.86:
fails). Not caught: the time ids and the pooled embedding zeroed in training, 0.205 (ratio 6.80): a model that memorises two captions needs neither, and the generating pipeline's real time ids move it
little; tests/test_sdxl.py checks them (the UNet's added_cond_kwargs, the crop records) instead.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import composed
from PIL import Image

from stages.finetune import Folders, run
from stylestudy.data import dataset, latents, sketches
from stylestudy.models import builders_sdxl, families, vae_shaping

SEED = 0
RESOLUTION = 32
INFERENCE_STEPS = 10
TRAINING = {"method": "full", "max_train_steps": 400, "learning_rate": 2e-3, "train_batch_size": 1,
            "gradient_accumulation_steps": 1, "lr_scheduler": "constant", "lr_warmup_steps": 0, "optimizer": "adamw",
            "gradient_checkpointing": False, "mixed_precision": "no", "use_ema": True, "ema_decay": 0.99,
            "checkpoint_every": 0, "validate_every": 0}
ENCODING = {"cache_latents": True, "resolution": RESOLUTION, "center_crop": True, "random_flip": False,
            "mixed_precision": "no", "dataloader_num_workers": 0}
BOTH = {"train_batch_size": 2}  # both sketches in every step, or the last one seen wins
LORA = {"method": "lora", "lora_rank": 8, "lora_alpha": 8, "learning_rate": 3e-3, "max_train_steps": 200}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def pixels(raw: Path, row: dict) -> torch.Tensor:
    return dataset.train_transforms(RESOLUTION, True, False)(Image.open(raw / row["file_name"]))[None]


def make_memorisable(sd: Path, image: torch.Tensor) -> None:
    """v-prediction, a near-deterministic VAE posterior and unit-variance latents (see the docstring)."""
    from diffusers import AutoencoderKL

    config_file = sd / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"prediction_type": "v_prediction"}))
    vae = AutoencoderKL.from_pretrained(sd / "vae")
    vae_shaping.make_posterior_deterministic(vae)
    vae_shaping.scale_to_unit_variance(vae, image)
    vae.save_pretrained(sd / "vae", safe_serialization=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("learning-sdxl")
    sketches.make_synthetic_sketches(root / "raw", 2, RESOLUTION, SEED)
    rows = dataset.read_metadata(root / "raw")
    dataset.write_jsonl(root / "split-both" / "train.jsonl", rows)
    dataset.write_jsonl(root / "split-swap" / "train.jsonl", [rows[1] | {"text": rows[0]["text"]}])
    builders_sdxl.save_random_sdxl(root / "sd", SEED, "tiny", shaped=False)
    make_memorisable(root / "sd", pixels(root / "raw", rows[0]))
    params = composed("profile=smoke", "model=sdxl")
    return SimpleNamespace(root=root, sd=root / "sd", raw=root / "raw", rows=rows,
                           params=params["finetune"] | TRAINING, family=families.from_params(params["model"]),
                           encoding=latents.EncodeSettings(**params["encode"] | ENCODING))


def finetune(inputs: SimpleNamespace, start: Path, split: str, name: str, options: dict) -> Path:
    root = inputs.root / name
    folders = Folders(sd=start, guide=root / "guide", raw=inputs.raw, split=inputs.root / f"split-{split}",
                      out=root / "out", live=root / "live", scratch=root / "scratch")
    run(folders, inputs.params | options, inputs.encoding, SEED, "A black and white sketch of", inputs.family)
    return folders.out


def generated(pipe, inputs: SimpleNamespace) -> torch.Tensor:
    """The latent a pipeline generates from the first sketch's caption (guidance 1: the caption alone)."""
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(inputs.rows[0]["text"], num_inference_steps=INFERENCE_STEPS, guidance_scale=1.0,
                    height=RESOLUTION, width=RESOLUTION, generator=torch.Generator().manual_seed(SEED),
                    output_type="latent").images


def distance(folder: Path, inputs: SimpleNamespace, image: int) -> tuple[float, float]:
    """RMS distance between what `folder` generates from the first caption and sketch `image`'s latent; the
    latent's RMS (the zero latent's distance)."""
    pipe = families.load_pipeline(folder)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels(inputs.raw, inputs.rows[image])).latent_dist.mean
    # written out, not the family's to_latents: a wrong scaling in training must not move the target along with it
    target = latent * pipe.vae.config.scaling_factor
    return float((generated(pipe, inputs) - target).pow(2).mean().sqrt()), float(target.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def both(inputs: SimpleNamespace) -> Path:
    return finetune(inputs, inputs.sd, "both", "both", BOTH)


def test_full_finetune_memorises_the_image(inputs: SimpleNamespace, both: Path) -> None:
    base, size = distance(inputs.sd, inputs, 0)
    tuned, _ = distance(both, inputs, 0)
    print(f"sdxl full: base {base:.3f}, fine-tuned {tuned:.3f}, ratio {base / tuned:.2f}, latent RMS {size:.3f}")
    assert base / tuned > 2.5, f"generated latent {tuned:.3f} from the image's, the base model's {base:.3f}"
    assert tuned < size / 2, f"generated latent {tuned:.3f} from the image's, whose RMS is {size:.3f}"


@pytest.fixture(scope="module")
def lora(inputs: SimpleNamespace, both: Path) -> Path:
    return finetune(inputs, both, "swap", "lora", LORA)


def test_lora_finetune_re_steers_a_caption_to_the_other_image(inputs: SimpleNamespace, both: Path,
                                                               lora: Path) -> None:
    base, size = distance(both, inputs, 1)
    tuned, _ = distance(lora, inputs, 1)
    print(f"sdxl lora: base {base:.3f}, fine-tuned {tuned:.3f}, ratio {base / tuned:.2f}, latent RMS {size:.3f}")
    assert base / tuned > 1.35, f"generated latent {tuned:.3f} from the image's, the base model's {base:.3f}"


def test_diffusers_loads_the_adapter_and_gives_the_stage_s_images(inputs: SimpleNamespace, both: Path,
                                                                   lora: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline.from_pretrained(both, use_safetensors=True, add_watermarker=False)
    base.load_lora_weights(lora / "lora", weight_name="pytorch_lora_weights.safetensors")
    fused = families.load_pipeline(lora)
    torch.testing.assert_close(generated(base, inputs), generated(fused, inputs), atol=1e-4, rtol=1e-4)
