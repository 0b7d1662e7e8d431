"""Validation while fine-tuning: a loss on the val split at fixed noise and timesteps, and images at fixed seeds.

Both are deterministic, so the curves of two experiments compare, and neither draws from the global RNG: a resumed
run must still end bit for bit like an uninterrupted one. `ValidationSet.build` encodes what it needs while the VAE
and text encoder exist (before the latent cache frees them) and keeps its own reference to the VAE for decoding.

The loss: at most MAX_IMAGES val images, center-cropped at the training resolution without flip, as the mean of
their VAE latent distribution (no sampling); each image is noised at TIMESTEPS_PER_IMAGE timesteps, and all
timesteps together are spread evenly over the schedule; the noise comes from a generator seeded with the run's seed.
The target is the training one (epsilon or v-prediction, from the noise scheduler's config).

The images: DDIM (eta 0, so no noise is drawn after the first) from the noise scheduler's config, classifier-free
guidance GUIDANCE_SCALE, image i from a generator seeded with seed + i, so any image can be made again alone.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from stylestudy.data import dataset

log = logging.getLogger(__name__)

MAX_IMAGES = 16  # val images in the loss: enough for a trend, cheap enough for every validation
TIMESTEPS_PER_IMAGE = 4  # an image's share of the schedule: early, middle and late noise levels all count
UNET_BATCH = 16  # UNet inputs at a time in the loss
GUIDANCE_SCALE = 7.5


@dataclass(frozen=True)
class LossInputs:
    """The val loss's fixed inputs, one row per (image, timestep): scaled latents, text embeddings, noise, timesteps."""

    latents: Any
    text: Any
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


def encode_val_images(raw: Path, rows: list[dict], parts: dict, resolution: int) -> Any:
    """Scaled latent means (fp32, on the training device) of the rows' images, center-cropped, unflipped."""
    import torch

    images = dataset.CaptionedImages(raw, rows, dataset.train_transforms(resolution, True, False))
    pixels = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
    with torch.no_grad():
        dist = parts["vae"].encode(pixels.to(parts["device"], dtype=parts["frozen_dtype"])).latent_dist
    return dist.mean.float() * parts["latent_scale"]


def encode_texts(texts: list[str], parts: dict) -> Any:
    """Text embeddings (compute dtype, on the training device), one per text, padded as in training."""
    import torch

    tokenizer = parts["tokenizer"]
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                       return_tensors="pt")
    with torch.no_grad():
        return parts["text_encoder"](tokens.input_ids.to(parts["device"]), return_dict=False)[0]


def loss_inputs(raw: Path, rows: list[dict], parts: dict, resolution: int, seed: int) -> LossInputs:
    """Each image repeated TIMESTEPS_PER_IMAGE times; row k * n + i is image i at the (k * n + i)-th timestep."""
    import torch

    image_latents = encode_val_images(raw, rows, parts, resolution)
    rows_total = len(rows) * TIMESTEPS_PER_IMAGE
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((rows_total, *image_latents.shape[1:]), generator=generator)
    last = parts["noise_scheduler"].config.num_train_timesteps - 1
    timesteps = torch.linspace(0, last, rows_total).round().long()
    device = parts["device"]
    return LossInputs(latents=image_latents.repeat(TIMESTEPS_PER_IMAGE, 1, 1, 1),
                      text=encode_texts([row["text"] for row in rows], parts).repeat(TIMESTEPS_PER_IMAGE, 1, 1),
                      noise=noise.to(device), timesteps=timesteps.to(device))


def to_pil(pixels: Any) -> Image.Image:
    """One decoded image (C x H x W in [-1, 1]) as an 8-bit RGB PIL image, rounded as diffusers rounds."""
    array = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((array * 255).round().astype("uint8"))


@dataclass
class ValidationSet:
    """What a validation needs once the VAE and text encoder are freed: fixed loss inputs (None without val images),
    the prompt's embeddings (unconditional, conditional), the VAE, and the sampling settings."""

    loss: LossInputs | None
    prompt_embeds: Any
    vae: Any
    noise_scheduler: Any
    latent_scale: float
    resolution: int
    n_images: int
    steps: int
    seed: int

    @classmethod
    def build(cls, raw: Path, val_rows: list[dict], parts: dict, p: dict, seed: int) -> ValidationSet:
        """Encode the val images and the prompt now, while parts["vae"] and parts["text_encoder"] exist."""
        rows = val_rows[:MAX_IMAGES]
        loss = loss_inputs(raw, rows, parts, p["resolution"], seed) if rows else None
        if not rows:
            log.info("the val split is empty: no val loss, validation images only")
        return cls(loss=loss, prompt_embeds=encode_texts(["", p["validation_prompt"]], parts), vae=parts["vae"],
                   noise_scheduler=parts["noise_scheduler"], latent_scale=parts["latent_scale"],
                   resolution=p["resolution"], n_images=p["validation_images"], steps=p["validation_steps"],
                   seed=seed)

    def val_loss(self, unet: Any) -> float | None:
        """Mean squared error of the UNet's prediction on the fixed val inputs; None without val images."""
        import torch.nn.functional as F

        if self.loss is None:
            return None
        scheduler, x, dtype = self.noise_scheduler, self.loss, unet.dtype
        epsilon, total = scheduler.config.prediction_type == "epsilon", 0.0
        with evaluating(unet):
            for start in range(0, len(x.timesteps), UNET_BATCH):
                part = slice(start, start + UNET_BATCH)
                clean, noise, timesteps = x.latents[part], x.noise[part], x.timesteps[part]
                noisy = scheduler.add_noise(clean, noise, timesteps)
                target = noise if epsilon else scheduler.get_velocity(clean, noise, timesteps)
                prediction = unet(noisy.to(dtype), timesteps, x.text[part].to(dtype), return_dict=False)[0]
                total += F.mse_loss(prediction.float(), target.float(), reduction="sum").item()
        return total / x.noise.numel()

    def images(self, unet: Any) -> list[Image.Image]:
        """validation_images images of the prompt at resolution x resolution, image i from seed + i."""
        with evaluating(unet):
            return [self.sample(unet, self.seed + i) for i in range(self.n_images)]

    def sample(self, unet: Any, seed: int) -> Image.Image:
        """One image: DDIM with classifier-free guidance from noise seeded with `seed`, decoded by the VAE."""
        import torch
        from diffusers import DDIMScheduler

        device, dtype = self.prompt_embeds.device, unet.dtype
        # clip_sample: DDPMScheduler's default, meant for pixels; it would clip SD's latents.
        sampler = DDIMScheduler.from_config(self.noise_scheduler.config, clip_sample=False)
        sampler.set_timesteps(self.steps, device=device)
        size = self.resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        shape = (1, unet.config.in_channels, size, size)
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same noise on every device
        x = torch.randn(shape, generator=generator).to(device, dtype) * sampler.init_noise_sigma
        embeds = self.prompt_embeds.to(dtype)
        for t in sampler.timesteps:
            model_input = sampler.scale_model_input(torch.cat([x, x]), t)
            uncond, cond = unet(model_input, t, embeds, return_dict=False)[0].chunk(2)
            x = sampler.step(uncond + GUIDANCE_SCALE * (cond - uncond), t, x, return_dict=False)[0]
        decoded = self.vae.decode(x.to(self.vae.dtype) / self.latent_scale, return_dict=False)[0]
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
