"""A learning check that broken training cannot pass: fine-tuned on one image, the tiny pipeline generates that image.

finetune.run trains the smoke setting's tiny pipeline on one synthetic sketch and its caption until it has memorised
it; the fine-tuned folder then generates from that caption (fixed seed, a few steps, output_type="latent"), and the
latent must lie much closer to the image's latent than what the untouched pipeline generates, and within a third of
the latent's own size. The same for a LoRA fine-tune, and the saved UNet must be the EMA copy.

Each of these breaks in the training code fails the full fine-tune's test, and all but the other betas the LoRA's
too: latents not multiplied by the scaling factor, the target of the other prediction type, a training noise scheduler
with other betas (`DDPMScheduler(prediction_type=...)`, linear 1e-4..0.02), EMA weights never stepped. A skipped EMA
copy fails the last test. (Measured with the tiny VAE that downsamples 4x, 8x8 latents; figures marked "2x VAE" are
from the earlier one, 16x16 latents.) Not caught: noising with other betas while the velocity target keeps the model's schedule. A model that
has memorised one image barely reads the noise in x_t, and the two schedules agree below t = 100, where the last
sampling steps correct what the earlier ones left.

Three changes to the random tiny pipeline make memorising possible in a few hundred CPU steps. Without any one of
them the generated latent ends no closer to the image's latent than the zero latent is (measured, in latent RMS):
- v-prediction (SD 2's 768-pixel model uses it; finetune reads it from the scheduler config). With epsilon the
  sampler's first estimates of x0 carry the UNet's error times sqrt((1 - a_t) / a_t), 14x at t = 999, and the tiny
  UNet never gets that exact: 1.23 from the image, against 1.05 for the zero latent;
- a near-deterministic VAE posterior, as a trained VAE has: the random one's std (1.1) is four times its mean, so
  each step would train on a mostly random latent: 4.05 against 1.05;
- the scaling factor chosen as SD's was, 1 / std of the latents: unit-variance latents. With SD's 0.18215 the
  latents (RMS 0.05) drown in the sampler's errors (0.15 against 0.05), and a latent left unscaled would look no
  worse than a scaled one.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from learning_checks import TRAINING, assert_draws_closer, both_and_swap, finetune, prepare

from stylestudy.models import builders

BOTH = {"train_batch_size": 2, "max_train_steps": 200}  # both sketches in every step, or the last one seen wins
LORA = {"method": "lora", "lora_rank": 8, "lora_alpha": 8, "learning_rate": 3e-3, "max_train_steps": 200}

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The prepared tiny pipeline, two synthetic sketches, their splits, and the smoke finetune params."""
    return prepare(tmp_path_factory.mktemp("learning"), "sd2", lambda sd: builders.save_tiny_sd(sd, 0), 2,
                   lambda rows: {"first": rows[:1]} | both_and_swap(rows),
                   TRAINING | {"max_train_steps": 400}, v_prediction=True)


@pytest.fixture(scope="module")
def full(inputs: SimpleNamespace) -> Path:
    return finetune(inputs, inputs.sd, "first", "full")


def test_full_finetune_memorises_the_image(inputs: SimpleNamespace, full: Path) -> None:
    # Measured (2026-12-07, the shaped tiny VAE): base 1.372, fine-tuned 0.202 (ratio 6.8). Before: base 1.422,
    # fine-tuned 0.230 (ratio 6.2; 2x VAE: 6.1, and 5.2 and 5.4 with seeds 1 and 42), latent RMS
    # 1.066. Broken: no scaling factor 0.910 (ratio 1.6), other prediction type 0.922 (1.5), other betas 0.339 (4.2),
    # EMA never stepped 1.422 (1.0).
    assert_draws_closer("full", inputs, inputs.sd, full, 0, 4.5, within=1 / 3)


@pytest.fixture(scope="module")
def both(inputs: SimpleNamespace) -> Path:
    """A full fine-tune on both sketches, each with its caption: a base that can draw the second sketch."""
    return finetune(inputs, inputs.sd, "both", "both", BOTH)


def test_lora_finetune_memorises_the_image(inputs: SimpleNamespace, both: Path) -> None:
    """LoRA on the second sketch under the first one's caption, from a base that draws the first for that caption.

    A LoRA adapts the attention projections only: it re-steers a model that can draw the image, it does not make one
    that cannot. Measured (2x VAE): from the random pipeline 1.51 -> 1.19 at best (the zero latent: 1.05); from the one-sketch
    model to the other sketch 0.91 -> 0.72 at best (rank 8 to 32, learning rate 3e-3 to 3e-2, up to 600 steps; 0.63
    after 1000).
    """
    # Measured (2026-12-07, the shaped tiny VAE): base 0.897, fine-tuned 0.322 (ratio 2.8). Before: base 0.937,
    # fine-tuned 0.332 (ratio 2.8; 2x VAE: 2.9, and 3.2 and 2.2 with seeds 1 and 42), latent RMS
    # 1.051. Broken: no scaling factor ratio 1.0, other prediction type 1.0, EMA never stepped 1.0; other betas 2.2
    # passes here (2x VAE: 1.5), the full fine-tune's test catches it.
    assert_draws_closer("lora", inputs, both, finetune(inputs, both, "swap", "lora", LORA), 1, 2.0, within=1 / 2)


def unet_weights(folder: Path) -> torch.Tensor:
    """Every UNet weight of a pipeline folder, flattened into one vector."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    return torch.cat([tensors[name].flatten().float() for name in sorted(tensors)])


def test_the_saved_unet_is_the_ema_copy(inputs: SimpleNamespace) -> None:
    """The EMA lags the trained weights: it has moved from the base weights, less far than they.

    The memorising tests cannot see an EMA copy that was skipped: the trained weights memorise too (2x VAE: ratio 5.0
    instead of 6.1). Same seed, so the run without EMA trains the very weights the EMA of the other one follows.
    """
    options = {"max_train_steps": 10, "ema_decay": 0.9}
    ema = unet_weights(finetune(inputs, inputs.sd, "first", "ema", options))
    online = unet_weights(finetune(inputs, inputs.sd, "first", "online", options | {"use_ema": False}))
    base = unet_weights(inputs.sd)
    way = (online - base).norm()
    moved, behind = float((ema - base).norm() / way), float((ema - online).norm() / way)
    print(f"ema: moved {moved:.3f} of the trained weights' way, {behind:.3f} of it behind them")
    # Measured: moved 0.943, behind 0.074 (2x VAE: 0.944 and 0.073, the same with seeds 1 and 42). EMA copy skipped: 1.000 and 0.000; EMA never
    # stepped: 0.000 and 1.000.
    assert 0.5 < moved < 0.99 and 0.01 < behind < 0.5
