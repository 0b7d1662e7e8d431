"""Validation while fine-tuning: a loss on the val split at fixed noise and timesteps, and images at fixed seeds.

Both are deterministic, so the curves of two experiments compare, and neither draws from the global RNG: a resumed
run must still end bit for bit like an uninterrupted one. `ValidationSet.build` encodes what it needs with the frozen
encoders and keeps only the VAE, for decoding: the text encoders can go once the training data is cached.

The loss: at most MAX_IMAGES val images, center-cropped at the training resolution without flip, as the mean of
their VAE latent distribution (no sampling); each image is noised at TIMESTEPS_PER_IMAGE timesteps, and all
timesteps together are spread evenly over the schedule; the noise comes from a generator seeded with the run's seed.
The noising and the target are the training ones (the model family's noise process).

The images: the family's sampler (SD2: DDIM, eta 0, from the noise scheduler's config), classifier-free guidance
GUIDANCE_SCALE, image i from a generator seeded with seed + i, so any image can be made again alone.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from stylestudy.data import dataset
from stylestudy.models.families import Conditioning, Family, FrozenEncoders, NoiseProcess

log = logging.getLogger(__name__)

MAX_IMAGES = 16  # val images in the loss: enough for a trend, cheap enough for every validation
TIMESTEPS_PER_IMAGE = 4  # an image's share of the schedule: early, middle and late noise levels all count
UNET_BATCH = 16  # UNet inputs at a time in the loss
GUIDANCE_SCALE = 7.5


@dataclass(frozen=True)
class LossInputs:
    """The val loss's fixed inputs, one row per (image, timestep): scaled latents, conditioning, noise, timesteps."""

    latents: Any
    conditioning: Conditioning
    noise: Any
    timesteps: Any


@contextlib.contextmanager
def evaluating(unet: Any) -> Iterator[None]:
    """Eval mode, no gradients and eager execution inside; the UNet's mode restored after."""
    import torch

    was_training = unet.training
    unet.eval()
    # A compiled UNet would compile again for eval mode and for every new batch shape: minutes for a few forwards.
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            yield
    finally:
        unet.train(was_training)


def encode_val_images(raw: Path, rows: list[dict], encoders: FrozenEncoders, resolution: int) -> tuple[Any, Any]:
    """Scaled latent means (fp32, on the training device) of the rows' images, center-cropped, unflipped, and their
    crop records (on the training device)."""
    import torch

    images = dataset.CaptionedImages(raw, rows, dataset.train_transforms(resolution, True, False))
    items = [images[i] for i in range(len(images))]
    mean = encoders.latent_distribution(torch.stack([item["pixel_values"] for item in items])).mean.float()
    crops = torch.stack([item["crop"] for item in items]).to(encoders.device)
    return encoders.family.to_latents(encoders.vae.config, mean), crops


def whole_frame(resolution: int, rows: int) -> Any:
    """Crop records of `rows` images generated whole at resolution x resolution (SDXL's pipeline's time ids)."""
    import torch

    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]]).repeat(rows, 1)


def loss_inputs(raw: Path, rows: list[dict], encoders: FrozenEncoders, noise_process: NoiseProcess, resolution: int,
                seed: int) -> LossInputs:
    """Each image repeated TIMESTEPS_PER_IMAGE times; row k * n + i is image i at the (k * n + i)-th timestep."""
    import torch

    image_latents, crops = encode_val_images(raw, rows, encoders, resolution)
    rows_total = len(rows) * TIMESTEPS_PER_IMAGE
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((rows_total, *image_latents.shape[1:]), generator=generator)
    device = encoders.device
    return LossInputs(latents=image_latents.repeat(TIMESTEPS_PER_IMAGE, 1, 1, 1),
                      conditioning=encoders.encode_text([row["text"] for row in rows]).with_crops(crops)
                      .repeat(TIMESTEPS_PER_IMAGE),
                      noise=noise.to(device), timesteps=noise_process.spread_timesteps(rows_total).to(device))


