"""finetune: full-UNet fine-tune of the Stable Diffusion pipeline on the training split (the study's recipe).

Reads SD_DIR (pipeline folder from fetch), RAW_DIR (imagefolder), SPLIT_DIR/train.jsonl and params `finetune`,
`shared`. Writes OUT_DIR, a diffusers pipeline folder whose UNet is the fine-tuned (EMA) one, with
OUT_DIR/training_info.json (what made it), and LIVE_DIR (dvclive: loss, lr, grad norm, images/s, peak memory per step).

Run: python -m stages.finetune SD_DIR RAW_DIR SPLIT_DIR OUT_DIR LIVE_DIR
(multi-GPU: accelerate launch -m stages.finetune ...)
"""
from __future__ import annotations

import argparse
import logging
import math
import resource
import shutil
import time
from pathlib import Path

from tqdm import tqdm

from stages import data, models
from stages.config import (
    BOOL, FRACTION, MULTIPLE_OF_8, NON_NEGATIVE_INT, NON_NEGATIVE_NUMBER, POSITIVE_INT, POSITIVE_NUMBER, UserError,
    cli, load_params, load_shared, one_of, require_path,
)
from stages.outputs import MANIFEST, atomic_dir, library_versions, write_json

log = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
SCHEMA = {
    "epochs": POSITIVE_INT, "max_train_steps": NON_NEGATIVE_INT, "train_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT, "learning_rate": POSITIVE_NUMBER, "lr_scheduler": one_of(*SCHEDULERS),
    "lr_warmup_steps": NON_NEGATIVE_INT, "optimizer": one_of("adamw8bit", "adamw"), "adam_beta1": FRACTION,
    "adam_beta2": FRACTION, "adam_weight_decay": NON_NEGATIVE_NUMBER, "adam_epsilon": POSITIVE_NUMBER,
    "max_grad_norm": POSITIVE_NUMBER, "gradient_checkpointing": BOOL, "mixed_precision": one_of("no", "fp16", "bf16"),
    "use_ema": BOOL, "ema_decay": FRACTION, "resolution": MULTIPLE_OF_8, "center_crop": BOOL, "random_flip": BOOL,
    "dataloader_num_workers": NON_NEGATIVE_INT,
}


def resolve_precision(requested: str, cuda: bool, cuda_bf16: bool = True) -> str:
    """What mixed precision really runs: CPU autocast has no fp16, so fp16 runs as bf16 there; old GPUs lack bf16."""
    if requested == "fp16" and not cuda:
        return "bf16"
    if requested == "bf16" and cuda and not cuda_bf16:
        return "fp16"
    return requested


def build_accelerator(p: dict):
    import torch
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = resolve_precision(p["mixed_precision"], cuda, cuda and torch.cuda.is_bf16_supported())
    if precision != p["mixed_precision"]:
        log.info("mixed_precision %s runs as %s on this device", p["mixed_precision"], precision)
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=p["gradient_accumulation_steps"])


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
    pipe.unet.train()
    noise_scheduler = DDPMScheduler.from_pretrained(sd_dir, subfolder="scheduler")
    return {"tokenizer": pipe.tokenizer, "text_encoder": pipe.text_encoder, "vae": pipe.vae, "unet": pipe.unet,
            "noise_scheduler": noise_scheduler, "frozen_dtype": frozen_dtype}


def make_optimizer(parameters, p: dict):
    import torch

    kwargs = {"lr": p["learning_rate"], "betas": (p["adam_beta1"], p["adam_beta2"]),
              "weight_decay": p["adam_weight_decay"], "eps": p["adam_epsilon"]}
    if p["optimizer"] == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(parameters, **kwargs)
    return torch.optim.AdamW(parameters, **kwargs)


def make_dataloader(raw: Path, rows: list[dict], tokenizer, p: dict, seed: int):
    """Shuffled batches of pixel values and caption token ids; the shuffle order depends only on the seed."""
    import torch

    transform = data.train_transforms(p["resolution"], p["center_crop"], p["random_flip"])
    dataset = data.CaptionedImages(raw, rows, transform)

    def collate(items: list[dict]) -> dict:
        tokens = tokenizer([item["text"] for item in items], padding="max_length", truncation=True,
                           max_length=tokenizer.model_max_length, return_tensors="pt")
        return {"pixel_values": torch.stack([item["pixel_values"] for item in items]), "input_ids": tokens.input_ids}

    return torch.utils.data.DataLoader(
        dataset, batch_size=p["train_batch_size"], shuffle=True, collate_fn=collate,
        num_workers=p["dataloader_num_workers"], generator=torch.Generator().manual_seed(seed),
    )


