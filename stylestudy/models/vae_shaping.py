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


def shape_vae(vae: AutoencoderKL, size: int, seed: int) -> None:
    """Train `vae` in place to reconstruct line drawings and noise images, near-deterministic, latents unit-variance."""
    import torch

    rng = random.Random(f"{SHAPING_SEED}:{seed}")
    channels = vae.config.latent_channels
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        with torch.no_grad():  # quant_conv gives the posterior's mean, then its log-variance
            vae.quant_conv.weight[channels:] = 0
            vae.quant_conv.bias[channels:] = LOGVAR
        trainable = [p for name, p in vae.named_parameters() if not name.startswith("quant_conv")]
        optimizer = torch.optim.Adam(trainable, lr=LEARNING_RATE)
        vae.train()
        for _ in range(STEPS):
            noise = (torch.rand(BATCH_NOISE, 3, 1, 1) * 2 - 1 + 0.3 * torch.randn(BATCH_NOISE, 3, size, size))
            batch = torch.cat([sketch_batch(size, BATCH_SKETCHES, rng), noise.clamp(-1, 1)])
            loss = torch.nn.functional.mse_loss(vae(batch).sample, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        vae.eval()
        with torch.no_grad():
            latents = vae.encode(sketch_batch(size, 64, rng)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