def to_pil(pixels: Any) -> Image.Image:
    """One decoded image (C x H x W in [-1, 1]) as an 8-bit RGB PIL image, rounded as diffusers rounds."""
    array = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((array * 255).round().astype("uint8"))


@dataclass
class ValidationSet:
    """What a validation needs once the text encoders are freed: fixed loss inputs (None without val images), the
    prompt's conditioning (unconditional, conditional), the VAE, the family and noise process, and the settings."""

    loss: LossInputs | None
    prompt: Conditioning
    vae: Any
    family: Family
    noise: NoiseProcess
    resolution: int
    n_images: int
    steps: int
    seed: int

    @classmethod
    def build(cls, raw: Path, val_rows: list[dict], encoders: FrozenEncoders, noise: NoiseProcess, p: dict,
              resolution: int, seed: int) -> ValidationSet:
        """Encode the val images and the prompt now, with the frozen encoders."""
        rows = val_rows[:MAX_IMAGES]
        loss = loss_inputs(raw, rows, encoders, noise, resolution, seed) if rows else None
        if not rows:
            log.info("the val split is empty: no val loss, validation images only")
        prompt = encoders.encode_text(["", p["validation_prompt"]])
        prompt = prompt.with_crops(whole_frame(resolution, 2).to(prompt.sequence.device))
        return cls(loss=loss, prompt=prompt, vae=encoders.vae,
                   family=encoders.family, noise=noise, resolution=resolution, n_images=p["validation_images"],
                   steps=p["validation_steps"], seed=seed)

    def val_loss(self, denoiser: Any) -> float | None:
        """Mean squared error of the denoiser's prediction on the fixed val inputs; None without val images."""
        import torch.nn.functional as F

        if self.loss is None:
            return None
        x, dtype, total = self.loss, denoiser.dtype, 0.0
        with evaluating(denoiser):
            for start in range(0, len(x.timesteps), UNET_BATCH):
                part = slice(start, start + UNET_BATCH)
                clean, noise, timesteps = x.latents[part], x.noise[part], x.timesteps[part]
                noisy = self.noise.noised(clean, noise, timesteps)
                target = self.noise.target(clean, noise, timesteps)
                conditioning = x.conditioning.rows(part).to(None, dtype)
                prediction = self.family.denoise(denoiser, noisy.to(dtype), timesteps, conditioning)
                total += F.mse_loss(prediction.float(), target.float(), reduction="sum").item()
        return total / x.noise.numel()

    def images(self, denoiser: Any) -> list[Image.Image]:
        """validation_images images of the prompt at resolution x resolution, image i from seed + i."""
        with evaluating(denoiser):
            return [self.sample(denoiser, self.seed + i) for i in range(self.n_images)]

    def sample(self, denoiser: Any, seed: int) -> Image.Image:
        """One image from noise seeded with `seed`, by the family's sampler, decoded by the VAE."""
        shape = self.family.latent_shape(self.vae, denoiser, self.resolution)
        x = self.family.sample(denoiser, self.noise, self.prompt, shape, self.steps, GUIDANCE_SCALE, seed)
        decoded = self.vae.decode(self.family.from_latents(self.vae.config, x).to(self.vae.dtype), return_dict=False)[0]
        return to_pil(decoded[0])

    def log(self, live: Any, unet: Any, step: int) -> float | None:
        """Log val_loss and the images validation/<i>.png (overwritten each time) to dvclive; return the val loss.

        Call it before the step's train metrics are committed with live.next_step(), so that they share a row."""
        loss = self.val_loss(unet)
        if loss is not None:
            live.log_metric("val_loss", loss)
        for i, image in enumerate(self.images(unet)):
            live.log_image(f"validation/{i}.png", image)
        log.info("validation at step %d: val loss %s", step, "n/a" if loss is None else f"{loss:.4f}")
        return loss
