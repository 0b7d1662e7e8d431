"""SD3 on a 16 GB card: peak memory and speed of the study-shaped SD3 LoRA fine-tune and of sequential generation.

On CUDA the process is limited to what a 16 GB card offers (LIMIT_GIB, through
`torch.cuda.set_per_process_memory_fraction`), so a larger card behaves like the study's free Colab T4. The `full` SD3
shapes (stylestudy/models/builders_sd3.py: the 2B MMDiT, CLIP-L, OpenCLIP bigG, T5-XXL, the 16-channel VAE) are built
with random weights straight on the device, in the dtype they run in:
1. fine-tune: the transformer in fp32 with a LoRA adapter (the SD3 family's targets, rank 4), gradient checkpointing,
   8-bit AdamW, fp16 autocast with a loss scaler, batch 1 at 512 px, on cached-shaped conditioning (154 x 4096 and
   2048 pooled): what `finetune` holds with `model=sd3`. Peak memory, images/s.
2. generation as generate.memory `sequential` runs it: the three text encoders in fp16 encode 6 prompts and the empty
   one, are freed, then the transformer and VAE in fp16 denoise (flow-matching Euler, guidance) and decode 6 images of
   512 px. Peak memory of each phase, images/s.
Docs: docs/sd3.md (the same figures on paper). `--dry-run`: the tiny shapes on the CPU, a few steps, same JSON keys.
OUT_JSON is rewritten after each part ("complete": false until both are done), so a stopped run keeps the first.

Run: python bench/sd3_memory.py OUT_JSON [--dry-run]   (bench/gpu_check.sh runs it as step 4)
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from device_peaks import device_figures, limited_device, out_of_memory, peak_gib  # noqa: E402
from stylestudy.models import builders_sd3  # noqa: E402
from stylestudy.models.families import Conditioning, flow, sd3  # noqa: E402
from stylestudy.train import build, lora  # noqa: E402

STUDY_OPTIMIZER = {"optimizer": "adamw8bit", "learning_rate": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.999,
                   "adam_weight_decay": 0.01, "adam_epsilon": 1e-8}


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def built(arch: str, name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """One component of the SD3 architecture, random, built on `device` in `dtype`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return builders_sd3.build_sd3_modules(arch, only=name)[name]
    finally:
        torch.set_default_dtype(previous)


def finetune(arch: str, device: torch.device, resolution: int, steps: int) -> dict:
    """LoRA steps on the fp32 transformer at `resolution`; peak memory and images/s after the first step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    reset(device)
    transformer = built(arch, "transformer", device, torch.float32)
    lora.add_lora(transformer, 4, 4, sd3.FAMILY.lora_targets)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    trainable = lora.trainable_parameters(transformer)
    optimizer = build.make_optimizer(trainable, STUDY_OPTIMIZER)
    noise = flow.FlowMatchNoise(FlowMatchEulerDiscreteScheduler(shift=3.0), flow.FlowMatchSettings())
    config = transformer.config
    size = resolution // 8
    clean = torch.randn(1, config.in_channels, size, size, device=device)
    conditioning = Conditioning(torch.randn(1, 154, config.joint_attention_dim, device=device),
                                    torch.randn(1, config.pooled_projection_dim, device=device))
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    started = None
    for step in range(steps + 1):
        if step == 1:
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=half):
            eps, timesteps = noise.draw(clean, 0.0)
            prediction = sd3.FAMILY.denoise(transformer, noise.noised(clean, eps, timesteps), timesteps, conditioning)
            loss = (prediction.float() - noise.target(clean, eps, timesteps)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    figures = {"resolution": resolution, "batch_size": 1, "steps_timed": steps, "images_per_s": steps / seconds,
               "peak_memory_gib": peak_gib(device), "trainable_parameters": sum(p.numel() for p in trainable)}
    del transformer, optimizer, trainable
    return figures


def generate(arch: str, device: torch.device, resolution: int, images: int, steps: int) -> dict:
    """Sequential generation: encoders alone, then transformer and VAE; each phase's peak memory, images/s."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    half = torch.float16 if device.type == "cuda" else torch.float32
    reset(device)
    started = time.perf_counter()
    encoders = {name: built(arch, name, device, half).eval() for name in sd3.TEXT_ENCODERS}
    clip_tokenizer = builders_sd3.sd_tokenizer_from_open_clip()
    pipe = StableDiffusion3Pipeline(transformer=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    tokenizer=clip_tokenizer, tokenizer_2=clip_tokenizer,
                                    tokenizer_3=builders_sd3.t5_tokenizer(), **encoders)
    prompts = sd3.FAMILY.encode_prompts(pipe, ["a statue of a man on horse"] * images, True, device)
    encode_peak = peak_gib(device)
    pipe.register_modules(text_encoder=None, text_encoder_2=None, text_encoder_3=None)
    del encoders
    reset(device)
    pipe.register_modules(transformer=built(arch, "transformer", device, half).eval(),
                          vae=built(arch, "vae", device, half).eval())
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        generators = [torch.Generator(device).manual_seed(i) for i in range(images)]
        pipe(**prompts, generator=generators, height=resolution, width=resolution, num_inference_steps=steps,
             guidance_scale=7.0, output_type="pil")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return {"resolution": resolution, "images": images, "inference_steps": steps, "images_per_s": images / seconds,
            "peak_memory_encoding_gib": encode_peak, "peak_memory_denoising_gib": peak_gib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, a few steps")
    args = parser.parse_args()
    device = limited_device(args.dry_run)
    figures = device_figures(device, args.dry_run) | {"complete": False}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    arch, resolution = ("tiny", 32) if args.dry_run else ("full", 512)
    for name, measure in (("finetune_lora", lambda: finetune(arch, device, resolution, 2 if args.dry_run else 10)),
                          ("generate_sequential", lambda: generate(arch, device, resolution, 6,
                                                                   2 if args.dry_run else 28))):
        try:
            figures[name] = measure()
        except torch.OutOfMemoryError as error:
            figures[name] = out_of_memory(error, device)
        print(name, json.dumps(figures[name]), flush=True)
        figures["complete"] = name == "generate_sequential"
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
