"""The tiny VAE made able to show a style: a randomly initialised decoder ignores its latent (measured: the same grey
image, mean 0.03 in [-1, 1], whatever latent it decodes), so no fine-tune of the UNet could change what the smoke
setting's evaluation sees. A few reconstruction steps on generated line drawings and on noise images, with the
posterior made near-deterministic and the latents scaled to unit variance as SD's were (tests/test_learning.py says
why both), give a VAE through which a fine-tuned UNet's latents decode to lighter, line-like images: the smoke
study's positive control (docs/study.md "Controls"). The UNet stays random: the base model's images are noise.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

STEPS = 40
BATCH_SKETCHES = 4
# As many noise images of every brightness: the decoder must read brightness from the latent, so the latents a
# random UNet samples decode to grey noise, away from the sketches' corner of latent space
BATCH_NOISE = 4
LEARNING_RATE = 3e-3
LOGVAR = -20.0  # posterior std exp(-10): the latent is its mean, as with a trained VAE
SHAPING_SEED = "vae-shaping"  # drawings of their own, never the dataset's (its test split is what evaluation uses)


def sketch_batch(size: int, count: int, rng: random.Random):
    """`count` generated line drawings as a tensor in [-1, 1], (count, 3, size, size)."""
    import numpy as np
    import torch

    from stylestudy.data.sketches import random_sketch

    images = [np.asarray(random_sketch(size, rng)[0].convert("RGB"), dtype=np.float32) for _ in range(count)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1


def make_posterior_deterministic(vae: AutoencoderKL) -> None:
    """The posterior's log-variance LOGVAR whatever the image, so its mean is the latent, as with a trained VAE. The
    layer that gives mean then log-variance: quant_conv (SD2), or the encoder's last convolution where there is none
    (SD3)."""
    import torch

    layer = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    channels = vae.config.latent_channels
    with torch.no_grad():
        layer.weight[channels:] = 0
        layer.bias[channels:] = LOGVAR


def scale_to_unit_variance(vae: AutoencoderKL, pixels) -> None:
    """scaling_factor = 1 / std of the latents of `pixels` (less the VAE's shift_factor, if any), as SD's was chosen."""
    import torch

    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
    shift = vae.config.shift_factor
    vae.register_to_config(scaling_factor=float(1 / (latents if shift is None else latents - shift).std()))


def shape_vae(vae: AutoencoderKL, size: int, seed: int, steps: int = STEPS) -> None:
    """Train `vae` in place (`steps` steps) to reconstruct line drawings and noise images, near-deterministic, latents
    unit-variance."""
    import torch

    rng = random.Random(f"{SHAPING_SEED}:{seed}")
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        make_posterior_deterministic(vae)
        trainable = [p for name, p in vae.named_parameters() if not name.startswith("quant_conv")]
        optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
        vae.train()
        for _ in range(steps):
            noise = (torch.rand(BATCH_NOISE, 3, 1, 1) * 2 - 1 + 0.3 * torch.randn(BATCH_NOISE, 3, size, size))
            batch = torch.cat([sketch_batch(size, BATCH_SKETCHES, rng), noise.clamp(-1, 1)])
            loss = torch.nn.functional.mse_loss(vae(batch).sample, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        vae.eval()
        scale_to_unit_variance(vae, sketch_batch(size, 64, rng))
