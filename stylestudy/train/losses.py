"""The fine-tune's training loss: the denoising MSE, with its options, plus an optional CLIP guide loss.

Denoising (the study): the model family's noise process (stylestudy/models/families/) noises the latents x0 of a
batch and says what the denoiser regresses (SD2: eps or v at a uniform random DDPM timestep). Options from the
finetune params, each off at 0, and then drawing nothing from the RNG, so that the default loss is the study's to the
bit: `noise_offset` and `snr_gamma` (the family's noise process draws and weights them), and
- `clip_loss`: the ReFL-style guide loss (Xu et al. 2023, ImageReward): the one-step estimate of x0 from the same
  denoiser output, decoded by the frozen VAE and scored by a frozen guide CLIP (never the one clip_eval scores with)
  against "<style prompt> <caption>" (`kind: global`; see `clip_loss`), or DiffusionCLIP's directional loss against
  the frozen base model's x0 for the same noisy input (`kind: directional`; see `directional_loss` and
  `reference_denoiser`). `caption_dropout` lives in stylestudy/train/batches.py.

Entry point: `training_loss(inputs, trainee, p, step, guide)`, on the tensors train/batches.py made of a batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from stylestudy.models import loading
from stylestudy.models.families import Family, NoiseProcess
from stylestudy.train.batches import TrainInputs

log = logging.getLogger(__name__)

# Below this length of the image direction (the tuned and reference images' unit embeddings agree, as they do exactly
# at step 0), the directional loss is 1 - a·d / floor: its gradient pushes along the text direction instead of
# dividing by a vanishing norm (1/|a|).
DIRECTION_FLOOR = 1e-4


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
    kind: str = "global"  # or "directional" (DiffusionCLIP)
    reference: Callable | None = None  # directional: (noisy, timesteps, conditioning) -> the base model's prediction


def load_guide(path: Path, device: Any, vae: Any, family: Family, style_prompt: str, kind: str = "global",
               reference: Callable | None = None) -> Guide:
    """The open_clip folder at `path` as a Guide: eval mode, fp32, no gradients to its weights."""
    import open_clip
    import torch

    model, _, tokenizer = loading.load_clip(path, device)
    model.requires_grad_(False)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], (tuple, list)) else (cfg["size"], cfg["size"])
    stats = [torch.tensor(cfg[k], device=device).view(1, -1, 1, 1) for k in ("mean", "std")]
    return Guide(model.eval(), tokenizer, tuple(size), *stats, vae=vae, family=family, style_prompt=style_prompt,
                 kind=kind, reference=reference)


def reference_denoiser(trainee: Trainee, method: str, device: Any) -> Callable:
    """The frozen base model's prediction, x0_ref's source for the directional loss: with LoRA, the trainee itself
    with its adapter disabled (no second copy); with a full fine-tune, a frozen copy taken now, before any step (as
    much memory again as the denoiser's weights: the log says how much)."""
    import copy

    import torch

    family = trainee.family
    if method == "lora":
        denoiser = trainee.denoiser

        def predict_without_adapter(noisy: Any, timesteps: Any, conditioning: Any) -> Any:
            denoiser.disable_adapters()
            try:
                with torch.no_grad():
                    return family.denoise(denoiser, noisy, timesteps, conditioning)
            finally:
                denoiser.enable_adapters()
        return predict_without_adapter
    frozen = copy.deepcopy(trainee.denoiser).requires_grad_(False).eval().to(device)
    size = sum(w.numel() * w.element_size() for w in frozen.parameters()) / 2**20
    log.info("clip_loss.kind directional with a full fine-tune: a frozen copy of the denoiser is the reference "
             "(%.1f MB more memory on %s; LoRA needs none)", size, device)

    dtype = next(frozen.parameters()).dtype

    def predict_frozen(noisy: Any, timesteps: Any, conditioning: Any) -> Any:
        # the copy is made before accelerate wraps the trainee in autocast: its inputs (half-precision cached
        # embeddings on a GPU) take its own dtype
        with torch.no_grad():
            return family.denoise(frozen, noisy.to(dtype), timesteps, conditioning.to(noisy.device, dtype))
    return predict_frozen


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


def image_features(x0: Any, guide: Guide) -> Any:
    """E_image(guide_pixels(D(from_latents(x0)))); D, the frozen VAE decoder, passes gradients on to x0."""
    vae = guide.vae
    if not vae.is_gradient_checkpointing:
        vae.enable_gradient_checkpointing()  # the decoder's full-resolution activations would dominate the memory
    images = vae.decode(guide.family.from_latents(vae.config, x0).to(vae.dtype), return_dict=False)[0]
    return guide.model.encode_image(guide_pixels(images, guide))


def directional_loss(tuned: Any, reference: Any, styled: Any, plain: Any) -> Any:
    """DiffusionCLIP's directional CLIP loss (Kim, Kwon and Ye, "DiffusionCLIP: Text-Guided Diffusion Models for Robust
    Image Manipulation", CVPR 2022, eq. 5, after StyleGAN-NADA): mean of 1 - cos(ΔI, ΔT), ΔI = Ê_I(tuned) -
    Ê_I(reference), ΔT = Ê_T(styled) - Ê_T(plain), on unit embeddings Ê (as their code); |ΔI| is floored at
    DIRECTION_FLOOR."""
    import torch
    import torch.nn.functional as F

    def unit(v: Any) -> Any:  # in fp32 at least (half-precision CLIP outputs), fp64 kept
        return F.normalize(v.to(torch.promote_types(v.dtype, torch.float32)), dim=-1)

    image_direction = unit(tuned) - unit(reference)
    text_direction = unit(unit(styled) - unit(plain))
    length = image_direction.norm(dim=-1).clamp_min(DIRECTION_FLOOR)
    return (1 - (image_direction * text_direction).sum(-1) / length).mean()


def clip_loss(x0: Any, captions: list[str], guide: Guide, x0_reference: Any = None) -> Any:
    """global: mean over samples of 1 - cos(image_features(x0), E_text(style_prompt + caption)); directional:
    `directional_loss` of x0 against x0_reference, the text direction from the caption to the styled caption.

    The VAE decoder's and CLIP's weights take no gradient; the activations pass it on to x0 and so to the denoiser
    (gradient checkpointing keeps them out of memory). The text side and x0_reference take no gradient at all.
    """
    import torch
    import torch.nn.functional as F

    features = image_features(x0, guide)
    with torch.no_grad():
        texts = [f"{guide.style_prompt} {caption}".strip() for caption in captions]
        text_features = guide.model.encode_text(guide.tokenizer(texts).to(x0.device))
        if guide.kind == "directional":
            plain = guide.model.encode_text(guide.tokenizer(list(captions)).to(x0.device))
            reference = image_features(x0_reference, guide)
    if guide.kind == "directional":
        return directional_loss(features, reference, text_features, plain)
    return (1 - F.cosine_similarity(features.float(), text_features.float(), dim=-1)).mean()


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
    if trainee.input_dtype is not None:  # no autocast to cast them (build.denoiser_input_dtype)
        noisy_in, conditioning = noisy.to(trainee.input_dtype), conditioning.to(noisy.device, trainee.input_dtype)
    else:
        noisy_in = noisy
    prediction = trainee.family.denoise(trainee.denoiser, noisy_in, timesteps, conditioning)
    loss_mse = mse_loss(prediction, target, noise_process.loss_weights(timesteps, p["snr_gamma"]))
    applied = clip_samples(p["clip_loss"], step, timesteps)
    if applied is None:
        return {"loss": loss_mse, "loss_mse": loss_mse, "loss_clip": loss_mse.new_zeros(())}
    x0 = noise_process.predicted_x0(noisy[applied].float(), prediction[applied].float(), timesteps[applied])
    x0_reference = None
    if guide.kind == "directional":  # the base model on the whole batch: indexing the conditioning is family-specific
        # the inputs as the trainee got them: under DeepSpeed (half weights, no autocast) the adapter-disabled trainee
        # needs them cast as well
        base = guide.reference(noisy_in, timesteps, conditioning)[applied]
        x0_reference = noise_process.predicted_x0(noisy[applied].float(), base.float(), timesteps[applied])
    loss_clip = clip_loss(x0, [inputs.captions[i] for i in applied.tolist()], guide, x0_reference)
    return {"loss": loss_mse + p["clip_loss"]["weight"] * loss_clip, "loss_mse": loss_mse, "loss_clip": loss_clip}
