"""A fine-tune's training memory measured before it runs: the chosen settings' optimizer steps on fake tensors at the
run's shapes, and the check of `finetune.memory_budget_gb` against them.

`measure_training` builds the family's denoiser from its config on the meta device (held as the run holds it: FLUX's
base quantised), makes it trainable as finetune does (lowmem.make_trainable: the LoRA adapter, the memory options'
dtypes), makes every tensor fake (memory.fake_parameters), and tracks two optimizer steps (memory.track_steps) as
stylestudy/train/loop.py takes them: micro-batches of the family's example inputs (forward under autocast, backward),
gradient clipping, the optimizer (build.make_optimizer) and the EMA update (lowmem.make_ema), or with
`fused_backward` one micro-batch whose backward pass steps (lowmem.FusedBackward), each read from the finetune
settings `p`. Two micro-batches stand for any accumulation of two or more: from the second on, each starts from the
same tensors (the gradients of the ones before). Not run: the noise process (latent-sized
tensors) and the fp16 loss scaler (a few scalars). bench/memory_measured.py runs it at full shapes for the tables.

`check_budget` (the finetune stage, before any weight is loaded) adds what stays on the device beside the step (the
frozen VAE and text encoders the run keeps, counted from their safetensors headers) and ALLOWANCE for what tensor
accounting cannot see (docs/performance.md "Memory budget"), and refuses in one line when the sum exceeds the budget.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from stylestudy.core.config import UserError
from stylestudy.data import latents
from stylestudy.models.families import Family
from stylestudy.train import lora, lowmem, memory

log = logging.getLogger(__name__)
MICRO_BATCHES = 2  # see the docstring: more give the same peak
# What the tracker cannot see, added before the comparison: cuBLAS and cuDNN workspaces (cuBLAS up to 32 MiB a
# handle on Hopper; cuDNN convolution workspaces reach hundreds of MiB on a UNet) and the loss scaler, as a fixed
# part; the caching allocator's rounding (512 B small, 2 MiB large blocks) and the fragmentation of what it reserves
# beyond what is allocated, as a share of the peak. The CUDA context (about 0.5 GiB) is outside the budget.
ALLOWANCE_FIXED_GIB = 0.5
ALLOWANCE_SHARE = 0.10
GIB = 2**30


@dataclass(frozen=True)
class StepMemory:
    """The tracked peak of a fine-tune's steps, and the denoiser's parameter counts (all, trainable)."""

    peak: memory.MemoryPeak
    parameters: int
    trainable_parameters: int


def denoiser_config(folder: Path, family: Family) -> dict[str, Any]:
    """The denoiser's config.json in a pipeline folder."""
    return json.loads((folder / family.denoiser_folder / "config.json").read_text())


def latent_shape(family: Family, vae_config: dict[str, Any], config: dict[str, Any], resolution: int,
                 batch_size: int) -> tuple[int, ...]:
    """The (batch, C, h, w) latents of `batch_size` images at `resolution`, as the family computes them."""
    shape = family.latent_shape(SimpleNamespace(config=SimpleNamespace(**vae_config)),
                                SimpleNamespace(config=SimpleNamespace(**config)), resolution)
    return (batch_size, *shape[1:])


def micro_batches(p: dict) -> int:
    """The micro-batches a measured step takes: two stand for any accumulation of two or more."""
    return min(MICRO_BATCHES, p["gradient_accumulation_steps"])


