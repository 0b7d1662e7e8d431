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
from learning_checks import (TRAINING, assert_draws_closer, assert_the_adapter_gives_the_fused_images, both_and_swap,
                             finetune, prepare)

from stylestudy.models import builders_sd3

BOTH = {"train_batch_size": 2}  # both sketches in every step, or the last one seen wins
LORA = {"method": "lora", "lora_rank": 8, "lora_alpha": 8, "learning_rate": 1e-2, "max_train_steps": 300}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return prepare(tmp_path_factory.mktemp("learning-sd3"), "sd3",
                   lambda sd: builders_sd3.save_random_sd3(sd, 0, "tiny"), 2, both_and_swap,
                   TRAINING | {"method": "full", "max_train_steps": 600})


@pytest.fixture(scope="module")
def both(inputs: SimpleNamespace) -> Path:
    return finetune(inputs, inputs.sd, "both", "both", BOTH)


def test_full_finetune_memorises_the_image(inputs: SimpleNamespace, both: Path) -> None:
    assert_draws_closer("sd3 full", inputs, inputs.sd, both, 0, 2.5, within=1 / 2)


@pytest.fixture(scope="module")
def lora(inputs: SimpleNamespace, both: Path) -> Path:
    return finetune(inputs, both, "swap", "lora", LORA)


def test_lora_finetune_re_steers_a_caption_to_the_other_image(inputs: SimpleNamespace, both: Path,
                                                               lora: Path) -> None:
    assert_draws_closer("sd3 lora", inputs, both, lora, 1, 1.35)


def test_diffusers_loads_the_adapter_and_gives_the_stage_s_images(inputs: SimpleNamespace, both: Path,
                                                                   lora: Path) -> None:
    assert_the_adapter_gives_the_fused_images(inputs, both, lora)
