"""FLUX.1 [dev]: a 12B guidance-distilled MMDiT trained by flow matching, CLIP-L (pooled) and T5-XXL (sequence),
fine-tuned as QLoRA (a LoRA adapter on a 4-bit NF4 base) to fit a 16 GB card.

Training follows diffusers' FLUX scripts (examples/dreambooth/train_dreambooth_lora_flux.py and the research project
flux_lora_quantization): latents x0 = (VAE sample - shift_factor) * scaling_factor, noised, targeted and weighted by
flow.py's FlowMatchNoise (SD3's code: sigmas drawn by `weighting_scheme` from the scheduler's table, x_t = (1 - sigma)
x0 + sigma eps, target eps - x0). FLUX-dev's scheduler shifts by resolution only when sampling (use_dynamic_shifting),
so training draws from the unshifted table, as those scripts do. The transformer sees the latents packed 2x2 into
64-channel tokens with their position ids (FluxPipeline._pack_latents, _prepare_latent_image_ids; zero text ids),
timestep / 1000, the caption's T5 sequence and CLIP pooled embeddings, and the distilled guidance embedding at
`model.guidance`; its output is unpacked, so the rest of the pipeline sees (batch, 16, h, w) latents as for SD3.
`model.base_quantization` (nf4, int8, none) holds the frozen base's Linear layers in bitsandbytes (quantization.py);
the fine-tuned folder holds the base in its original precision with the adapter fused into the unquantised weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stylestudy.core.config import SCHEDULERS, UserError
from stylestudy.models import loading
from stylestudy.models.families.base import Conditioning, FrozenEncoders, NoiseProcess
from stylestudy.models.families.flow import FlowMatchFamily, FlowMatchNoise, FlowMatchSettings

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP-L (pooled), T5-XXL (sequence)
TOKENIZERS = ("tokenizer", "tokenizer_2")
WEIGHTED = ("transformer", "vae", *TEXT_ENCODERS)
COMPONENTS = (*WEIGHTED, *TOKENIZERS, "scheduler")
WHAT = "a FLUX.1 pipeline"
PACKED_CHANNELS = 64  # 16 latent channels x a 2x2 patch: FLUX.1 [dev] and [schnell]; Fill has 384
# Layers the quantised base keeps in full precision (quantization.py says why): 64M of 11.9B parameters
KEEP = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")
LOOK_ALIKES = {"FluxFillPipeline": "FLUX.1 Fill (inpainting: masked image channels beside the latents)",
               "FluxKontextPipeline": "FLUX.1 Kontext (editing: a reference image's tokens beside the latents)"}


@dataclass(frozen=True)
class FluxSettings(FlowMatchSettings):
    """params `model` of the flux family: SD3's flow-matching settings, the T5 length, the distilled guidance that
    training gives the transformer and how the frozen base is held."""

    weighting_scheme: str = "uniform"  # diffusers' FLUX scripts' default ("none": uniform draws, no weights)
    max_sequence_length: int = 128  # T5 tokens per caption (FLUX.1-dev was trained with 512)
    guidance: float = 1.0  # diffusers' QLoRA recipe (flux_lora_quantization); its dreambooth script defaults to 3.5
    base_quantization: str = "nf4"  # nf4, int8, none


def pack(latents: Any) -> Any:
    """(batch, C, h, w) latents as FLUX's (batch, h/2 * w/2, 4C) tokens."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: Any, h: int, w: int) -> Any:
    """The inverse of pack for (h, w) latents."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, h, w, 1)  # a scale factor of 1: h and w are the latent's own


def position_ids(h: int, w: int, device: Any, dtype: Any) -> Any:
    """The image tokens' (0, row, column) ids of (h, w) latents."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, device, dtype)


def stored_dtype(folder: Path) -> Any:
    """The dtype a model folder's weights are stored in (its first safetensors file's first floating tensor)."""
    from safetensors import safe_open

    with safe_open(sorted(folder.glob("*.safetensors"))[0], framework="pt") as weights:
        return next(weights.get_slice(k).get_dtype() for k in weights.keys())


