"""The training loop: one batch to a loss and a step, logging and validation, resumable checkpoints, and the final
denoiser with the EMA weights in place. stages/finetune.py builds what it runs on (stylestudy/train/build.py)."""
from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from tqdm import tqdm

from stylestudy.core.config import UserError
from stylestudy.train import checkpoints, launch, lora, losses
from stylestudy.train.losses import Guide
from stylestudy.train.validation import ValidationSet
from stylestudy.train.build import TrainingState

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)
# The fp16 loss scaler halves its scale at every overflow, from 2^16: this low, 36 overflows came in a row (it grows
# back only after 2,000 clean steps) and the loss itself is not finite
MIN_LOSS_SCALE = 2.0 ** -20


@dataclass(frozen=True)
class Extras:
    """What the loop takes beside the training state: what turns a batch into the loss's inputs, the CLIP loss's
    guide (None when off), the validation set (None when off or on the other processes) and dvclive (main process)."""

    to_inputs: Callable
    guide: Guide | None
    validation: ValidationSet | None
    live: Any


def peak_memory_mb(device: Any) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loss_scale(accelerator: Accelerator) -> float | None:
    """The fp16 loss scaler's current scale (a CPU-GPU sync point, once per optimizer step); None without a scaler."""
    return accelerator.scaler.get_scale() if accelerator.scaler is not None else None


def step_was_skipped(accelerator: Accelerator, scale_before: float | None) -> bool:
    """Whether the optimizer step just taken was skipped for an fp16 overflow. accelerate tells for DeepSpeed and for
    optimizers that torch's GradScaler steps itself, not for fused ones (it passes them found_inf, and they skip
    inside the kernel): the scaler lowers its scale after every overflow and only then, which tells for all."""
    scale = loss_scale(accelerator)
    return accelerator.optimizer_step_was_skipped or (scale is not None and scale < scale_before)


def train_batch(batch: Any, state: TrainingState, extras: Extras, p: dict, accelerator: Accelerator, step: int) \
        -> tuple[dict, float, bool]:
    """Encode one batch, forward and backward towards optimizer step `step` (0-based), and the optimizer step at the
    end of an accumulation; the losses (loss, loss_mse, loss_clip), the grad norm, and whether an optimizer step was
    applied (False within an accumulation, and for a step the fp16 loss scaler skipped: the LR schedule then stays)."""
    grad_norm, applied = float("nan"), False
    with accelerator.accumulate(state.trainee.denoiser):
        terms = losses.training_loss(extras.to_inputs(batch), state.trainee, p, step, extras.guide)
        accelerator.backward(terms["loss"])  # with fused_backward, every parameter is clipped and stepped in here
        if state.fused is not None:  # no accumulation, no loss scaler (checks.check_memory_settings)
            state.lr_scheduler.step()
            return terms, state.fused.take_grad_norm(), True
        if accelerator.sync_gradients:
            norm = accelerator.clip_grad_norm_(state.trainable, p["max_grad_norm"])  # None: DeepSpeed clips, unread
            grad_norm = float("nan") if norm is None else float(norm)
        scale = loss_scale(accelerator) if accelerator.sync_gradients else None
        state.optimizer.step()
        applied = accelerator.sync_gradients and not step_was_skipped(accelerator, scale)
        if applied or not accelerator.sync_gradients:
            state.lr_scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    return terms, grad_norm, applied


def log_step(live: Any, values: dict) -> None:
    for name, value in values.items():
        live.log_metric(name, value)
    live.next_step()


def after_step(step: int, terms: dict, grad_norm: float, state: TrainingState, extras: Extras, p: dict) -> float:
    """Log the step (and validate every validate_every steps) to dvclive, on the main process; return the loss."""
    values = {name: float(value.detach()) for name, value in terms.items()}
    if extras.live is not None:
        if extras.validation is not None and step % p["validate_every"] == 0:
            extras.validation.log(extras.live, state.model, step)
        log_step(extras.live, values | {"lr": state.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm})
    return values["loss"]


def count_skip(skipped: int, step: int, accelerator: Accelerator) -> int:
    """Log an optimizer step the fp16 loss scaler skipped (it is not counted, nor seen by the EMA, the LR schedule or
    dvclive); stop with one line once the scale fell below MIN_LOSS_SCALE."""
    skipped += 1
    scale = loss_scale(accelerator)
    log.warning("optimizer step %d skipped: the fp16 gradients overflowed (loss scale now %s); %d skipped so far",
                step + 1, scale, skipped)
    if scale is not None and scale < MIN_LOSS_SCALE:
        raise UserError(f"finetune: the fp16 gradients overflowed at every step until the loss scale fell to {scale}: "
                        "the loss is not finite; try finetune.mixed_precision bf16 or a lower learning_rate")
    return skipped


def train(state: TrainingState, extras: Extras, position: checkpoints.Position, p: dict, accelerator: Accelerator,
          save: Callable) -> dict:
    """The training loop from `position`, calling save(position) every checkpoint_every steps; returns the summary."""
    dataloader, ema, max_steps = state.dataloader, state.ema, state.max_steps
    step, epoch, done, loss = position.step, position.epoch, position.batch, float("nan")
    bar = tqdm(total=max_steps, initial=step, desc="finetune", unit="step",
               disable=not accelerator.is_local_main_process)
    started, images, skipped = time.perf_counter(), 0, 0
    seen: list[int] = []  # the items this process trained on in this epoch
    while step < max_steps:
        for batch in checkpoints.epoch_batches(dataloader, epoch, done, accelerator):
            done += 1
            seen += batch.index
            terms, grad_norm, applied = train_batch(batch, state, extras, p, accelerator, step)
            images += len(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if not applied:
                skipped = count_skip(skipped, step, accelerator)
                continue
            if ema:
                ema.step(state.trainable)
            step += 1
            loss = after_step(step, terms, grad_norm, state, extras, p)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if p["checkpoint_every"] and step % p["checkpoint_every"] == 0 and step < max_steps:
                save(checkpoints.Position(step, epoch, done))
            if step >= max_steps:
                break
        launch.log_epoch_items(accelerator, epoch, seen, len(dataloader.dataset))
        seen, epoch, done = [], epoch + 1, 0
    bar.close()
    seconds = time.perf_counter() - started
    return {"steps": step, "skipped_steps": skipped, "final_loss": loss, "train_seconds": seconds,
            "images_per_s": images / seconds if seconds else 0.0, "peak_memory_mb": peak_memory_mb(accelerator.device)}


def final_denoiser(state: TrainingState, accelerator: Accelerator) -> Any:
    """The trained denoiser with the EMA weights in place: a plain module (LoRA still in), ready to save. Every
    process calls it: under FSDP they gather the shards, and the other processes get None."""
    import torch

    wrapped = state.trainee.denoiser
    denoiser = accelerator.unwrap_model(wrapped)
    if accelerator.distributed_type == "FSDP":  # the whole model, on the main process (no EMA or LoRA there)
        weights = accelerator.get_state_dict(wrapped)
        if not accelerator.is_main_process:
            return None
        denoiser = type(denoiser).from_config(denoiser.config)
        denoiser.load_state_dict(weights)
    denoiser = denoiser.to(memory_format=torch.contiguous_format)  # safetensors needs it
    if accelerator.distributed_type == "DEEPSPEED":
        # DeepSpeed casts the module's weights to its half type: saved in fp32 like every other path (the EMA copy,
        # when on, is fp32 already)
        denoiser = denoiser.float()
    if state.ema:
        state.ema.copy_to(lora.trainable_parameters(denoiser))
    return denoiser
