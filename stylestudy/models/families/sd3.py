"""Stable Diffusion 3: an MMDiT transformer trained by rectified flow matching, three text encoders (CLIP-L, CLIP-G, T5).

Training follows diffusers' SD3 scripts (examples/dreambooth/train_dreambooth_lora_sd3.py) and the SD3 paper (Esser et
al. 2024, "Scaling Rectified Flow Transformers"): latents x0 = (VAE sample - shift_factor) * scaling_factor; a density
u over [0, 1) drawn by `weighting_scheme` (logit_normal with logit_mean and logit_std, mode with mode_scale, else
uniform) picks timesteps from the scheduler's shifted table, sigma their noise level; x_t = (1 - sigma) x0 + sigma eps;
the transformer regresses the velocity eps - x0, each sample's squared error weighted by the scheme's loss weight
(sigma_sqrt: sigma^-2, cosmap: 2 / (pi (1 - 2 sigma + 2 sigma^2)), else 1). The one-step estimate is x0 = x_t - sigma v.
min-SNR weighting has no meaning here (params validation refuses it). The noise process, and what SD3 shares with
FLUX.1 (the CLIP + T5 prompt encoder, shifted latents, the T5 length), are flow.py's.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stylestudy.core.config import SCHEDULERS
from stylestudy.models import loading
from stylestudy.models.families.base import Conditioning, FrozenEncoders, NoiseProcess
from stylestudy.models.families.flow import FlowMatchFamily, FlowMatchNoise, FlowMatchSettings

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")
WEIGHTED = ("transformer", "vae", *TEXT_ENCODERS)
COMPONENTS = (*WEIGHTED, *TOKENIZERS, "scheduler")
WHAT = "a Stable Diffusion 3 pipeline"
log = logging.getLogger(__name__)


class StableDiffusion3(FlowMatchFamily):
    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    components, weighted = COMPONENTS, WEIGHTED
    text_encoder_names, tokenizer_names = TEXT_ENCODERS, TOKENIZERS
    encoder_folders = ("vae/", "text_encoder/", "text_encoder_2/", "text_encoder_3/", "tokenizer/", "tokenizer_2/",
                       "tokenizer_3/")
    # the joint attention's projections of both streams, as diffusers' SD3 LoRA script targets them
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
                    "attn.to_out.0", "attn.to_q", "attn.to_v")
    schedulers = SCHEDULERS["sd3"]
    license = "other"
    license_name = "Stability AI Community License"
    license_link = "https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers/blob/main/LICENSE.md"

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

    def encode_text(self, encoders: FrozenEncoders, texts: list[str]) -> Conditioning:
        import torch

        with torch.no_grad():
            sequence, _, pooled, _ = self.prompt_encoder(encoders).encode_prompt(
                texts, None, None, device=encoders.device, do_classifier_free_guidance=False,
                max_sequence_length=self.settings.max_sequence_length)
        return Conditioning(sequence, pooled)

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

    def fuse_qkv(self, pipe: Any) -> None:
        config = pipe.transformer.config
        if config.get("qk_norm") or config.get("dual_attention_layers"):
            # diffusers' FusedJointAttnProcessor2_0 skips the query-key norm (other images) and needs the text
            # stream, which a dual-attention block's second attention has not (it crashes): SD3.5's stay apart
            log.info("generate.fuse_qkv: this transformer (SD3.5: query-key norm, dual attention) keeps its q, k, v "
                     "projections apart; diffusers' fused joint attention computes neither")
            return
        pipe.transformer.fuse_qkv_projections()

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


FAMILY = StableDiffusion3(FlowMatchSettings())
