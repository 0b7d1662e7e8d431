"""Rectified flow matching, shared by the transformer families trained on it (SD3 and FLUX.1): the noise process,
its settings, and the parts of a family that are the same for both (a CLIP + T5 prompt encoder built from diffusers'
own pipeline class, shifted and scaled latents, the T5 length as an encoding and generation setting).

The noise process follows diffusers' SD3 and FLUX scripts (examples/dreambooth/train_dreambooth_lora_sd3.py,
train_dreambooth_lora_flux.py) and the SD3 paper (Esser et al. 2024): a density u over [0, 1) drawn by
`weighting_scheme` picks timesteps from the scheduler's table, sigma their noise level; x_t = (1 - sigma) x0 +
sigma eps; the target is the velocity eps - x0, each sample's squared error weighted by the scheme's loss weight; the
one-step estimate is x0 = x_t - sigma v.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from stylestudy.models.families.base import Family, FrozenEncoders, NoiseProcess, draw_noise


@dataclass(frozen=True)
class FlowMatchSettings:
    """params `model` of the sd3 family: how training draws noise levels and weights them, and the T5 length."""

    weighting_scheme: str = "logit_normal"  # logit_normal, mode, uniform, sigma_sqrt, cosmap
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    max_sequence_length: int = 77  # T5 tokens of every caption (CLIP's 77 come first)


class FlowMatchNoise(NoiseProcess):
    """Rectified flow matching on the scheduler's (shifted) sigma table."""

    def __init__(self, scheduler: Any, settings: FlowMatchSettings) -> None:
        self.scheduler = scheduler  # a FlowMatchEulerDiscreteScheduler as loaded: its tables span the training range
        self.settings = settings
        self.num_train_timesteps = scheduler.config.num_train_timesteps

    def draw(self, clean: Any, noise_offset: float) -> tuple[Any, Any]:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        noise = draw_noise(clean, noise_offset)
        s = self.settings
        u = compute_density_for_timestep_sampling(s.weighting_scheme, clean.shape[0], s.logit_mean, s.logit_std,
                                                  s.mode_scale)
        indices = (u * self.num_train_timesteps).long()
        return noise, self.scheduler.timesteps[indices].to(clean.device)

    def sigmas(self, timesteps: Any, like: Any) -> Any:
        """Each timestep's sigma, shaped to broadcast over `like` (batch x C x h x w)."""
        table = self.scheduler.timesteps.to(timesteps.device)
        index = (table[None, :] - timesteps.float()[:, None]).abs().argmin(dim=1)
        sigma = self.scheduler.sigmas.to(timesteps.device)[index]
        return sigma.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    def noised(self, clean: Any, noise: Any, timesteps: Any) -> Any:
        sigma = self.sigmas(timesteps, clean)
        return (1 - sigma) * clean + sigma * noise

    def target(self, clean: Any, noise: Any, timesteps: Any) -> Any:
        return noise - clean

    def loss_weights(self, timesteps: Any, snr_gamma: float) -> Any:
        """The scheme's weights (diffusers' compute_loss_weighting_for_sd3); None where they are all 1."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self.settings.weighting_scheme not in ("sigma_sqrt", "cosmap"):
            return None
        sigma = self.sigmas(timesteps, timesteps.float()).float()
        return compute_loss_weighting_for_sd3(self.settings.weighting_scheme, sigma)

    def predicted_x0(self, noisy: Any, output: Any, timesteps: Any) -> Any:
        return noisy - self.sigmas(timesteps, noisy) * output

    def spread_timesteps(self, n: int) -> Any:
        import torch

        table = self.scheduler.timesteps
        return table[torch.linspace(0, len(table) - 1, n).round().long()]


class FlowMatchFamily(Family):
    """A family trained by flow matching whose text encoders are CLIP (first) and T5 (last), joined by its diffusers
    pipeline's own encode_prompt."""

    denoiser_folder = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]]  # the pipeline's text encoders' folders, in its order
    tokenizer_names: ClassVar[tuple[str, ...]]
    settings: FlowMatchSettings

    def __init__(self, settings: FlowMatchSettings) -> None:
        self.settings = settings

    def encoding_settings(self) -> dict[str, Any]:
        return {"model.max_sequence_length": self.settings.max_sequence_length}

    def generation_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.settings.max_sequence_length}

    def load_noise_process(self, path: Path) -> FlowMatchNoise:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchNoise(FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
                              self.settings)

    def prompt_encoder(self, encoders: FrozenEncoders) -> Any:
        """A pipeline holding the text encoders only: diffusers' own encode_prompt joins their outputs."""
        import diffusers

        kwargs = dict(zip(self.text_encoder_names, encoders.text_encoders)) | dict(zip(self.tokenizer_names,
                                                                                       encoders.tokenizers))
        return getattr(diffusers, self.pipeline_class)(transformer=None, scheduler=None, vae=None, **kwargs)

    def count_truncated(self, encoders: FrozenEncoders, texts: list[str]) -> int:
        clip, t5 = encoders.tokenizers[0], encoders.tokenizers[-1]
        clip_ids = clip(texts, truncation=False)["input_ids"]
        t5_ids = t5(texts, truncation=False)["input_ids"]
        return sum(len(c) > clip.model_max_length or len(t) > self.settings.max_sequence_length
                   for c, t in zip(clip_ids, t5_ids))

    def to_latents(self, vae_config: Any, sample: Any) -> Any:
        return (sample - vae_config.shift_factor) * vae_config.scaling_factor

    def use_fused_attention(self, pipe: Any) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.vae.set_attn_processor(AttnProcessor2_0())  # the transformer's attention is SDPA already

    def set_scheduler(self, pipe: Any, name: str) -> None:
        pass  # flow_euler: the pipeline's own FlowMatchEulerDiscreteScheduler, with the model's shift
