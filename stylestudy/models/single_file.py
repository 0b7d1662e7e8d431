"""A diffusers pipeline folder as one checkpoint in the original Stable Diffusion layout (the file ComfyUI, AUTOMATIC1111
and Forge load, and diffusers' `from_single_file` reads): every weight renamed to its original key, none dropped.

The original layout is that of Stability's repositories (ldm's `openaimodel.UNetModel`, `AutoencoderKL` and the text
encoders' wrappers), which diffusers converts from when it reads a single file (diffusers/loaders/single_file_utils.py)
and its scripts convert to (scripts/convert_diffusers_to_original_stable_diffusion.py, ..._sdxl.py); the renames here
are written from those layouts, read as references. Prefixes: the UNet under `model.diffusion_model.`, the VAE under
`first_stage_model.`; SD2's OpenCLIP text encoder under `cond_stage_model.model.`, SDXL's CLIP-L under
`conditioner.embedders.0.transformer.` and OpenCLIP bigG under `conditioner.embedders.1.model.`. OpenCLIP keeps q, k
and v in one `in_proj` matrix and its projection transposed; the VAE's attention projections are 1x1 convolutions.

A key no rule maps raises ValueError: a weight silently left out would load as random in a UI.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from stylestudy.models import loading

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
UNET_FIXED = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}


def unmapped(key: str, what: str) -> ValueError:
    return ValueError(f"{what}: no original-layout key for {key!r}; the single-file export would drop it")


def split_module(key: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', 'weight')."""
    module, _, leaf = key.rpartition(".")
    return module, leaf


def rename_resnet(rest: str, key: str) -> str:
    module, leaf = split_module(rest)
    if module not in RESNET:
        raise unmapped(key, "unet")
    return f"{RESNET[module]}.{leaf}"


def unet_key(key: str, layers: int, up_attentions: set[int]) -> str:
    """The original UNet key of a diffusers one; `layers` the config's layers_per_block, `up_attentions` the up blocks
    that hold attentions (their upsampler sits after them)."""
    for old, new in UNET_FIXED.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    step = layers + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + b * step + j
        if kind == "attentions":
            return f"input_blocks.{index}.1.{rest}"
        return f"input_blocks.{index}.0.{rename_resnet(rest, key)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * step + layers}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{rename_resnet(m[2], key)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = b * (layers + 1) + j
        if kind == "attentions":
            return f"output_blocks.{index}.1.{rest}"
        return f"output_blocks.{index}.0.{rename_resnet(rest, key)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * step + layers}.{2 if b in up_attentions else 1}.conv.{m[2]}"
    raise unmapped(key, "unet")


def unet_to_original(weights: dict[str, Any], config: dict) -> dict[str, Any]:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"unet layers_per_block {layers!r}: the original layout has one count for every block")
    up_attentions = {int(k.split(".")[1]) for k in weights if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    return {f"model.diffusion_model.{unet_key(k, layers, up_attentions)}": v for k, v in weights.items()}


def vae_key(key: str, n_blocks: int) -> str:
    coder, _, rest = key.partition(".")
    if coder in ("quant_conv", "post_quant_conv"):
        return key
    if coder not in ("encoder", "decoder"):
        raise unmapped(key, "vae")
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)", rest):
        level = int(m[2]) if m[1] == "down" else n_blocks - 1 - int(m[2])
        if m[4] is not None:
            tail = m[5].replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.{m[1]}.{level}.block.{m[4]}.{tail}"
        return f"{coder}.{m[1]}.{level}.{m[1]}sample.{m[5]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", rest):
        return f"{coder}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        module, leaf = split_module(m[1])
        if module not in VAE_ATTENTION:
            raise unmapped(key, "vae")
        return f"{coder}.mid.attn_1.{VAE_ATTENTION[module]}.{leaf}"
    named = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
    module, leaf = split_module(rest)
    if module in named:
        return f"{coder}.{named[module]}.{leaf}"
    raise unmapped(key, "vae")


def vae_to_original(weights: dict[str, Any], config: dict) -> dict[str, Any]:
    out = {}
    for key, value in weights.items():
        new = vae_key(key, len(config["block_out_channels"]))
        if ".mid.attn_1." in new and new.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]  # a linear layer there, a 1x1 convolution in the original
        out[f"first_stage_model.{new}"] = value
    return out


def openclip_to_original(weights: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A transformers CLIP text encoder in OpenCLIP's layout (SD2's text encoder, SDXL's second)."""
    import torch

    plain = {k.removeprefix("text_model."): v for k, v in weights.items() if not k.endswith("position_ids")}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out: dict[str, Any] = {}
    for key, value in plain.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            block = f"{prefix}transformer.resblocks.{m[1]}."
            if m[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if m[2] == "self_attn.q_proj":  # q, k, v stacked into one matrix, in that order
                    parts = [plain[f"encoder.layers.{m[1]}.self_attn.{x}_proj.{m[3]}"] for x in "qkv"]
                    out[f"{block}attn.in_proj_{m[3]}"] = torch.cat(parts)
            elif m[2] in CLIP_LAYER:
                out[f"{block}{CLIP_LAYER[m[2]]}.{m[3]}"] = value
            else:
                raise unmapped(key, "text encoder")
        else:
            raise unmapped(key, "text encoder")
    return out


def clip_to_original(weights: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A transformers CLIP text encoder kept in its own layout (SDXL's first, under its wrapper's prefix)."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v for k, v in weights.items()
            if not k.endswith("position_ids")}


def read_component(folder: Path, name: str) -> tuple[dict[str, Any], dict]:
    """A component's weights (every safetensors file of its folder) and its config."""
    from safetensors.torch import load_file

    weights: dict[str, Any] = {}
    for path in sorted((folder / name).glob("*.safetensors")):
        weights |= load_file(path)
    return weights, loading.read_json(folder / name / "config.json")


def sd2_checkpoint(folder: Path) -> dict[str, Any]:
    unet, vae, text = (read_component(folder, name) for name in ("unet", "vae", "text_encoder"))
    return (unet_to_original(*unet) | vae_to_original(*vae)
            | openclip_to_original(text[0], "cond_stage_model.model."))


def sdxl_checkpoint(folder: Path) -> dict[str, Any]:
    unet, vae, text, text_2 = (read_component(folder, name)
                               for name in ("unet", "vae", "text_encoder", "text_encoder_2"))
    return (unet_to_original(*unet) | vae_to_original(*vae)
            | clip_to_original(text[0], "conditioner.embedders.0.transformer.")
            | openclip_to_original(text_2[0], "conditioner.embedders.1.model."))


# The families that have a single-file layout (stylestudy/core/config.py SINGLE_FILE_FAMILIES names the same).
CHECKPOINTS: dict[str, Callable[[Path], dict[str, Any]]] = {"sd2": sd2_checkpoint, "sdxl": sdxl_checkpoint}
