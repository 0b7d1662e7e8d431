"""A tiny random Versatile Diffusion, built offline in the Hub repository's layout, then converted as a download is.

The image UNet is the smoke SD's (stylestudy/models/builders.py); the text UNet is a UNetFlatConditionModel of the
same blocks, so that each cross-attention block has its twin to swap with, as in shi-labs/versatile-diffusion. The
text encoder is a CLIPTextModelWithProjection (VD normalises its projected tokens by the pooled embedding's norm).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from stylestudy.models.builders import SD_ARCHITECTURES, parameter_counts, sd_tokenizer_from_open_clip, sd_vae
from stylestudy.models import loading
from stylestudy.models.loading import quiet_libraries

FLAT_BLOCKS = {"CrossAttnDownBlock2D": "CrossAttnDownBlockFlat", "DownBlock2D": "DownBlockFlat",
               "UpBlock2D": "UpBlockFlat", "CrossAttnUpBlock2D": "CrossAttnUpBlockFlat"}


def build_vd_modules() -> dict[str, Any]:
    """The tiny image UNet, text UNet, VAE and text encoder, randomly initialised."""
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from stylestudy.models.builders import TEXT_COMMON, UNET_COMMON

    quiet_libraries()
    config = SD_ARCHITECTURES["tiny"]
    unet = UNET_COMMON | config["unet"]
    flat = unet | {key: tuple(FLAT_BLOCKS[block] for block in unet[key])
                   for key in ("down_block_types", "up_block_types")}
    return {
        "image_unet": UNet2DConditionModel(**unet),
        "text_unet": UNetFlatConditionModel(**flat, mid_block_type="UNetMidBlockFlatCrossAttn"),
        "vae": sd_vae(config["vae"]),
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_COMMON, **config["text_encoder"])),
    }


def save_hub_layout(out_dir: Path, seed: int) -> dict[str, int]:
    """A random tiny VD in the Hub's layout (image_unet and text_unet, attention not swapped); return sizes."""
    import torch
    from diffusers import DDIMScheduler, VersatileDiffusionTextToImagePipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = build_vd_modules()
    # shi-labs/versatile-diffusion's scheduler: DDIM on SD's scaled-linear betas.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    pipe = VersatileDiffusionTextToImagePipeline(**modules, tokenizer=sd_tokenizer_from_open_clip(),
                                                 scheduler=scheduler)
    pipe._swap_unet_attention_blocks()  # undo the swap its constructor made: save the modules as built
    pipe.save_pretrained(out_dir, safe_serialization=True)
    # model_index.json as the Hub repository spells it: the all-in-one pipeline, the text UNet in VD's own module
    index = loading.read_json(out_dir / "model_index.json")
    index |= {"_class_name": "VersatileDiffusionPipeline",
              "text_unet": ["versatile_diffusion", "UNetFlatConditionModel"]}
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2))
    return parameter_counts("tiny Versatile Diffusion", modules)


def save_random_vd(out_dir: Path, seed: int, arch: str) -> dict[str, int]:
    """The canonical text-to-image folder of a random VD of `arch` (tiny only), converted from the Hub layout."""
    from stylestudy.models.families import vd

    if arch != "tiny":
        raise ValueError(f"a random Versatile Diffusion is built tiny only, not {arch!r}")
    with tempfile.TemporaryDirectory() as hub_layout:
        counts = save_hub_layout(Path(hub_layout), seed)
        vd.convert(Path(hub_layout), out_dir)
    return counts
