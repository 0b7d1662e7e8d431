"""Random Stable Diffusion XL pipelines built from configs, saved as the folders StableDiffusionXLPipeline loads.

`tiny` serves the offline smoke setting: a two-level UNet with SDXL's "text_time" added embedding (the pooled text and
six time ids) and cross-attention at both levels (SDXL has none at its first; on 8 x 8 latents a UNet whose text
reaches only the 4 x 4 level barely showed the smoke study's positive control), two small CLIP text encoders, and SD2's tiny VAE
(4x downsampling), shaped at build time as SD2's is (vae_shaping.py) so that the smoke study's positive control can
see a style. `full` has the shapes of stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/ CLIP-L,
text_encoder_2/ OpenCLIP bigG with projection; config.json of each), saved in fp16 like that repository's fp16
variant, for speed and memory checks on a GPU without the Hub. The scheduler is SDXL's scheduler_config.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stylestudy.models.builders import parameter_counts, sd_tokenizer_from_open_clip, sd_vae
from stylestudy.models.loading import quiet_libraries

CLIP_COMMON = {"max_position_embeddings": 77, "vocab_size": 49408, "pad_token_id": 1, "bos_token_id": 49406,
               "eos_token_id": 49407}
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        # projection_class_embeddings_input_dim: 6 time ids x addition_time_embed_dim + the pooled width (32)
        "unet": {"sample_size": 8, "layers_per_block": 1, "block_out_channels": (32, 64),
                 "down_block_types": ("CrossAttnDownBlock2D",) * 2, "up_block_types": ("CrossAttnUpBlock2D",) * 2,
                 "attention_head_dim": (2, 4),
                 "transformer_layers_per_block": (1, 1), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                 "projection_class_embeddings_input_dim": 80},
        "vae": {"layers_per_block": 1, "block_out_channels": (32, 64, 64), "sample_size": 32},
        "text_encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
                         "projection_dim": 32, "hidden_act": "quick_gelu"},
        "text_encoder_2": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 37, "projection_dim": 32, "hidden_act": "gelu"},
    },
    "full": {
        "unet": {"sample_size": 128, "layers_per_block": 2, "block_out_channels": (320, 640, 1280),
                 "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
                 "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816},
        "vae": {"layers_per_block": 2, "block_out_channels": (128, 256, 512, 512), "sample_size": 1024,
                "scaling_factor": 0.13025},
        "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                         "intermediate_size": 3072, "projection_dim": 768, "hidden_act": "quick_gelu"},
        "text_encoder_2": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20,
                           "intermediate_size": 5120, "projection_dim": 1280, "hidden_act": "gelu"},
    },
}
UNET_COMMON = {"in_channels": 4, "out_channels": 4, "norm_num_groups": 32, "use_linear_projection": True,
               "addition_embed_type": "text_time"}
# SDXL-base-1.0's scheduler_config.json; the keys EulerDiscreteScheduler does not take are kept in the file, so that
# switching to DDIM or PNDM (generate.scheduler) reads them as the real folder's are read
EULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
         "use_karras_sigmas": False}
EULER_EXTRA = {"clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True}


def architecture(arch: str, second_width: int | None = None) -> dict[str, dict[str, Any]]:
    """ARCHITECTURES[arch], with the second text encoder `second_width` wide where given (its projection too, and the
    UNet's cross-attention and added-embedding widths that follow from it). The tiny encoders are equally wide, which
    a single-file reader cannot tell apart by shape as it tells the real 768 and 1280 apart (tests/test_export.py)."""
    config = ARCHITECTURES[arch]
    if second_width is None:
        return config
    unet = config["unet"]
    first, time_ids = config["text_encoder"]["hidden_size"], 6 * unet["addition_time_embed_dim"]
    return config | {
        "unet": unet | {"cross_attention_dim": first + second_width,
                        "projection_class_embeddings_input_dim": time_ids + second_width},
        "text_encoder_2": config["text_encoder_2"] | {"hidden_size": second_width, "projection_dim": second_width}}


def build_sdxl_modules(arch: str, second_width: int | None = None) -> dict[str, Any]:
    """The UNet, VAE and two text encoders of `arch` (`second_width`: architecture's), randomly initialised."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    quiet_libraries()
    config = architecture(arch, second_width)
    return {
        "unet": UNet2DConditionModel(**UNET_COMMON, **config["unet"]),
        # force_upcast: SDXL's VAE config asks the pipeline to decode in fp32 (it overflows in fp16)
        "vae": sd_vae(config["vae"], force_upcast=True),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_COMMON, **config["text_encoder"])),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_COMMON, **config["text_encoder_2"])),
    }


def save_random_sdxl(out_dir: Path, seed: int, arch: str, shaped: bool = True,
                     second_width: int | None = None) -> dict[str, int]:
    """Build a random Stable Diffusion XL pipeline of `arch` from configs, save it as a diffusers folder; sizes.
    shaped=False leaves the tiny VAE random (tests of anything but images: the shaping takes most of the time);
    second_width widens the second text encoder (architecture()), for tests only: fetch never passes it."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = build_sdxl_modules(arch, second_width)
    if arch == "tiny" and shaped:  # a random decoder ignores its latent: the smoke study could show no style (vae_shaping.py)
        from stylestudy.models.vae_shaping import shape_vae

        shape_vae(modules["vae"], modules["vae"].config.sample_size, seed)
    counts = parameter_counts(f"{arch} Stable Diffusion XL", modules)
    if arch == "full":
        modules = {name: module.half() for name, module in modules.items()}  # as the Hub repository's fp16 variant
    tokenizer = sd_tokenizer_from_open_clip()
    tokenizer.pad_token = "<|endoftext|>"  # CLIP-L's tokenizer pads with its end token; bigG's with "!" (id 0)
    scheduler = EulerDiscreteScheduler(**EULER)
    scheduler.register_to_config(**EULER_EXTRA)
    pipe = StableDiffusionXLPipeline(**modules, tokenizer=tokenizer, tokenizer_2=sd_tokenizer_from_open_clip(),
                                     scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return counts
