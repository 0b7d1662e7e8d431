"""finetune: full-UNet fine-tune of the Stable Diffusion pipeline on the training split (the study's recipe).

Reads SD_DIR (pipeline folder from fetch), RAW_DIR (imagefolder), SPLIT_DIR/train.jsonl and params `finetune`,
`shared`. Writes OUT_DIR, a diffusers pipeline folder whose UNet is the fine-tuned (EMA) one, with
OUT_DIR/training_info.json (what made it: the same inputs give the same folder, byte for byte), LIVE_DIR (dvclive:
loss, lr, grad norm per step) and LIVE_DIR/timing.json (images/s, peak memory, seconds: they differ every run, so they
stay out of the model folder and the metrics).

Interruption: every `checkpoint_every` optimizer steps the whole training state goes to SCRATCH_DIR (not a DVC output;
see stages/training.py). A rerun resumes from the newest whole checkpoint and logs the step; it refuses, with one
line, a checkpoint made with other settings. SCRATCH_DIR is removed once OUT_DIR is written. A resumed run ends with
the same UNet weights, bit for bit on a CPU, as one never interrupted: the data order depends only on seed and epoch,
each item's random flip/crop only on seed, epoch and index, and the RNG states are restored.

Speed: `cache_latents` (stages/latents.py), `optimizer: adamw_fused`, `channels_last`, `compile_unet`; measured by
bench/finetune_speed.py (bench/FINETUNE.md).

Run: python -m stages.finetune SD_DIR RAW_DIR SPLIT_DIR OUT_DIR LIVE_DIR SCRATCH_DIR
(multi-GPU: accelerate launch -m stages.finetune ...). params.yaml is validated whole before any work.
Example: python -m stages.finetune models/pretrained/sd data/raw data/split models/finetuned reports/finetune \
    scratch/finetune
"""
from __future__ import annotations

import functools
import logging
import math
import resource
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from stages import data, latents, models, training
from stages.config import UserError, cli, load_params, load_shared, parse_args, require_path
from stages.outputs import MANIFEST, atomic_dir, library_versions, write_json

log = logging.getLogger(__name__)

TIMING = ("images_per_s", "peak_memory_mb", "train_seconds", "resumed_from_step")  # differ from run to run

def resolve_precision(requested: str, cuda: bool, cuda_bf16: bool = True) -> str:
    """What mixed precision really runs: CPU autocast has no fp16, so fp16 runs as bf16 there; old GPUs lack bf16."""
    if requested == "fp16" and not cuda:
        return "bf16"
    if requested == "bf16" and cuda and not cuda_bf16:
        return "fp16"
    return requested


def build_accelerator(p: dict, seed: int):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cuda = torch.cuda.is_available()
    precision = resolve_precision(p["mixed_precision"], cuda, cuda and torch.cuda.is_bf16_supported())
    if precision != p["mixed_precision"]:
        log.info("mixed_precision %s runs as %s on this device", p["mixed_precision"], precision)
    # The seedable sampler shuffles epoch e with seed + e, whatever came before: a resumed run sees the same order.
    loading = DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=p["gradient_accumulation_steps"],
                       dataloader_config=loading)


def load_components(sd_dir: Path, p: dict, accelerator) -> dict:
    """Tokenizer, frozen text encoder and VAE (in the compute dtype on GPU), trainable UNet, training noise scheduler."""
    import torch
    from diffusers import DDPMScheduler

    pipe = models.load_sd_pipeline(sd_dir)
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if accelerator.device.type == "cpu":
        frozen_dtype = torch.float32
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        frozen.to(accelerator.device, dtype=frozen_dtype)
    if p["gradient_checkpointing"]:
        pipe.unet.enable_gradient_checkpointing()
    if p["channels_last"] and p["optimizer"] == "adamw8bit":
        # bitsandbytes makes the weights contiguous at its first step while its states stay NHWC: no gain, and a
        # resumed run then trains on other numbers.
        log.info("channels_last is ignored with optimizer adamw8bit")
    elif p["channels_last"]:
        pipe.unet.to(memory_format=torch.channels_last)
    if p["compile_unet"]:
        pipe.unet.compile()  # in place: the module, its state dict and checkpoints keep their names
    pipe.unet.train()
    noise_scheduler = DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    return {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "vae": pipe.vae, "unet": pipe.unet,
            "noise_scheduler": noise_scheduler, "frozen_dtype": frozen_dtype, "device": accelerator.device,
            "latent_scale": pipe.vae.config.scaling_factor, "main_process": accelerator.is_local_main_process}


