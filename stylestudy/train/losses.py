"""The fine-tune's training loss: the denoising MSE, with its options, plus an optional CLIP guide loss.

Denoising (the study): latents x0 of a batch are noised at a uniform random timestep t, x_t = sqrt(a_t) x0 +
sqrt(1 - a_t) eps (a_t = the scheduler's alphas_cumprod[t]), and the UNet regresses eps (or the velocity v =
sqrt(a_t) eps - sqrt(1 - a_t) x0 for v-prediction models). Options from the finetune params, each off at 0, and then
drawing nothing from the RNG, so that the default loss is the study's to the bit:
- `noise_offset`: eps += noise_offset * randn(batch, channels, 1, 1), as in diffusers' training examples;
- `snr_gamma`: min-SNR-gamma weighting (Hang et al. 2023), per-sample MSE times min(snr, gamma) / snr (epsilon) or
  min(snr, gamma) / (snr + 1) (v), with snr = a_t / (1 - a_t) from `diffusers.training_utils.compute_snr`;
- `clip_loss`: the ReFL-style guide loss (Xu et al. 2023, ImageReward): the one-step estimate of x0 from the same
  UNet output, decoded by the frozen VAE and scored by a frozen guide CLIP (never the one clip_eval scores with)
  against "<style prompt> <caption>"; see `clip_loss`. `caption_dropout` lives in stylestudy/data/latents.py (the data).

Entry point: `training_loss(batch, parts, unet, p, step)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stylestudy.data import latents
from stylestudy.models import loading


@dataclass(frozen=True)
class Guide:
    """The frozen guide CLIP and what its image tower expects: size (h, w), per-channel mean and std (1, 3, 1, 1)."""

    model: Any
    tokenizer: Callable
    image_size: tuple[int, int]
    mean: Any
    std: Any


def load_guide(path: Path, device: Any) -> Guide:
    """The open_clip folder at `path` as a Guide: eval mode, fp32, no gradients to its weights."""
    import open_clip
    import torch

    model, _, tokenizer = loading.load_clip(path, device)
    model.requires_grad_(False)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    stats = [torch.tensor(cfg[k], device=device).view(1, -1, 1, 1) for k in ("mean", "std")]
    return Guide(model.eval(), tokenizer, tuple(size), *stats)


def draw_noise(clean: Any, scheduler: Any, noise_offset: float) -> tuple[Any, Any]:
    """eps ~ N(0, I) (+ noise_offset * N(0, I) per sample and channel when > 0), and timesteps t ~ U{0..T-1}."""
    import torch

    noise = torch.randn_like(clean)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn(
            (*clean.shape[:2], 1, 1), device=clean.device, dtype=clean.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    return noise, timesteps


def snr_weights(scheduler: Any, timesteps: Any, gamma: float) -> Any:
    """min-SNR-gamma weights: min(snr, gamma) / snr for epsilon prediction, min(snr, gamma) / (snr + 1) for v."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    raise ValueError(f"min-SNR weighting for prediction_type {kind!r} is not defined")


def mse_loss(prediction: Any, target: Any, timesteps: Any, scheduler: Any, gamma: float) -> Any:
    """The denoising loss: plain MSE when gamma is 0, else the batch mean of snr_weights x per-sample MSE."""
    import torch.nn.functional as F

    if gamma == 0:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (snr_weights(scheduler, timesteps, gamma) * per_sample).mean()