def diffusion_loss(batch: dict, parts: dict, unet):
    """The denoising loss: noise the VAE latents at a random timestep and regress the noise (or velocity)."""
    import torch
    import torch.nn.functional as F

    vae, scheduler = parts["vae"], parts["noise_scheduler"]
    with torch.no_grad():
        pixels = batch["pixel_values"].to(vae.device, dtype=parts["frozen_dtype"])
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        text = parts["text_encoder"](batch["input_ids"].to(vae.device), return_dict=False)[0]
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, text, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float())


def peak_memory_mb(device) -> float:
    """Peak GPU memory allocated on CUDA; peak resident memory of the process on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(parts: dict, dataloader, p: dict, accelerator, live) -> dict:
    """The training loop; returns the number of optimizer steps and the last loss."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    unet = parts["unet"]
    steps_per_epoch = math.ceil(len(dataloader) / p["gradient_accumulation_steps"])
    max_steps = p["max_train_steps"] or p["epochs"] * steps_per_epoch
    optimizer = make_optimizer(unet.parameters(), p)
    lr_scheduler = get_scheduler(p["lr_scheduler"], optimizer, num_warmup_steps=p["lr_warmup_steps"],
                                 num_training_steps=max_steps)
    ema = EMAModel(unet.parameters(), decay=p["ema_decay"], foreach=True) if p["use_ema"] else None
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if ema:
        ema.to(accelerator.device)
    step, loss, grad_norm = 0, float("nan"), float("nan")
    bar = tqdm(total=max_steps, desc="finetune", unit="step", disable=not accelerator.is_local_main_process)
    started, images = time.perf_counter(), 0
    while step < max_steps:
        for batch in dataloader:
            with accelerator.accumulate(unet):
                loss_tensor = diffusion_loss(batch, parts, unet)
                accelerator.backward(loss_tensor)
                if accelerator.sync_gradients:
                    grad_norm = float(accelerator.clip_grad_norm_(unet.parameters(), p["max_grad_norm"]))
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            images += batch["pixel_values"].shape[0] * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            if ema:
                ema.step(unet.parameters())
            step, loss = step + 1, float(loss_tensor.detach())
            elapsed = time.perf_counter() - started
            if accelerator.is_main_process:
                log_step(live, {"loss": loss, "lr": lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                                "images_per_s": images / elapsed, "peak_memory_mb": peak_memory_mb(accelerator.device)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if step >= max_steps:
                break
    bar.close()
    final_unet = accelerator.unwrap_model(unet)
    if ema:
        ema.copy_to(final_unet.parameters())
    return {"unet": final_unet, "steps": step, "final_loss": loss, "train_seconds": time.perf_counter() - started}


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


def run(sd_dir: Path, raw: Path, split_dir: Path, out: Path, live_dir: Path, p: dict, seed: int) -> dict:
    """Fine-tune and save; return the training summary."""
    from accelerate.utils import set_seed
    from dvclive import Live

    rows = check_inputs(sd_dir, raw, split_dir)
    accelerator = build_accelerator(p)
    set_seed(seed)
    parts = load_components(sd_dir, p, accelerator)
    dataloader = make_dataloader(raw, rows, parts["tokenizer"], p, seed)
    log.info("finetune on %d images, %s, mixed precision %s", len(rows), accelerator.device, accelerator.mixed_precision)
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        result = train(parts, dataloader, p, accelerator, live)
    summary = {k: v for k, v in result.items() if k != "unet"}
    if accelerator.is_main_process:
        info = summary | {"params": p, "seed": seed, "n_train_images": len(rows), "device": str(accelerator.device),
                          "mixed_precision_ran": accelerator.mixed_precision, "libraries": library_versions(),
                          "base_model": models_origin(sd_dir)}
        save_pipeline(sd_dir, result["unet"], out, info)
    return summary


def models_origin(sd_dir: Path) -> dict:
    """What fetch recorded about the pretrained pipeline (source, revision), without its file list."""
    import json

    manifest = sd_dir / MANIFEST
    return {k: v for k, v in json.loads(manifest.read_text()).items() if k != "files"} if manifest.is_file() else {}


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("sd_dir", "raw", "split_dir", "out", "live_dir"):
        parser.add_argument(name, type=Path)
    args = parser.parse_args()
    p = load_params("finetune", SCHEMA)
    run(args.sd_dir, args.raw, args.split_dir, args.out, args.live_dir, p, load_shared()["seed"])


if __name__ == "__main__":
    main()