class Flux(FlowMatchFamily):
    name = "flux"
    pipeline_class = "FluxPipeline"
    components, weighted = COMPONENTS, WEIGHTED
    text_encoder_names, tokenizer_names = TEXT_ENCODERS, TOKENIZERS
    encoder_folders = ("vae/", "text_encoder/", "text_encoder_2/", "tokenizer/", "tokenizer_2/")
    # both streams' attention and feed-forward projections, as diffusers' FLUX LoRA script targets them
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    schedulers = SCHEDULERS["flux"]
    look_alikes = LOOK_ALIKES
    license = "other"
    license_name = "FLUX.1 [dev] Non-Commercial License"
    license_link = "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"

    def check_folder(self, path: Path) -> None:
        super().check_folder(path)
        channels = loading.read_json(path / "transformer" / "config.json").get("in_channels")
        if channels != PACKED_CHANNELS:
            raise UserError(f"{path}/transformer/config.json: in_channels {channels}, not FLUX.1 [dev]'s "
                            f"{PACKED_CHANNELS} (a Fill or Kontext transformer?); give a FLUX.1 [dev] text-to-image "
                            "pipeline folder")

    def load_pipeline(self, path: Path) -> Any:
        """The pipeline in the precision its weights are stored in: FLUX.1-dev's bf16 upcast to fp32 would take 67 GB
        of memory (and disk, once fetch saves it again)."""
        from diffusers import FluxPipeline

        loading.quiet_libraries()
        with loading.user_errors(path, WHAT):
            return FluxPipeline.from_pretrained(path, use_safetensors=True,
                                                torch_dtype=stored_dtype(path / "transformer"))

    def load_encoders(self, path: Path, device: Any, dtype: Any) -> FrozenEncoders:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        loading.quiet_libraries()
        with loading.user_errors(path, WHAT):
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
            encoders = (CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True),
                        T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", use_safetensors=True))
            tokenizers = (CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                          T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2"))
        for frozen in (vae, *encoders):
            frozen.requires_grad_(False).eval().to(device, dtype=dtype)
        return FrozenEncoders(self, vae, tokenizers, encoders, device, dtype)

    def load_denoiser(self, path: Path) -> Any:
        """The transformer on the CPU, its Linear layers quantised by `base_quantization` (computing in bf16 where
        it will train on a GPU, fp32 on a CPU); in fp32 without quantisation. accelerate moves it to the GPU after
        the frozen encoders have encoded and gone: T5-XXL (9.5 GB) and the 4-bit base (6.7 GB) never share it."""
        from accelerate import PartialState
        from diffusers import FluxTransformer2DModel

        loading.quiet_libraries()
        dtype = self.base_dtype(PartialState().device.type == "cuda")
        with loading.user_errors(path, WHAT):
            transformer = FluxTransformer2DModel.from_pretrained(path / "transformer", use_safetensors=True,
                                                                 torch_dtype=dtype)
        return self.held(transformer, dtype)

    def base_dtype(self, on_gpu: bool) -> Any:
        import torch

        return torch.bfloat16 if self.settings.base_quantization != "none" and on_gpu else torch.float32

    def held(self, transformer: Any, dtype: Any) -> Any:
        """The transformer's base quantised by `base_quantization`, where it lies (the CPU; meta for planning)."""
        from stylestudy.models import quantization

        if self.settings.base_quantization != "none":
            device = next(transformer.parameters()).device
            quantization.quantize_linear_layers(transformer, self.settings.base_quantization, dtype, device, KEEP)
        return transformer

    def denoiser_from_config(self, config: dict[str, Any], on_gpu: bool) -> Any:
        from diffusers import FluxTransformer2DModel

        dtype = self.base_dtype(on_gpu)
        return self.held(FluxTransformer2DModel.from_config(config).to(dtype), dtype)

    def example_inputs(self, config: dict[str, Any], latent_shape: tuple[int, ...]) -> tuple[Any, Any, Conditioning]:
        """T5's `max_sequence_length` tokens and CLIP's pooled embeddings."""
        import torch

        batch = latent_shape[0]
        return (torch.randn(latent_shape), torch.full((batch,), 500.0),
                Conditioning(torch.randn(batch, self.settings.max_sequence_length, config["joint_attention_dim"]),
                             torch.randn(batch, config["pooled_projection_dim"])))

    def encode_text(self, encoders: FrozenEncoders, texts: list[str]) -> Conditioning:
        import torch

        with torch.no_grad():
            sequence, pooled, _ = self.prompt_encoder(encoders).encode_prompt(
                texts, None, device=encoders.device, max_sequence_length=self.settings.max_sequence_length)
        return Conditioning(sequence, pooled)

    def from_latents(self, vae_config: Any, latents: Any) -> Any:
        """Unscaled VAE latents of (batch, 16, h, w) latents, or of FluxPipeline's packed square ones."""
        import math

        if latents.dim() == 3:  # FluxPipeline(output_type="latent") returns its tokens
            side = 2 * math.isqrt(latents.shape[1])
            latents = unpack(latents, side, side)
        return latents / vae_config.scaling_factor + vae_config.shift_factor

    def latent_shape(self, vae: Any, denoiser: Any, resolution: int) -> tuple[int, ...]:
        size = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        return 1, vae.config.latent_channels, size, size

    def transformer_kwargs(self, denoiser: Any, noisy: Any, conditioning: Conditioning, guidance: float) \
            -> dict[str, Any]:
        """Everything the transformer takes beside the tokens and timestep, for a batch of (batch, C, h, w) latents."""
        import torch

        sequence = conditioning.sequence
        ids = position_ids(noisy.shape[2], noisy.shape[3], noisy.device, sequence.dtype)
        embed = torch.full((noisy.shape[0],), guidance, device=noisy.device, dtype=torch.float32)
        return {"encoder_hidden_states": sequence, "pooled_projections": conditioning.pooled,
                "guidance": embed if denoiser.config.guidance_embeds else None, "img_ids": ids,
                "txt_ids": torch.zeros(sequence.shape[1], 3, device=noisy.device, dtype=sequence.dtype)}

    def denoise(self, denoiser: Any, noisy: Any, timesteps: Any, conditioning: Conditioning,
                guidance: float | None = None) -> Any:
        guidance = self.settings.guidance if guidance is None else guidance
        kwargs = self.transformer_kwargs(denoiser, noisy, conditioning, guidance)
        # FLUX's transformer multiplies timestep (and guidance) by 1000 itself
        out = denoiser(hidden_states=pack(noisy), timestep=timesteps / 1000, return_dict=False, **kwargs)[0]
        return unpack(out, noisy.shape[2], noisy.shape[3])

    def sample(self, denoiser: Any, noise: NoiseProcess, conditioning: Conditioning, latent_shape: tuple[int, ...],
               steps: int, guidance_scale: float, seed: int) -> Any:
        """Euler steps along the flow as FluxPipeline takes them (sigmas shifted by the token count); the prompt's
        row only, with the distilled guidance embedding at `guidance_scale` (FLUX.1-dev has no classifier-free
        guidance)."""
        import numpy as np
        import torch
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        assert isinstance(noise, FlowMatchNoise)
        device, dtype = conditioning.sequence.device, denoiser.dtype
        sampler = FlowMatchEulerDiscreteScheduler.from_config(noise.scheduler.config)
        c = sampler.config
        mu = calculate_shift(latent_shape[2] * latent_shape[3] // 4, c.base_image_seq_len, c.max_image_seq_len,
                             c.base_shift, c.max_shift)
        sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
        x = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
        prompt = conditioning.rows(slice(1, 2)).to(device, dtype)
        for t in sampler.timesteps:
            x = sampler.step(self.denoise(denoiser, x, t.expand(1), prompt, guidance_scale), t, x,
                             return_dict=False)[0]
        return x

    def fuse_qkv(self, pipe: Any) -> None:
        pipe.transformer.fuse_qkv_projections()

    def encode_prompts(self, pipe: Any, texts: list[str], guidance: bool, device: Any) -> dict[str, Any]:
        """The prompts' embeddings alone: generate.guidance_scale is FLUX.1-dev's distilled guidance, which needs no
        unconditional pass."""
        import torch

        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(texts, None, device=device,
                                                   max_sequence_length=self.settings.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def save_lora(self, layers: dict[str, Any], folder: Path, weight_name: str, metadata: dict[str, Any]) -> None:
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True,
                                       weight_name=weight_name, transformer_lora_adapter_metadata=metadata)

    def fused(self, denoiser: Any, path: Path, fuse: Any) -> Any:
        """The pipeline folder's transformer in its stored precision with the adapter of `denoiser` fused into its
        unquantised weights (merging into 4-bit weights would round the update: diffusers' flux_lora_quantization
        README merges into the dequantised base the same way)."""
        from diffusers import FluxTransformer2DModel
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        if self.settings.base_quantization == "none":
            return fuse(denoiser)
        base = FluxTransformer2DModel.from_pretrained(path / "transformer", use_safetensors=True,
                                                      torch_dtype=stored_dtype(path / "transformer"))
        (name, config), = denoiser.peft_config.items()
        base.add_adapter(config, adapter_name=name)
        set_peft_model_state_dict(base, get_peft_model_state_dict(denoiser, adapter_name=name), adapter_name=name)
        base.fuse_lora(adapter_names=[name])
        base.unload_lora()
        return base


FAMILY = Flux(FluxSettings())