def predicted_x0(scheduler: Any, noisy: Any, output: Any, timesteps: Any) -> Any:
    """One-step estimate of the clean latents: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) for epsilon prediction,
    x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v for v prediction (what DDPMScheduler.step calls pred_original_sample)."""
    a = scheduler.alphas_cumprod.to(noisy.device)[timesteps].float().view(-1, 1, 1, 1)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (noisy - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * output
    raise ValueError(f"the CLIP loss needs an epsilon or v_prediction model, not prediction_type {kind!r}")


def guide_pixels(images: Any, guide: Guide) -> Any:
    """Decoder output in [-1, 1] -> the guide's input, differentiably: (x + 1) / 2 clamped to [0, 1], antialiased
    bicubic resize to the guide's size, clamped again, (x - mean) / std. On square images this is open_clip's
    preprocess (resize of the shorter side, center crop, normalise) less its rounding to 8-bit pixels."""
    import torch.nn.functional as F

    images = ((images.float() + 1) / 2).clamp(0, 1)
    if tuple(images.shape[-2:]) != guide.image_size:
        images = F.interpolate(images, size=guide.image_size, mode="bicubic", antialias=True, align_corners=False)
        images = images.clamp(0, 1)  # bicubic overshoots at sharp edges (sketch lines); PIL's 8-bit result cannot
    return (images - guide.mean) / guide.std


def clip_loss(x0: Any, captions: list[str], parts: dict) -> Any:
    """mean over samples of 1 - cos(E_image(guide_pixels(D(x0 / latent_scale))), E_text(style_prompt + caption)).

    D is the frozen VAE decoder: its weights take no gradient, its activations pass it on to x0 and so to the UNet;
    gradient checkpointing keeps them out of memory. The text side takes no gradient at all.
    """
    import torch
    import torch.nn.functional as F

    vae, guide = parts["vae"], parts["guide"]
    if not vae.is_gradient_checkpointing:
        vae.enable_gradient_checkpointing()  # the decoder's full-resolution activations would dominate the memory
    images = vae.decode((x0 / parts["latent_scale"]).to(vae.dtype), return_dict=False)[0]
    image_features = guide.model.encode_image(guide_pixels(images, guide))
    with torch.no_grad():
        texts = [f"{parts['style_prompt']} {caption}".strip() for caption in captions]
        text_features = guide.model.encode_text(guide.tokenizer(texts).to(x0.device))
    return (1 - F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)).mean()


def clip_samples(settings: dict, step: int, timesteps: Any) -> Any:
    """Indices of the samples the CLIP loss applies to (t < max_timestep), or None when it does not apply at all
    (weight 0, or `step`, the 0-based index of the optimizer step this batch counts towards, is not a multiple of
    `every`)."""
    import torch

    if settings["weight"] == 0 or step % settings["every"]:
        return None
    # A CPU-GPU sync point, on CLIP-loss steps only: the sample count sets the decoder's batch.
    applied = torch.nonzero(timesteps < settings["max_timestep"]).flatten()
    return applied if len(applied) else None


def training_loss(batch: dict, parts: dict, unet: Any, p: dict, step: int) -> dict[str, Any]:
    """{"loss": loss_mse + weight * loss_clip (what backward uses), "loss_mse", "loss_clip" (0 where not applied)}.

    With every option off this is the study's loss, bit for bit, from the same RNG draws in the same order.
    """
    scheduler = parts["noise_scheduler"]
    clean, text = latents.encode_batch(batch, parts)
    noise, timesteps = draw_noise(clean, scheduler, p["noise_offset"])
    noisy = scheduler.add_noise(clean, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(clean, noise, timesteps)
    prediction = unet(noisy, timesteps, text, return_dict=False)[0]
    loss_mse = mse_loss(prediction, target, timesteps, scheduler, p["snr_gamma"])
    applied = clip_samples(p["clip_loss"], step, timesteps)
    if applied is None:
        return {"loss": loss_mse, "loss_mse": loss_mse, "loss_clip": loss_mse.new_zeros(())}
    x0 = predicted_x0(scheduler, noisy[applied].float(), prediction[applied].float(), timesteps[applied])
    loss_clip = clip_loss(x0, [batch["captions"][i] for i in applied.tolist()], parts)
    return {"loss": loss_mse + p["clip_loss"]["weight"] * loss_clip, "loss_mse": loss_mse, "loss_clip": loss_clip}
