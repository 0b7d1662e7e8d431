"""LoRA fine-tuning of the denoiser (`finetune.method: lora`), through peft and diffusers' own adapter API; the model
family says which modules the adapter targets and how its pipeline loads an adapter.

Order inside a training setup:
1. load the UNet; if its frozen weights are to be held in half precision, cast it to that dtype now;
2. `add_lora` (freezes the UNet, adds the adapter); under fp16/bf16 weights, `keep_trainable_in_fp32` right after;
3. gradient checkpointing, channels_last, compile: in any order, after `add_lora`, as for full fine-tuning;
4. optimizer, gradient clipping and EMA on `trainable_parameters(unet)` (all parameters for full fine-tuning);
5. `accelerator.prepare`; `save_state`/`load_state` carry the adapter as part of the UNet's state dict.
At the end: unwrap, `ema.copy_to(trainable_parameters(unet))`, then `save_adapter` (the small file that
`pipe.load_lora_weights` reads) and `fused_copy(unet).save_pretrained(...)`, a plain UNet for a pipeline folder.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stylestudy.core.outputs import sort_safetensors_metadata
from stylestudy.models.families import Family

if TYPE_CHECKING:
    import torch
    from diffusers import UNet2DConditionModel

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the name `pipe.load_lora_weights(folder)` looks for
ADAPTER_NAME = "default"


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float, targets: tuple[str, ...]) -> None:
    """Freeze every weight and add a LoRA adapter (scale alpha / rank) to the `targets` modules, in place.

    The adapter starts as the identity (B = 0), so the first forward pass equals the base model's.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    unet.requires_grad_(False)  # peft freezes the base too; explicit so that the contract does not rest on that
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that require grad, in a fixed order: what the optimizer, clipping and EMA must be given."""
    return [param for param in model.parameters() if param.requires_grad]


def keep_trainable_in_fp32(unet: torch.nn.Module) -> None:
    """Upcast the trainable parameters to fp32, leaving frozen weights in their (half) dtype.

    Call it after `add_lora` whenever the UNet's weights were cast to fp16 or bf16 (peft creates the adapter in the
    base layer's dtype), and before the optimizer, the EMA and `accelerator.prepare` are built on the parameters:
    fp16 mixed precision refuses fp16 trainable weights ("Attempting to unscale FP16 gradients"). Not needed while
    the UNet stays fp32 (autocast does the half-precision compute then).
    """
    import torch
    from diffusers.training_utils import cast_training_params

    cast_training_params(unet, torch.float32)


def save_adapter(unet: UNet2DConditionModel, out_dir: Path, family: Family) -> Path:
    """Write the adapter as `out_dir/pytorch_lora_weights.safetensors` in diffusers' format; return the file.

    `unet` is the unwrapped model (after `accelerator.unwrap_model`). The adapter's config (rank, alpha, targets)
    goes into the file's metadata: without it `load_lora_weights` assumes alpha = rank and scales the LoRA wrongly.
    """
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    # peft keeps target_modules as a set, whose order changes with PYTHONHASHSEED, and safetensors writes metadata
    # in hash-map order: both sorted, the same weights give the same file (and the model folder its DVC hash).
    metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in unet.peft_config[ADAPTER_NAME].to_dict().items()}
    family.save_lora(layers, out_dir, ADAPTER_FILE, metadata)
    sort_safetensors_metadata(Path(out_dir) / ADAPTER_FILE)
    return Path(out_dir) / ADAPTER_FILE


def fused_copy(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain fp32 UNet with the LoRA merged into its weights and no adapter left; `unet` itself is unchanged.

    Its `save_pretrained` folder is an ordinary UNet folder that `UNet2DConditionModel.from_pretrained` loads
    without peft. The merge runs in fp32 so that half-precision base weights do not round the small LoRA update away.
    """
    import torch

    plain: Any = copy.deepcopy(unet).to(dtype=torch.float32, memory_format=torch.contiguous_format)
    plain.fuse_lora(adapter_names=[ADAPTER_NAME])
    plain.unload_lora()  # swaps every peft layer for its (now merged) base layer
    return plain
