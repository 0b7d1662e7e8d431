"""Stable Diffusion 3: an MMDiT transformer trained by rectified flow matching, three text encoders (CLIP-L, CLIP-G, T5).

Training follows diffusers' SD3 scripts (examples/dreambooth/train_dreambooth_lora_sd3.py) and the SD3 paper (Esser et
al. 2024, "Scaling Rectified Flow Transformers"): latents x0 = (VAE sample - shift_factor) * scaling_factor; a density
u over [0, 1) drawn by `weighting_scheme` (logit_normal with logit_mean and logit_std, mode with mode_scale, else
uniform) picks timesteps from the scheduler's shifted table, sigma their noise level; x_t = (1 - sigma) x0 + sigma eps;
the transformer regresses the velocity eps - x0, each sample's squared error weighted by the scheme's loss weight
(sigma_sqrt: sigma^-2, cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2)), else 1). The one-step estimate is x0 = x_t - sigma v.
min-SNR weighting has no meaning here (params validation refuses it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylestudy.core.config import SCHEDULERS
from stylestudy.models import loading
from stylestudy.models.families.base import Conditioning, Family, FrozenEncoders, NoiseProcess, draw_noise

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
WEIGHTED = ("transformer", "vae", *TEXT_ENCODERS)
COMPONENTS = (*WEIGHTED, *TOKENIZERS, "scheduler")
WHAT = "a Stable Diffusion 3 pipeline"
log = logging.getLogger(__name__)


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


class StableDiffusion3(Family):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_folder = "transformer"
    components, weighted = COMPONENTS, WEIGHTED
    encoder_folders = ("vae/", "text_encoder/", "text_encoder_2/", "text_encoder_3/", "tokenizer/", "tokenizer_2/",
                       "tokenizer_3/")
    # the joint attention's projections of both streams, as diffusers' SD3 LoRA script targets them
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")
    schedulers = SCHEDULERS["sd3"]
    license = "other"
    license_name = "Stability AI Community License"
    license_link = "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers/blob/main/LICENSE.md"

    def __init__(self, settings: FlowMatchSettings = FlowMatchSettings()) -> None:
        self.settings = settings

    def encoding_settings(self) -> dict[str, Any]:
        return {"model.max_sequence_length": self.settings.max_sequence_length}

    def load_pipeline(self, path: Path) -> Any:
        from diffusers import StableDiffusion3Pipeline

        loading.quiet_libraries()
        with loading.user_errors(path, WHAT):
            return StableDiffusion3Pipeline.from_pretrained(path, use_safetensors=True)

    def load_encoders(self, path: Path, device: Any, dtype: Any) -> FrozenEncoders:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        loading.quiet_libraries()
        with loading.user_errors(path, WHAT):
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
            encoders = (CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", use_safetensors=True),
                        CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                    use_safetensors=True),
                        T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", use_safetensors=True))
            tokenizers = (CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                          CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                          T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3"))
        for frozen in (vae, *encoders):
            loading.cast(frozen.requires_grad_(False).eval(), device, dtype)  # T5's wo stays fp32 in fp16
        return FrozenEncoders(self, vae, tokenizers, encoders, device, dtype)

    def load_denoiser(self, path: Path) -> Any:
        from diffusers import SD3Transformer2DModel

        loading.quiet_libraries()
        with loading.user_errors(path, WHAT):
            return SD3Transformer2DModel.from_pretrained(path / "transformer", use_safetensors=True)

    def load_noise_process(self, path: Path) -> FlowMatchNoise:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchNoise(FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
                              self.settings)

    def prompt_encoder(self, encoders: FrozenEncoders) -> Any:
        """A pipeline holding the text encoders only: diffusers' own encode_prompt joins the three encoders."""
        from diffusers import StableDiffusion3Pipeline

        kwargs = dict(zip(TEXT_ENCODERS, encoders.text_encoders)) | dict(zip(TOKENIZERS, encoders.tokenizers))
        return StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **kwargs)

    def encode_text(self, encoders: FrozenEncoders, texts: list[str]) -> Conditioning:
        import torch

        with torch.no_grad():
            sequence, _, pooled, _ = self.prompt_encoder(encoders).encode_prompt(
                texts, None, None, device=encoders.device, do_classifier_free_guidance=False,
                max_sequence_length=self.settings.max_sequence_length)
        return Conditioning(sequence, pooled)

    def count_truncated(self, encoders: FrozenEncoders, texts: list[str]) -> int:
        clip, _, t5 = encoders.tokenizers
        clip_ids = clip(texts, truncation=False)["input_ids"]
        t5_ids = t5(texts, truncation=False)["input_ids"]
        return sum(len(c) > clip.model_max_length or len(t) > self.settings.max_sequence_length
                   for c, t in zip(clip_ids, t5_ids))

    def to_latents(self, vae_config: Any, sample: Any) -> Any:
        return (sample - vae_config.shift_factor) * vae_config.scaling_factor

    def from_latents(self, vae_config: Any, latents: Any) -> Any:
        return latents / vae_config.scaling_factor + vae_config.shift_factor

    def example_inputs(self, config: dict[str, Any], latent_shape: tuple[int, ...]) -> tuple[Any, Any, Conditioning]:
        """CLIP's 77 tokens, then T5's `max_sequence_length`."""
        import torch

        batch, tokens = latent_shape[0], 77 + self.settings.max_sequence_length
        return (torch.randn(latent_shape), torch.full((batch,), 500.0),
                Conditioning(torch.randn(batch, tokens, config["joint_attention_dim"]),
                             torch.randn(batch, config["pooled_projection_dim"])))

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, conditioning: Conditioning) -> Any:
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=conditioning.sequence,
                        pooled_projections=conditioning.pooled, return_dict=False)[0]

    def sample(self, denoiser: Any, noise: NoiseProcess, conditioning: Conditioning, latent_shape: tuple[int, ...],
               steps: int, guidance_scale: float, seed: int) -> Any:
        """Euler steps along the flow (the pipeline's scheduler) with classifier-free guidance."""
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        assert isinstance(noise, FlowMatchNoise)
        device, dtype = conditioning.sequence.device, denoiser.dtype
        sampler = FlowMatchEulerDiscreteScheduler.from_config(noise.scheduler.config)
        sampler.set_timesteps(steps, device=device)
        x = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        both = conditioning.to(device, dtype)
        for t in sampler.timesteps:
            uncond, cond = self.denoise(denoiser, torch.cat([x, x]), t.expand(2), both).chunk(2)
            x = sampler.step(uncond + guidance_scale * (cond - uncond), t, x, return_dict=False)[0]
        return x

    def use_fused_attention(self, pipe: Any) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.vae.set_attn_processor(AttnProcessor2_0())  # the transformer's joint attention is SDPA already

    def fuse_qkv(self, pipe: Any) -> None:
        config = pipe.transformer.config
        if config.get("qk_norm") or config.get("dual_attention_layers"):
            # diffusers' FusedJointAttnProcessor2_0 skips the query-key norm (other images) and needs the text
            # stream, which a dual-attention block's second attention has not (it crashes): SD3.5's stay apart
            log.info("generate.fuse_qkv: this transformer (SD3.5: query-key norm, dual attention) keeps its q, k, v "
                     "projections apart; diffusers' fused joint attention computes neither")
            return
        pipe.transformer.fuse_qkv_projections()

    def set_scheduler(self, pipe: Any, name: str) -> None:
        pass  # flow_euler: the pipeline's own FlowMatchEulerDiscreteScheduler, with the model's shift

    def generation_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.settings.max_sequence_length}

    def encode_prompts(self, pipe: Any, texts: list[str], guidance: bool, device: Any) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
                texts, None, None, device=device, do_classifier_free_guidance=guidance,
                max_sequence_length=self.settings.max_sequence_length)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": negative_pooled}

    def save_lora(self, layers: dict[str, Any], folder: Path, weight_name: str, metadata: dict[str, Any]) -> None:
        from diffusers import StableDiffusion3Pipeline

        # peft's keys as they are, as diffusers' SD3 LoRA script saves them (its UNet conversion would rename some)
        StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True,
                                                   weight_name=weight_name, transformer_lora_adapter_metadata=metadata)


FAMILY = StableDiffusion3()