def training_step(family: Family, model: Any, state: dict[str, Any], config: dict[str, Any],
                  shape: tuple[int, ...], p: dict, device: Any) -> Callable[[Callable[[], None]], None]:
    """One optimizer step as loop.train_batch takes it: micro-batches, clipping, the optimizer step, the EMA; with
    `fused_backward` (state["fused"]) the backward pass steps and only the EMA follows."""
    import torch

    count, fused = micro_batches(p), state["fused"]
    # a CPU runs fp16 as bf16: the same bytes
    half = torch.float16 if device.type == "cuda" and p["mixed_precision"] == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if half == torch.float16 else None
    autocast = p["mixed_precision"] != "no"

    def step(after_backward: Callable[[], None]) -> None:
        for _ in range(count):
            with torch.device(device):
                latents, timesteps, conditioning = family.example_inputs(config, shape)
            with torch.autocast(device.type, dtype=half, enabled=autocast):
                prediction = family.denoise(model, latents, timesteps, conditioning)
            loss = (prediction.float() - latents).pow(2).mean() / count
            (scaler.scale(loss) if scaler else loss).backward()
            after_backward()
        if fused is not None:
            fused.take_squared_norm()  # the loop reads it as a float, which fake tensors lack
        else:
            optimizer_step(state, p, scaler)
        if state["ema"] is not None:
            state["ema"].step(state["trainable"])
    return step


def optimizer_step(state: dict[str, Any], p: dict, scaler: Any) -> None:
    """Clipping over all trainable parameters, the optimizer step (through the fp16 loss scaler where there is one)."""
    import torch

    if scaler:
        scaler.unscale_(state["optimizer"])
    torch.nn.utils.clip_grad_norm_(state["trainable"], p["max_grad_norm"])
    scaler.step(state["optimizer"]) if scaler else state["optimizer"].step()
    if scaler:
        scaler.update()
    state["optimizer"].zero_grad(set_to_none=True)


def build_denoiser(family: Family, config: dict[str, Any], p: dict, on_gpu: bool, device: Any) -> Any:
    """The denoiser of `config` as the run trains it, with its LoRA adapter for `method: lora`, on `device`."""
    import torch

    torch.manual_seed(0)
    with torch.device(device):
        model = family.denoiser_from_config(config, on_gpu)
        # the bf16 check belongs to the run's device: the training stage makes it
        lowmem.make_trainable(model, p, family.lora_targets, torch.device("cpu"))
    return model


def measure_training(family: Family, config: dict[str, Any], p: dict, shape: tuple[int, ...], on_gpu: bool = True,
                     device: Any = None, fake: bool = True) -> StepMemory:
    """Track two optimizer steps of the settings `p` on the denoiser of `config` with latents of `shape` (batch
    first): on fake tensors on the CPU by default (seconds, no memory), or real ones on `device`. `on_gpu`: hold the
    denoiser as a run on a GPU does (FLUX's base computes in bf16 there, fp32 on a CPU)."""
    import contextlib

    import torch
    from stylestudy.train import build

    device = torch.device(device or "cpu")
    model = build_denoiser(family, config, p, on_gpu, torch.device("meta") if fake else device)
    with memory.fake_tensors() if fake else contextlib.nullcontext() as mode:
        if fake:
            memory.fake_parameters(model, device, mode)
        if p["gradient_checkpointing"]:
            model.enable_gradient_checkpointing()
        model.train()
        trainable = lora.trainable_parameters(model)
        optimizer = memory.make_optimizer(lambda: build.make_optimizer(trainable, p), mode)
        # an EMA on the CPU: off the device measured (on the meta device, no memory, under fake tensors)
        ema = lowmem.make_ema(trainable, p, device, host="meta" if fake else "cpu")
        fused = lowmem.FusedBackward(trainable, optimizer, p["max_grad_norm"]) if p["fused_backward"] else None
        state = {"optimizer": optimizer, "trainable": trainable, "ema": ema, "fused": fused}
        on_device = [t for t in (ema.shadow_params if ema else ()) if t.device.type == device.type]
        peak = memory.track_steps(model, optimizer, training_step(family, model, state, config, shape, p, device),
                                  others=on_device)
    return StepMemory(peak, sum(map(_numel, model.parameters())), sum(map(_numel, trainable)))


def _numel(tensor: Any) -> int:
    """How many values a parameter holds: a 4-bit weight's own shape, not its packed bytes'."""
    state = getattr(tensor, "quant_state", None)
    return (state.shape if state is not None else tensor.shape).numel()


