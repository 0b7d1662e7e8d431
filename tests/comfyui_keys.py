"""The LoRA names ComfyUI maps to a model's weights, by the rule its key map follows (comfy/lora.py
`model_lora_keys_unet`, with comfy/utils.py `unet_to_diffusers` and `flux_to_diffusers`, read in ComfyUI's repository
and written again here from the description below, not copied): a reader that is not ours and not diffusers, against
which tests/test_export.py checks every exported LoRA module. ComfyUI itself is not installed here.

UNet models (SD2, SDXL). From the UNet's config ComfyUI lists the diffusers name of each weight it knows, block by
block: every resnet's norm1, conv1, time_emb_proj, norm2, conv2 and conv_shortcut; every attention's norm, proj_in
and proj_out and, in each of its transformer blocks, norm1 to norm3, attn1's and attn2's to_q, to_k, to_v and
to_out.0, ff.net.0.proj and ff.net.2; each down and up sampler's conv; conv_in, conv_norm_out, conv_out and the time,
class and added embeddings' two linears. A kohya LoRA module is found by `lora_unet_` + that name with its dots as
underscores; ComfyUI's loader then reads `<name>.lora_up.weight`, `<name>.lora_down.weight` and `<name>.alpha`.
Down blocks hold `layers_per_block` resnets, up blocks one more; a block has attentions when its type is a
cross-attention one, with `transformer_layers_per_block` transformer blocks each (reversed for the up blocks, the last
down block's for the middle), as ComfyUI reads the same counts from the single-file UNet.

FLUX. ComfyUI maps `transformer.` + the diffusers name of the double blocks' attn.to_q, to_k, to_v, add_q_proj,
add_k_proj, add_v_proj, to_out.0 and to_add_out, norm1.linear, norm1_context.linear, ff.net.0.proj, ff.net.2,
ff_context.net.0.proj and ff_context.net.2; of the single blocks' attn.to_q, to_k, to_v, proj_mlp, proj_out and
norm.linear; and of x_embedder, context_embedder, proj_out, norm_out.linear and the time, text and guidance embedders'
linears. Its loader reads `<name>.lora_A.weight` and `<name>.lora_B.weight` (and `<name>.alpha` where present).
"""
from __future__ import annotations

RESNET = ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")
ATTENTION = ("norm", "proj_in", "proj_out")
TRANSFORMER_BLOCK = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
                     *(f"{attn}.{proj}" for attn in ("attn1", "attn2")
                       for proj in ("to_q", "to_k", "to_v", "to_out.0")))
UNET_BASIC = ("conv_in", "conv_norm_out", "conv_out", *(f"{embedding}.linear_{i}" for i in (1, 2)
              for embedding in ("time_embedding", "class_embedding", "add_embedding")))
FLUX_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
               "attn.to_out.0", "attn.to_add_out", "norm1.linear", "norm1_context.linear", "ff.net.0.proj", "ff.net.2",
               "ff_context.net.0.proj", "ff_context.net.2")
FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear")
FLUX_BASIC = ("x_embedder", "context_embedder", "proj_out", "norm_out.linear",
              *(f"time_text_embed.{kind}_embedder.linear_{i}" for kind in ("timestep", "text", "guidance")
                for i in (1, 2)))


def attention_block(prefix: str, depth: int) -> list[str]:
    return [f"{prefix}.{part}" for part in ATTENTION] + [
        f"{prefix}.transformer_blocks.{t}.{part}" for t in range(depth) for part in TRANSFORMER_BLOCK]


def unet_modules(config: dict) -> set[str]:
    """The diffusers module names ComfyUI maps for a UNet of this diffusers config."""
    blocks, layers = len(config["block_out_channels"]), config["layers_per_block"]
    depth = config.get("transformer_layers_per_block", 1)
    depths = [depth] * blocks if isinstance(depth, int) else list(depth)
    names = list(UNET_BASIC)
    for x, kind in enumerate(config["down_block_types"]):
        for i in range(layers):
            names += [f"down_blocks.{x}.resnets.{i}.{part}" for part in RESNET]
            if "CrossAttn" in kind:
                names += attention_block(f"down_blocks.{x}.attentions.{i}", depths[x])
        names.append(f"down_blocks.{x}.downsamplers.0.conv")
    names += [f"mid_block.resnets.{i}.{part}" for i in (0, 1) for part in RESNET]
    names += attention_block("mid_block.attentions.0", depths[-1])
    for x, kind in enumerate(config["up_block_types"]):
        for i in range(layers + 1):
            names += [f"up_blocks.{x}.resnets.{i}.{part}" for part in RESNET]
            if "CrossAttn" in kind:
                names += attention_block(f"up_blocks.{x}.attentions.{i}", depths[::-1][x])
        names.append(f"up_blocks.{x}.upsamplers.0.conv")
    return set(names)


def kohya_unet_names(config: dict) -> set[str]:
    """The `lora_unet_...` module names ComfyUI finds in a kohya LoRA of this UNet."""
    return {"lora_unet_" + name.replace(".", "_") for name in unet_modules(config)}


def flux_transformer_names(config: dict) -> set[str]:
    """The `transformer.<module>` names ComfyUI finds in a diffusers-layout LoRA of a FLUX.1 transformer."""
    names = [*FLUX_BASIC, *(f"transformer_blocks.{i}.{part}" for i in range(config["num_layers"])
                            for part in FLUX_DOUBLE),
             *(f"single_transformer_blocks.{i}.{part}" for i in range(config["num_single_layers"])
               for part in FLUX_SINGLE)]
    return {"transformer." + name for name in names}
