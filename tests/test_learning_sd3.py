"""The learning check for the SD3 family: fine-tuned on two images, the tiny SD3 pipeline generates each of them.

As tests/test_learning.py does for SD2: finetune.run trains the smoke setting's tiny SD3 pipeline (flow matching, the
whole transformer) on two synthetic sketches and their captions until it has memorised them; StableDiffusion3Pipeline
then generates from the first caption (fixed seed, 10 Euler steps, output_type="latent"), and the latent must lie much
closer to the first image's latent than what the untouched pipeline generates. LoRA re-steers that model: trained on
the second sketch under the first one's caption, it must generate the second sketch from that caption, and its adapter,
loaded by diffusers' own `load_lora_weights` on the base pipeline, must give the images of the stage's fused folder.

Measured (2026-12-07, this 2-core CPU, one thread, the tiny VAE now shaped at fetch and the transformer built from a
forked RNG): full fine-tune 1.530 -> 0.317 from the first sketch's latent (ratio 4.82; latent RMS 1.020); LoRA
0.952 -> 0.704 from the second (ratio 1.35). Before (unshaped VAE): 1.547 -> 0.490 (3.16) and 1.086 -> 0.710 (1.53),
the loaded adapter and the fused folder within 4e-7; the breaks below were measured then. Each break in the SD3 training code fails the full fine-tune's test: latents not shifted before
scaling 0.541 (ratio 2.86, farther than half the latent's RMS), the target's sign flipped 2.857 (ratio 0.54), noise
levels from the unshifted linear schedule instead of the scheduler's sigma table 0.857 (ratio 1.80). The LoRA test
caught that the adapter was saved with SD2's key conversion (to_q/k/v/out renamed, dropped by load_lora_weights).

What makes memorising possible in a few hundred CPU steps, as for SD2: a near-deterministic VAE posterior (SD3's VAE
has no quant_conv: the encoder's conv_out gives mean and log-variance) and a scaling factor that gives the shifted
latents unit variance. Flow matching needs no change of prediction type: the velocity target already is exact at
every noise level.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import composed
from PIL import Image

from stages.finetune import Folders, run
from stylestudy.data import dataset, latents, sketches
from stylestudy.models import builders_sd3, families, vae_shaping
from stylestudy.models.families import sd3

SEED = 0
RESOLUTION = 32
INFERENCE_STEPS = 10
TRAINING = {"method": "full", "max_train_steps": 600, "learning_rate": 2e-3, "train_batch_size": 1, "gradient_accumulation_steps": 1,
            "lr_scheduler": "constant", "lr_warmup_steps": 0, "optimizer": "adamw", "gradient_checkpointing": False,
            "mixed_precision": "no", "use_ema": True, "ema_decay": 0.99, "checkpoint_every": 0, "validate_every": 0}
ENCODING = {"cache_latents": True, "resolution": RESOLUTION, "center_crop": True, "random_flip": False,
            "mixed_precision": "no", "dataloader_num_workers": 0}
BOTH = {"train_batch_size": 2}  # both sketches in every step, or the last one seen wins
LORA = {"method": "lora", "lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-2, "max_train_steps": 300}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


def pixels(raw: Path, row: dict) -> torch.Tensor:
    return dataset.train_transforms(RESOLUTION, True, False)(Image.open(raw / row["file_name"]))[None]


def make_memorisable(sd: Path, image: torch.Tensor) -> None:
    """A near-deterministic posterior and unit-variance shifted latents (see the docstring)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd / "vae")
    vae_shaping.make_posterior_deterministic(vae)  # SD3's VAE has no quant_conv: its encoder's last convolution
    vae_shaping.scale_to_unit_variance(vae, image)
    vae.save_pretrained(sd / "vae", safe_serialization=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("learning-sd3")
    sketches.make_synthetic_sketches(root / "raw", 2, RESOLUTION, SEED)
    rows = dataset.read_metadata(root / "raw")
    dataset.write_jsonl(root / "split-both" / "train.jsonl", rows)
    dataset.write_jsonl(root / "split-swap" / "train.jsonl", [rows[1] | {"text": rows[0]["text"]}])
    builders_sd3.save_random_sd3(root / "sd", SEED, "tiny")
    make_memorisable(root / "sd", pixels(root / "raw", rows[0]))
    params = composed("profile=smoke", "model=sd3")
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
                    output_type="latent", max_sequence_length=77).images


def distance(folder: Path, inputs: SimpleNamespace, image: int) -> tuple[float, float]:
    """RMS distance between what `folder` generates from the first caption and sketch `image`'s latent; the
    latent's RMS (the zero latent's distance)."""
    pipe = families.load_pipeline(folder)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels(inputs.raw, inputs.rows[image])).latent_dist.mean
    # written out, not the family's to_latents: a wrong shift in training must not move the target along with it
    target = (latent - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    return float((generated(pipe, inputs) - target).pow(2).mean().sqrt()), float(target.pow(2).mean().sqrt())


@pytest.fixture(scope="module")
def both(inputs: SimpleNamespace) -> Path:
    return finetune(inputs, inputs.sd, "both", "both", BOTH)


def test_full_finetune_memorises_the_image(inputs: SimpleNamespace, both: Path) -> None:
    base, size = distance(inputs.sd, inputs, 0)
    tuned, _ = distance(both, inputs, 0)
    print(f"sd3 full: base {base:.3f}, fine-tuned {tuned:.3f}, ratio {base / tuned:.2f}, latent RMS {size:.3f}")
    assert base / tuned > 2.5, f"generated latent {tuned:.3f} from the image's, the base model's {base:.3f}"
    assert tuned < size / 2, f"generated latent {tuned:.3f} from the image's, whose RMS is {size:.3f}"


@pytest.fixture(scope="module")
def lora(inputs: SimpleNamespace, both: Path) -> Path:
    return finetune(inputs, both, "swap", "lora", LORA)


def test_lora_finetune_re_steers_a_caption_to_the_other_image(inputs: SimpleNamespace, both: Path,
                                                               lora: Path) -> None:
    base, size = distance(both, inputs, 1)
    tuned, _ = distance(lora, inputs, 1)
    print(f"sd3 lora: base {base:.3f}, fine-tuned {tuned:.3f}, ratio {base / tuned:.2f}, latent RMS {size:.3f}")
    assert base / tuned > 1.35, f"generated latent {tuned:.3f} from the image's, the base model's {base:.3f}"


def test_diffusers_loads_the_adapter_and_gives_the_stage_s_images(inputs: SimpleNamespace, both: Path,
                                                                   lora: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    base = StableDiffusion3Pipeline.from_pretrained(both, use_safetensors=True)
    base.load_lora_weights(lora / "lora", weight_name="pytorch_lora_weights.safetensors")
    fused = families.load_pipeline(lora)
    torch.testing.assert_close(generated(base, inputs), generated(fused, inputs), atol=1e-4, rtol=1e-4)
