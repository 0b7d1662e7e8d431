"""Random FLUX.1 pipelines built from configs, saved as the folders FluxPipeline loads.

`tiny` serves the offline smoke setting: a guidance-distilled transformer (guidance_embeds, as FLUX.1-dev) of one
double-stream and one single-stream block, 128 wide (as SD3's tiny one: a 2x2 patch of 16 latent channels holds 64
numbers), CLIP-L and T5 shrunk, and a 16-channel VAE with FLUX's shift and scale, shaped as SD2's smoke VAE is
(vae_shaping.py) so that the smoke study's positive control can show a style. `full` has the shapes of
black-forest-labs/FLUX.1-dev (the 12B transformer: 19 double-stream and 38 single-stream blocks, 3072 wide; CLIP-L;
T5-v1.1-XXL; the 16-channel VAE); `build_flux_modules("full", device="meta")` makes them without memory (shapes and
counts only), `save_random_flux(..., "full")` writes them in bf16, as the Hub repository ships them (about 33 GB of
RAM and disk: for a GPU machine, never this one). The tokenizers are the offline ones of builders_sd3.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stylestudy.models.builders import parameter_counts, sd_tokenizer_from_open_clip, sd_vae
from stylestudy.models.builders_sd3 import CLIP_COMMON, T5_COMMON, t5_tokenizer
from stylestudy.models.loading import quiet_libraries

ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 4,
                        "joint_attention_dim": 64, "pooled_projection_dim": 32, "axes_dims_rope": (8, 12, 12)},
        "vae": {"layers_per_block": 1, "block_out_channels": (32, 64, 64), "sample_size": 32},
        "text_encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
                         "projection_dim": 32, "hidden_act": "quick_gelu"},
        "text_encoder_2": {"d_model": 64, "d_ff": 37, "d_kv": 8, "num_heads": 4, "num_layers": 2},
    },
    "full": {  # black-forest-labs/FLUX.1-dev's config.json files
        "transformer": {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
                        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                        "axes_dims_rope": (16, 56, 56)},
        "vae": {"layers_per_block": 2, "block_out_channels": (128, 256, 512, 512), "sample_size": 1024},
        "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072, "projection_dim": 768, "hidden_act": "quick_gelu"},
        "text_encoder_2": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24},
    },
}
# FLUX.1-dev's scheduler_config.json: the sampler shifts its sigmas by the image's token count (mu)
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
             "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
VAE_SHIFT, VAE_SCALE = 0.1159, 0.3611  # FLUX.1-dev's vae/config.json
SHAPING_STEPS, SHAPING_BATCH, SHAPING_POOL, SHAPING_LEARNING_RATE, SHAPING_SEED_OFFSET = 200, 8, 64, 1e-3, 2000


def build_flux_modules(arch: str, device: str = "cpu") -> dict[str, Any]:
    """The transformer, VAE and two text encoders of `arch`, randomly initialised on `device` ("meta": shapes only)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    quiet_libraries()
    config = ARCHITECTURES[arch]
    with torch.device(device):
        return {
            "transformer": FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True,
                                                  **config["transformer"]),
            # FLUX's VAE: 16 channels, shifted and scaled latents, no quant convolutions
            "vae": sd_vae(config["vae"], 16, scaling_factor=VAE_SCALE, shift_factor=VAE_SHIFT, use_quant_conv=False,
                          use_post_quant_conv=False),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_COMMON, **config["text_encoder"])),
            "text_encoder_2": T5EncoderModel(T5Config(**T5_COMMON, **config["text_encoder_2"])),
        }


def noise_latents(vae: Any, count: int) -> Any:
    """Scaled latents of `count` noise images of every brightness (vae_shaping's), never sketches."""
    import torch

    size = vae.config.sample_size
    images = (torch.rand(count, 3, 1, 1) * 2 - 1 + 0.3 * torch.randn(count, 3, size, size)).clamp(-1, 1)
    with torch.no_grad():
        sample = vae.encode(images).latent_dist.mean
    return (sample - vae.config.shift_factor) * vae.config.scaling_factor


def shape_transformer(transformer: Any, vae: Any, seed: int) -> None:
    """Train the tiny transformer in place, every weight, to denoise the latents of noise images under random
    conditioning. A random transformer has not learnt to denoise at all, and a low-rank adapter cannot teach it that
    in a smoke run (measured: a rank-16 LoRA's loss stalls at 1.4, a full fine-tune's falls to 0.75); shaped, it is a
    base that generates grey noise, which a LoRA re-steers towards sketches as a real one is re-steered to a style.
    It never sees a sketch: the smoke study's base images stay noise."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stylestudy.models.families import Conditioning, flow, flux

    family = flux.FAMILY
    noise = flow.FlowMatchNoise(FlowMatchEulerDiscreteScheduler(**SCHEDULER), family.settings)
    config = transformer.config
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed + SHAPING_SEED_OFFSET)
        pool = noise_latents(vae, SHAPING_POOL)  # encoded once: the VAE would cost more than the transformer
        optimizer = torch.optim.Adam(transformer.parameters(), lr=SHAPING_LEARNING_RATE)
        transformer.train()
        for _ in range(SHAPING_STEPS):
            clean = pool[torch.randint(0, SHAPING_POOL, (SHAPING_BATCH,))]
            conditioning = Conditioning(torch.randn(SHAPING_BATCH, 8, config.joint_attention_dim),
                                        torch.randn(SHAPING_BATCH, config.pooled_projection_dim))
            eps, timesteps = noise.draw(clean, 0.0)
            output = family.denoise(transformer, noise.noised(clean, eps, timesteps), timesteps, conditioning)
            loss = torch.nn.functional.mse_loss(output, noise.target(clean, eps, timesteps))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        transformer.eval()


def save_random_flux(out_dir: Path, seed: int, arch: str, shaped: bool = True) -> dict[str, int]:
    """Build a random FLUX.1 pipeline of `arch` from configs, save it as a diffusers folder; return sizes. The tiny
    one's VAE and transformer are shaped (unless `shaped` is false: unit tests that need shapes only)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16 if arch == "full" else torch.float32)  # full: 24 GB, not 48
        try:
            modules = build_flux_modules(arch)
        finally:
            torch.set_default_dtype(previous)
    if arch == "tiny" and shaped:  # random, the smoke study could show no style (vae_shaping.py, shape_transformer)
        from stylestudy.models.vae_shaping import shape_vae

        shape_vae(modules["vae"], modules["vae"].config.sample_size, seed)
        shape_transformer(modules["transformer"], modules["vae"], seed)
    counts = parameter_counts(f"{arch} FLUX.1", modules)
    pipe = FluxPipeline(**modules, tokenizer=sd_tokenizer_from_open_clip(), tokenizer_2=t5_tokenizer(),
                        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return counts
