"""The fine-tune's training loss: the denoising MSE, with its options, plus an optional CLIP guide loss.

Denoising (the study): the model family's noise process (stylestudy/models/families/) noises the latents x0 of a
batch and says what the denoiser regresses (SD2: eps or v at a uniform random DDPM timestep). Options from the
finetune params, each off at 0, and then drawing nothing from the RNG, so that the default loss is the study's to the
bit: `noise_offset` and `snr_gamma` (the family's noise process draws and weights them), and
- `clip_loss`: the ReFL-style guide loss (Xu et al. 2023, ImageReward): the one-step estimate of x0 from the same
  denoiser output, decoded by the frozen VAE and scored by a frozen guide CLIP (never the one clip_eval scores with)
  against "<style prompt> <caption>"; see `clip_loss`. `caption_dropout` lives in stylestudy/train/batches.py.

Entry point: `training_loss(inputs, trainee, p, step, guide)`, on the tensors train/batches.py made of a batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stylestudy.models import loading
from stylestudy.models.families import Family, NoiseProcess
from stylestudy.train.batches import TrainInputs


@dataclass(frozen=True)
class Trainee:
    """The denoiser being trained (a UNet or transformer, maybe wrapped by accelerate), its family and noise process,
    and the dtype its inputs are cast to (None: as they come; autocast casts them where it runs)."""

    family: Family
    denoiser: Any
    noise: NoiseProcess
    input_dtype: Any = None


@dataclass(frozen=True)
class Guide:
    """The frozen guide CLIP and what its image tower expects (size (h, w), per-channel mean and std (1, 3, 1, 1)),
    the VAE that decodes the one-step x0 for it, and the style pre-prompt of its texts."""

    model: Any
    tokenizer: Callable
    image_size: tuple[int, int]
    mean: Any
    std: Any
    vae: Any  # the frozen VAE that decodes x0 for it
    family: Family
    style_prompt: str


def load_guide(path: Path, device: Any, vae: Any, family: Family, style_prompt: str) -> Guide:
    """The open_clip folder at `path` as a Guide: eval mode, fp32, no gradients to its weights."""
    import open_clip
    import torch

    model, _, tokenizer = loading.load_clip(path, device)
    model.requires_grad_(False)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    stats = [torch.tensor(cfg[k], device=device).view(1, -1, 1, 1) for k in ("mean", "std")]
    return Guide(model.eval(), tokenizer, tuple(size), *stats, vae=vae, family=family, style_prompt=style_prompt)


def mse_loss(prediction: Any, target: Any, weights: Any) -> Any:
    """The denoising loss: plain MSE without weights, else the batch mean of weights x per-sample MSE."""
    import torch.nn.functional as F

    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (weights * per_sample).mean()


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


def clip_loss(x0: Any, captions: list[str], guide: Guide) -> Any:
    """mean over samples of 1 - cos(E_image(guide_pixels(D(from_latents(x0)))), E_text(style_prompt + caption)).

    D is the frozen VAE decoder: its weights take no gradient, its activations pass it on to x0 and so to the UNet;
    gradient checkpointing keeps them out of memory. The text side takes no gradient at all.
    """
    import torch
    import torch.nn.functional as F

    vae = guide.vae
    if not vae.is_gradient_checkpointing:
        vae.enable_gradient_checkpointing()  # the decoder's full-resolution activations would dominate the memory
    images = vae.decode(guide.family.from_latents(vae.config, x0).to(vae.dtype), return_dict=False)[0]
    image_features = guide.model.encode_image(guide_pixels(images, guide))
    with torch.no_grad():
        texts = [f"{guide.style_prompt} {caption}".strip() for caption in captions]
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


def training_loss(inputs: TrainInputs, trainee: Trainee, p: dict, step: int, guide: Guide | None) -> dict[str, Any]:
    """{"loss": loss_mse + weight * loss_clip (what backward uses), "loss_mse", "loss_clip" (0 where not applied)}.

    With every option off this is the study's loss, bit for bit, from the same RNG draws in the same order.
    """
    noise_process, clean = trainee.noise, inputs.latents
    noise, timesteps = noise_process.draw(clean, p["noise_offset"])
    noisy = noise_process.noised(clean, noise, timesteps)
    target = noise_process.target(clean, noise, timesteps)
    conditioning = inputs.conditioning
    if trainee.input_dtype is not None:  # DeepSpeed: half weights and no autocast (build.denoiser_input_dtype)
        noisy_in, conditioning = noisy.to(trainee.input_dtype), conditioning.to(noisy.device, trainee.input_dtype)
    else:
        noisy_in = noisy
    prediction = trainee.family.denoise(trainee.denoiser, noisy_in, timesteps, conditioning)
    loss_mse = mse_loss(prediction, target, noise_process.loss_weights(timesteps, p["snr_gamma"]))
    applied = clip_samples(p["clip_loss"], step, timesteps)
    if applied is None:
        return {"loss": loss_mse, "loss_mse": loss_mse, "loss_clip": loss_mse.new_zeros(())}
    x0 = noise_process.predicted_x0(noisy[applied].float(), prediction[applied].float(), timesteps[applied])
    loss_clip = clip_loss(x0, [inputs.captions[i] for i in applied.tolist()], guide)
    return {"loss": loss_mse + p["clip_loss"]["weight"] * loss_clip, "loss_mse": loss_mse, "loss_clip": loss_clip}