def make_optimizer(parameters, p: dict):
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


def make_dataloader(raw: Path, rows: list[dict], parts: dict, p: dict, seed: int):
    """Shuffled batches, of cached latents or of pixels and token ids; the order depends only on the seed and epoch."""
    import torch

    if latents.cacheable(p):
        items, collate = latents.cached_dataset(raw, rows, parts, p)
    else:
        transform = data.train_transforms(p["resolution"], p["center_crop"], p["random_flip"])
        items, collate = data.CaptionedImages(raw, rows, transform), latents.TokenBatch(parts["tokenizer"])
    dataset = training.SeededItems(items, seed)
    # With its own generator, making an iterator draws the workers' base seed from it, not from the global RNG.
    return torch.utils.data.DataLoader(
        dataset, batch_size=p["train_batch_size"], shuffle=True, collate_fn=collate,
        num_workers=p["dataloader_num_workers"], generator=torch.Generator().manual_seed(seed),
    )


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_training(parts: dict, dataloader, p: dict, accelerator) -> dict:
    """Optimizer, LR schedule and EMA, prepared by accelerate; the EMA is registered so that checkpoints carry it."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    unet = parts["unet"]
    # Each process sees its shard of the data: steps come from the prepared dataloader, not the whole dataset.
    dataloader = accelerator.prepare(dataloader)
    steps_per_epoch = math.ceil(len(dataloader) / p["gradient_accumulation_steps"])
    max_steps = p["max_train_steps"] or p["epochs"] * steps_per_epoch
    optimizer = make_optimizer(unet.parameters(), p)
    # accelerate steps a prepared scheduler once per process at every optimizer step.
    n = accelerator.num_processes
    lr_scheduler = get_scheduler(p["lr_scheduler"], optimizer, num_warmup_steps=p["lr_warmup_steps"] * n,
                                 num_training_steps=max_steps * n)
    ema = EMAModel(unet.parameters(), decay=p["ema_decay"], foreach=True) if p["use_ema"] else None
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema:
        accelerator.register_for_checkpointing(ema)
    return {"unet": unet, "optimizer": optimizer, "dataloader": dataloader, "lr_scheduler": lr_scheduler, "ema": ema,
            "max_steps": max_steps}


def train_batch(batch: dict, parts: dict, loop: dict, p: dict, accelerator) -> tuple:
    """Forward and backward on one batch, and the optimizer step at the end of an accumulation; loss and grad norm."""
    unet, optimizer = loop["unet"], loop["optimizer"]
    grad_norm = float("nan")
    with accelerator.accumulate(unet):
        loss = latents.diffusion_loss(batch, parts, unet)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = float(accelerator.clip_grad_norm_(unet.parameters(), p["max_grad_norm"]))
        optimizer.step()
        loop["lr_scheduler"].step()
        optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def train(parts: dict, loop: dict, position: training.Position, p: dict, accelerator, live, save: Callable) -> dict:
    """The training loop from `position`, calling save(position) every checkpoint_every steps; returns the summary."""
    import torch

    unet, dataloader, ema, max_steps = loop["unet"], loop["dataloader"], loop["ema"], loop["max_steps"]
    step, epoch, done, loss = position.step, position.epoch, position.batch, float("nan")
    bar = tqdm(total=max_steps, initial=step, desc="finetune", unit="step",
               disable=not accelerator.is_local_main_process)
    started, images = time.perf_counter(), 0
    while step < max_steps:
        for batch in training.epoch_batches(dataloader, epoch, done, accelerator):
            done += 1
            loss_tensor, grad_norm = train_batch(batch, parts, loop, p, accelerator)
            images += latents.batch_size(batch) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if ema:
                ema.step(unet.parameters())
            step, loss = step + 1, float(loss_tensor.detach())
            if accelerator.is_main_process:
                log_step(live, {"loss": loss, "lr": loop["lr_scheduler"].get_last_lr()[0], "grad_norm": grad_norm})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if p["checkpoint_every"] and step % p["checkpoint_every"] == 0 and step < max_steps:
                save(training.Position(step, epoch, done))
            if step >= max_steps:
                break
        epoch, done = epoch + 1, 0
    bar.close()
    final_unet = accelerator.unwrap_model(unet).to(memory_format=torch.contiguous_format)  # safetensors needs it
    if ema:
        ema.copy_to(final_unet.parameters())
    seconds = time.perf_counter() - started
    return {"unet": final_unet, "steps": step, "final_loss": loss, "train_seconds": seconds,
            "images_per_s": images / seconds if seconds else 0.0, "peak_memory_mb": peak_memory_mb(accelerator.device)}


def log_step(live, values: dict) -> None:
    for name, value in values.items():
        live.log_metric(name, value)
    live.next_step()


def save_pipeline(sd_dir: Path, unet, out: Path, info: dict) -> None:
    """The pretrained pipeline folder with the fine-tuned UNet in place of the original one."""
    with atomic_dir(out) as tmp:
        shutil.copytree(sd_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet", MANIFEST))
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        write_json(tmp / "training_info.json", info)


def check_inputs(sd_dir: Path, raw: Path, split_dir: Path) -> list[dict]:
    models.check_sd_folder(sd_dir)
    require_path(raw, "run the fetch stage first")
    rows = data.read_jsonl(require_path(split_dir / "train.jsonl", "run the split stage first"))
    if not rows:
        raise UserError(f"{split_dir}/train.jsonl is empty; raise split.fractions.train or add data")
    return rows


def run(sd_dir: Path, raw: Path, split_dir: Path, out: Path, live_dir: Path, scratch: Path, p: dict,
        seed: int) -> dict:
    """Fine-tune (resuming from a checkpoint in `scratch` if there is one) and save; return the training summary."""
    from accelerate.utils import set_seed
    from dvclive import Live

    rows = check_inputs(sd_dir, raw, split_dir)
    accelerator = build_accelerator(p, seed)
    run_id = training.fingerprint(p, seed, training.inputs_digest([sd_dir, raw], rows), accelerator)
    found = training.find_resumable(scratch, run_id)  # before the slow part: a refusal comes at once
    set_seed(seed)
    parts = load_components(sd_dir, p, accelerator)
    truncated = latents.count_truncated(parts["tokenizer"], [row["text"] for row in rows])
    loop = prepare_training(parts, make_dataloader(raw, rows, parts, p, seed), p, accelerator)
    position = training.resume(loop, found, live_dir, accelerator)
    log.info("finetune on %d images, %s, mixed precision %s", len(rows), accelerator.device, accelerator.mixed_precision)
    save = functools.partial(training.save, accelerator, scratch, run=run_id, live_dir=live_dir)
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, resume=found is not None) as live:
        result = train(parts, loop, position, p, accelerator, live, save)
    summary = {k: v for k, v in result.items() if k != "unet"} | {"resumed_from_step": position.step or None}
    if accelerator.is_main_process:
        info = {"steps": result["steps"], "final_loss": result["final_loss"], "params": p, "seed": seed,
                "n_train_images": len(rows), "n_captions_truncated": truncated, "device": str(accelerator.device),
                "mixed_precision_ran": accelerator.mixed_precision, "libraries": library_versions(),
                "base_model": models_origin(sd_dir)}
        save_pipeline(sd_dir, result["unet"], out, info)
        write_json(live_dir / "timing.json", {k: summary[k] for k in TIMING})
    training.discard(accelerator, scratch)
    return summary


def models_origin(sd_dir: Path) -> dict:
    """What fetch recorded about the pretrained pipeline (source, revision), without its file list."""
    import json

    manifest = sd_dir / MANIFEST
    return {k: v for k, v in json.loads(manifest.read_text()).items() if k != "files"} if manifest.is_file() else {}


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "sd_dir": "the pretrained pipeline folder (models/pretrained/sd)", "raw": "the imagefolder (data/raw)",
        "split_dir": "the split folder with train.jsonl (data/split)",
        "out": "the fine-tuned pipeline folder to write (models/finetuned)",
        "live_dir": "the dvclive folder to write (reports/finetune)",
        "scratch": "where resumable checkpoints go while training runs (scratch/finetune)",
    })
    p, shared = load_params("finetune"), load_shared()
    models.require_gpu(shared["profile"])
    run(args.sd_dir, args.raw, args.split_dir, args.out, args.live_dir, args.scratch, p, shared["seed"])


if __name__ == "__main__":
    main()
