"""A frozen base model's Linear layers held in 4-bit NF4 or 8-bit by bitsandbytes, for LoRA on top (QLoRA).

One function of ours, on the CPU and the GPU alike, instead of diffusers' `BitsAndBytesConfig` loader: that one
refuses to run without a GPU (diffusers 0.42, quantizers/bitsandbytes/bnb_quantizer.py: "No GPU found"), while
bitsandbytes' own `Linear4bit` / `Params4bit(quant_type="nf4")` and `Linear8bitLt` run forward and backward on a CPU,
so the path the tests take is the path a GPU runs. The weights are quantised as each layer is moved to `device`
(bitsandbytes quantises a Params4bit when it is moved): a 12B model never sits on the GPU in bf16.

What stays in full precision: the layers named in `keep` (for FLUX the input and output projections and the
timestep, guidance and pooled-text embedders, families/flux.py KEEP). diffusers' own loader converts every Linear of
FLUX (the model declares no `_keep_in_fp32_modules`); those few layers are 64M of 11.9B parameters (0.12 GiB in bf16)
and carry every token or the conditioning into and out of all blocks, as transformers keeps `lm_head`. Norms,
embeddings and convolutions are never Linear layers and stay as they are.
"""
from __future__ import annotations

from typing import Any

KINDS = ("nf4", "int8", "none")


def kept(name: str, keep: tuple[str, ...]) -> bool:
    """Whether the module called `name` lies inside one of the `keep` modules."""
    return any(name == k or name.startswith(k + ".") for k in keep)


def quantized_linear(linear: Any, kind: str, compute_dtype: Any, device: Any) -> Any:
    """A bitsandbytes layer holding `linear`'s weight in `kind` (nf4, int8), quantised on its way to `device`."""
    import bitsandbytes as bnb
    import torch

    bias = linear.bias is not None
    weight = linear.weight.data.to(compute_dtype)
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        # bitsandbytes repacks the weight for its AVX512-BF16 CPU kernel at the first forward in eval mode, and keeps
        # it so: a training step after validation then fails (an in-place add in that kernel's path). Off: a CPU
        # computes as a GPU does, through the canonical 4-bit layout.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    return layer.train(linear.training).to(device)  # in the mode of the layer it replaces


def quantize_linear_layers(model: Any, kind: str, compute_dtype: Any, device: Any, keep: tuple[str, ...] = ()) -> int:
    """Replace every torch.nn.Linear of `model` outside `keep` by its bitsandbytes `kind` layer on `device`, in place;
    the rest goes to `device` in `compute_dtype`. Marks the model as peft looks for it (`is_loaded_in_4bit`/`8bit`), so
    that peft's LoRA wraps the bitsandbytes layers with its own bnb layers. Returns how many layers were replaced."""
    import torch

    if kind not in KINDS[:2]:
        raise ValueError(f"quantisation {kind!r}: expected one of {KINDS[:2]}")
    names = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and not kept(name, keep)]
    for name in names:  # one layer at a time: its full-precision weight is freed before the next is quantised
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantized_linear(getattr(parent, child), kind, compute_dtype, device))
    _move_rest(model, compute_dtype, device)
    model.requires_grad_(False)
    setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    return len(names)


def _move_rest(model: Any, dtype: Any, device: Any) -> None:
    """The parameters and buffers that are not bitsandbytes weights, to `device` in `dtype` (floating ones only)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        for key, param in module.named_parameters(recurse=False):
            cast = dtype if param.is_floating_point() else None
            setattr(module, key, type(param)(param.data.to(device, dtype=cast), requires_grad=False))
        for key, buffer in module.named_buffers(recurse=False):
            module.register_buffer(key, buffer.to(device, dtype=dtype if buffer.is_floating_point() else None),
                                   persistent=key not in module._non_persistent_buffers_set)


def count_quantized(model: Any) -> int:
    """How many bitsandbytes layers `model` holds."""
    import bitsandbytes as bnb

    return sum(isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for module in model.modules())
