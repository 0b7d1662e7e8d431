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
little; tests/test_sdxl.py checks them (the UNet's added_cond_kwargs, the crop records) instead, and
tests/test_conditioning_path.py that either, zeroed on the way from the cached encoding to the UNet, fails.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from learning_checks import (TRAINING, assert_draws_closer, assert_the_adapter_gives_the_fused_images, both_and_swap,
                             finetune, prepare)

from stylestudy.models import builders_sdxl

BOTH = {"train_batch_size": 2}  # both sketches in every step, or the last one seen wins
LORA = {"method": "lora", "lora_rank": 8, "lora_alpha": 8, "learning_rate": 3e-3, "max_train_steps": 200}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return prepare(tmp_path_factory.mktemp("learning-sdxl"), "sdxl",
                   lambda sd: builders_sdxl.save_random_sdxl(sd, 0, "tiny", shaped=False), 2,
                   both_and_swap,
                   TRAINING | {"method": "full", "max_train_steps": 400}, v_prediction=True)


@pytest.fixture(scope="module")
def both(inputs: SimpleNamespace) -> Path:
    return finetune(inputs, inputs.sd, "both", "both", BOTH)


def test_full_finetune_memorises_the_image(inputs: SimpleNamespace, both: Path) -> None:
    assert_draws_closer("sdxl full", inputs, inputs.sd, both, 0, 2.5, within=1 / 2)


@pytest.fixture(scope="module")
def lora(inputs: SimpleNamespace, both: Path) -> Path:
    return finetune(inputs, both, "swap", "lora", LORA)


def test_lora_finetune_re_steers_a_caption_to_the_other_image(inputs: SimpleNamespace, both: Path,
                                                               lora: Path) -> None:
    assert_draws_closer("sdxl lora", inputs, both, lora, 1, 1.35)


def test_diffusers_loads_the_adapter_and_gives_the_stage_s_images(inputs: SimpleNamespace, both: Path,
                                                                   lora: Path) -> None:
    assert_the_adapter_gives_the_fused_images(inputs, both, lora)
