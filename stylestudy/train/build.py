"""What a fine-tune is built from: the accelerator, the denoiser to train (every weight or a LoRA adapter) with its
noise process, the data loader, and the optimizer, LR schedule and EMA over the trainable parameters
(`TrainingState`). stylestudy/train/loop.py runs the loop."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TYPE_CHECKING

from stylestudy.models import loading
from stylestudy.models.families import Family
from stylestudy.train import checkpoints, launch, lora, lowmem
from stylestudy.train.batches import Numbered, TrainingData
from stylestudy.train.losses import Trainee

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingState:
    """Everything the loop steps, prepared by accelerate: the denoiser (maybe wrapped for several processes), the
    same denoiser unwrapped (for validation on one process), its trainable parameters, optimizer, LR schedule, EMA
    (None when off), the data loader, how many optimizer steps make the run, and the optimizer step fused into the
    backward pass (None unless `fused_backward`)."""

    trainee: Trainee
    model: Any
    trainable: list[Any]
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    dataloader: Any
    max_steps: int
    steps_per_epoch: int
    fused: lowmem.FusedBackward | None = None


def build_accelerator(p: dict, seed: int) -> Accelerator:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    precision = loading.precision_that_runs(p["mixed_precision"])
    # The seedable sampler shuffles epoch e with seed + e, whatever came before: a resumed run sees the same order.
    data_loading = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    # cpu: without a CUDA GPU, processes that torchrun started (conf/accelerate/cpu.yaml) join one gloo group instead
    # of each training alone; a single process runs on the CPU either way.
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=p["gradient_accumulation_steps"],
                              dataloader_config=data_loading, cpu=not torch.cuda.is_available())
    launch.quiet_unless_main(accelerator)
    if precision != p["mixed_precision"]:
        log.info("mixed_precision %s runs as %s on this device", p["mixed_precision"], precision)
    return accelerator


def load_trainee(family: Family, sd_dir: Path, p: dict, device: Any = None) -> Trainee:
    """The denoiser in fp32 (every weight trainable, or a LoRA adapter on the family's attention projections with
    `method: lora`; autocast computes in half precision) and the training noise process. Memory options: LoRA's
    frozen base in half precision (`lora_half_base`), every weight in bf16 (`weights_dtype`, checked against
    `device`, the accelerator's)."""
    import torch

    denoiser = family.load_denoiser(sd_dir)
    lowmem.make_trainable(denoiser, p, family.lora_targets, device or torch.device("cpu"))
    if p["gradient_checkpointing"]:
        denoiser.enable_gradient_checkpointing()
    if p["channels_last"] and p["optimizer"] == "adamw8bit":
        # bitsandbytes makes the weights contiguous at its first step while its states stay NHWC: no gain, and a
        # resumed run then trains on other numbers.
        log.info("channels_last is ignored with optimizer adamw8bit")
    elif p["channels_last"]:
        denoiser.to(memory_format=torch.channels_last)
    if p["compile_unet"]:
        denoiser.compile()  # in place: the module, its state dict and checkpoints keep their names
    denoiser.train()
    return Trainee(family, denoiser, family.load_noise_process(sd_dir))


def make_optimizer(parameters: list[Any], p: dict) -> Any:
    import torch

    kwargs = {"lr": p["learning_rate"], "betas": (p["adam_beta1"], p["adam_beta2"]),
              "weight_decay": p["adam_weight_decay"], "eps": p["adam_epsilon"]}
    if p["optimizer"] == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **kwargs)
    if p["optimizer"] == "adamw_fused":
        # One kernel for all parameters on CUDA instead of a few per tensor; foreach is the CPU's closest.
        on_cuda = torch.cuda.is_available()
        return torch.optim.AdamW(parameters, fused=on_cuda, foreach=not on_cuda, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def make_dataloader(data: TrainingData, batch_size: int, num_workers: int, seed: int) -> Any:
    """Shuffled, numbered batches of the training items; the order depends only on the seed and epoch."""
    import torch

    # Numbered: each batch carries its items' indices, so that the loop can tell which items each process trained on.
    dataset = checkpoints.SeededItems(Numbered(data.items), seed)
    # With its own generator, making an iterator draws the workers' base seed from it, not from the global RNG.
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=data.collate, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def release_memory(device: Any) -> None:
    """Hand the memory of what is no longer referenced (the frozen encoders once the data is cached) back to the
    device, for the denoiser's training."""
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def denoiser_input_dtype(accelerator: Accelerator) -> Any:
    """What the prepared denoiser's inputs must be cast to: DeepSpeed casts its weights to the half type and adds no
    autocast, so fp32 latents and text embeddings (cached ones above all) meet bf16 weights; without mixed precision
    the fp32 weights have no autocast either, and the half-precision embeddings of encode.mixed_precision meet them;
    None (autocast casts) elsewhere."""
    import torch

    if accelerator.mixed_precision == "no":
        return torch.float32
    if accelerator.distributed_type != "DEEPSPEED":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)


def prepare_training(trainee: Trainee, dataloader: Any, p: dict, accelerator: Accelerator) -> TrainingState:
    """Optimizer, LR schedule and EMA over the trainable parameters (all of the denoiser, or the LoRA adapter),
    prepared by accelerate; the EMA is registered so that checkpoints carry it."""
    from diffusers.optimization import get_scheduler

    # Each process sees its shard of the data: steps come from the prepared dataloader, not the whole dataset.
    dataloader = accelerator.prepare(dataloader)
    steps_per_epoch = math.ceil(len(dataloader) / p["gradient_accumulation_steps"])
    max_steps = p["max_train_steps"] or p["epochs"] * steps_per_epoch
    trainable = lora.trainable_parameters(trainee.denoiser)
    optimizer = make_optimizer(trainable, p)
    # accelerate steps a prepared scheduler once per process at every optimizer step.
    n = accelerator.num_processes
    lr_scheduler = get_scheduler(p["lr_scheduler"], optimizer, num_warmup_steps=p["lr_warmup_steps"] * n,
                                 num_training_steps=max_steps * n)
    ema = lowmem.make_ema(trainable, p, accelerator.device)
    if accelerator.distributed_type == "DEEPSPEED":
        # DeepSpeed sizes its buffers by one process's batch: from a dataloader in this same prepare call, or from here
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = p["train_batch_size"]
    denoiser, optimizer, lr_scheduler = accelerator.prepare(trainee.denoiser, optimizer, lr_scheduler)
    if ema:
        accelerator.register_for_checkpointing(ema)
    fused = lowmem.fuse(trainable, optimizer, p, accelerator) if p["fused_backward"] else None
    prepared = Trainee(trainee.family, denoiser, trainee.noise, denoiser_input_dtype(accelerator))
    return TrainingState(prepared, accelerator.unwrap_model(denoiser), trainable, optimizer, lr_scheduler, ema,
                         dataloader, max_steps, steps_per_epoch, fused)