def frozen_bytes(folders: list[Path], dtype: Any) -> int:
    """Bytes of the weights in `folders` held in `dtype`, counted from their safetensors headers (nothing loaded)."""
    import math

    from safetensors import safe_open

    values = 0
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as weights:
                values += sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    return values * dtype.itemsize


def kept_folders(family: Family, sd_dir: Path, p: dict, cached: bool, guide_dir: Path) -> list[Path]:
    """The frozen models a run keeps on the device while it trains: the text encoders when it encodes every step,
    the VAE then and for validation or the CLIP loss, the guide CLIP for the CLIP loss."""
    clip_loss = p["clip_loss"]["weight"] > 0
    encoders = [sd_dir / name for name in family.weighted if name not in (family.denoiser_folder, "vae")]
    return ([] if cached else encoders) + ([sd_dir / "vae"] if not cached or p["validate_every"] or clip_loss else []) \
        + ([guide_dir] if clip_loss else [])


def planned_bytes(step: StepMemory, frozen: int) -> int:
    """What a run is planned to take: the tracked peak and the frozen models, plus the allowance."""
    return int((step.peak.total + frozen) * (1 + ALLOWANCE_SHARE) + ALLOWANCE_FIXED_GIB * GIB)


def remedies(p: dict, cached: bool) -> str:
    """The settings that lower a run's memory, those not chosen already."""
    full, lora_run = p["method"] == "full", p["method"] == "lora"
    offers = [("finetune.method lora", full),
              ("finetune.lora_half_base true", lora_run and not p["lora_half_base"]),
              ("finetune.fused_backward true with weights_dtype bf16 (docs/sd3.md \"SD3 full in 16 GB\")",
               full and not p["fused_backward"]),
              ("finetune.ema_device cpu", p["use_ema"] and p["ema_device"] != "cpu"),
              ("finetune.train_batch_size 1", p["train_batch_size"] > 1),
              ("finetune.gradient_checkpointing true", not p["gradient_checkpointing"]),
              ("finetune.optimizer adamw8bit", p["optimizer"] != "adamw8bit"), ("finetune.use_ema false", p["use_ema"]),
              ("encode.cache_latents true", not cached), ("a lower encode.resolution", True)]
    return ", ".join(offer for offer, useful in offers if useful)


def check_budget(family: Family, sd_dir: Path, p: dict, settings: latents.EncodeSettings, guide_dir: Path,
                 device_type: str) -> None:
    """Refuse in one line a run on `device_type` whose measured memory exceeds `finetune.memory_budget_gb`; log it
    when it fits."""
    import torch

    budget = p["memory_budget_gb"]
    if not budget:
        return
    resolution, cached = settings.resolution, latents.cacheable(settings)
    config = denoiser_config(sd_dir, family)
    vae_config = json.loads((sd_dir / "vae" / "config.json").read_text())
    shape = latent_shape(family, vae_config, config, resolution, p["train_batch_size"])
    try:
        step = measure_training(family, config, p, shape, on_gpu=device_type == "cuda")
    except NotImplementedError as error:
        raise UserError(f"params.yaml: finetune.memory_budget_gb cannot be checked: {error}; set it to 0") from error
    frozen = frozen_bytes(kept_folders(family, sd_dir, p, cached, guide_dir),
                          settings.encoders_dtype(torch.device(device_type)))
    planned = planned_bytes(step, frozen)
    figures = (f"{planned / GIB:.2f} GiB measured at {resolution} px, batch {p['train_batch_size']} (training step "
               f"{step.peak.total / GIB:.2f}, frozen models kept {frozen / GIB:.2f}, allowance "
               f"{(planned - step.peak.total - frozen) / GIB:.2f})")
    if planned > budget * GIB:
        raise UserError(f"params.yaml: finetune.memory_budget_gb is {budget:g} GiB but this fine-tune needs {figures}; "
                        f"lower it with {remedies(p, cached)}, or raise the budget")
    log.info("memory: %s, within finetune.memory_budget_gb %g GiB", figures, budget)
