"""SDXL LoRA and FLUX.1 QLoRA on a 16 GB card: peak memory and speed of the study-shaped fine-tune step.

As bench/sd3_memory.py does for SD3: on CUDA the process is limited to what a 16 GB card offers (LIMIT_GIB, through
`torch.cuda.set_per_process_memory_fraction`). The settings are the study's for the family, composed from conf/ with
`model=<family>` (finetune: LoRA rank and alpha, 8-bit AdamW, gradient checkpointing, mixed precision, batch 1;
encode.resolution; model.*), on random weights of the `full` shapes (stylestudy/models/builders_*.py):
- sdxl: the 2.6B UNet in fp32 with a LoRA adapter on the family's targets, fp16 autocast with a loss scaler, 512 px
  (64 x 64 latents), cached-shaped conditioning (77 x 2048, pooled 1280) and the six time ids;
- flux: the 12B transformer built on the CPU in bf16 and quantised to NF4 layer by layer on its way to the GPU by the
  family's own function (quantization.quantize_linear_layers with its KEEP; finetune quantises on the CPU and moves
  the quantised model after encoding: the same weights on the GPU, built faster here; never in bf16 on the GPU), the
  LoRA on the family's targets,
  bf16 autocast, 512 px (32 x 32 latents, 256 tokens), 128 T5 tokens x 4096, pooled 768, the distilled guidance.
The first step is a warm-up; peak memory and images/s come from the steps after it. `--dry-run`: the tiny shapes on
the CPU, two steps, the same JSON keys. OUT_JSON is rewritten when the denoiser is built and when the steps end
(`complete`), so a step stopped by its time box keeps the build time. Left out, as bench/memory_measured.py says why:
the EMA of the adapter (a few MB) and gradient clipping. FLUX's build holds about 24 GB of CPU memory.

Run: python bench/lora_16gb.py {sdxl,flux} OUT_JSON [--dry-run]   (bench/gpu_check.sh runs it as steps 5 and 6)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))
import torch  # noqa: E402
import yaml  # noqa: E402

from device_peaks import device_figures, limited_device, out_of_memory, peak_gib  # noqa: E402
from stylestudy.models.families import Conditioning, Family, from_params  # noqa: E402
from stylestudy.train import build, lora  # noqa: E402


def study_params(family: str) -> dict:
    """params.yaml as `-S model=<family>` composes it from conf/: the study's settings for the family."""
    from stylestudy.core.config import compose_params

    path = Path(tempfile.mkdtemp()) / "params.yaml"
    compose_params(path, REPO, [f"model={family}"])
    return yaml.safe_load(path.read_text())


def sdxl_setup(arch: str, device: torch.device, resolution: int, family: Family) -> tuple:
    """The fp32 UNet on `device`, SDXL's noise process, one latent and its conditioning."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from stylestudy.models import builders_sdxl
    from stylestudy.models.families import sd2

    with torch.device(device):
        unet = UNet2DConditionModel(**builders_sdxl.UNET_COMMON, **builders_sdxl.ARCHITECTURES[arch]["unet"])
    noise = sd2.DDPMNoise(DDPMScheduler(**{k: v for k, v in builders_sdxl.EULER.items()
                                           if k not in ("interpolation_type", "use_karras_sigmas")}))
    config, size = unet.config, resolution // 8
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    conditioning = Conditioning(torch.randn(1, 77, config.cross_attention_dim, device=device),
                                torch.randn(1, pooled, device=device),
                                torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device))
    return unet, noise, torch.randn(1, config.in_channels, size, size, device=device), conditioning


def flux_setup(arch: str, device: torch.device, resolution: int, family: Family) -> tuple:
    """The transformer quantised on its way to `device` (the family's base_quantization), FLUX's noise process, one
    latent and its conditioning."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from stylestudy.models import builders_flux, quantization
    from stylestudy.models.families import flow, flux

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(compute)  # the 12B weights in bf16 on the CPU: 24 GB, not 48
    try:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, guidance_embeds=True,
                                             **builders_flux.ARCHITECTURES[arch]["transformer"])
    finally:
        torch.set_default_dtype(previous)
    quantization.quantize_linear_layers(transformer, family.settings.base_quantization, compute, device, flux.KEEP)
    noise = flow.FlowMatchNoise(FlowMatchEulerDiscreteScheduler(**builders_flux.SCHEDULER), family.settings)
    config, size = transformer.config, resolution // 8
    conditioning = Conditioning(
        torch.randn(1, family.settings.max_sequence_length, config.joint_attention_dim, device=device, dtype=compute),
        torch.randn(1, config.pooled_projection_dim, device=device, dtype=compute))
    return transformer, noise, torch.randn(1, 16, size, size, device=device), conditioning


SETUPS = {"sdxl": sdxl_setup, "flux": flux_setup}


def lora_steps(name: str, arch: str, device: torch.device, resolution: int, steps: int, built) -> dict:
    """LoRA steps of the family `name` at the study's settings; peak memory and images/s after the first step.
    `built(seconds)` is called once the denoiser is built (a step stopped by its time box keeps that figure)."""
    p = study_params(name)
    family, tune = from_params(p["model"]), p["finetune"]
    started = time.perf_counter()
    denoiser, noise, clean, conditioning = SETUPS[name](arch, device, resolution, family)
    built_s = time.perf_counter() - started
    built(built_s)
    lora.add_lora(denoiser, tune["lora_rank"], tune["lora_alpha"], family.lora_targets)
    if tune["gradient_checkpointing"]:
        denoiser.enable_gradient_checkpointing()
    denoiser.train()
    trainable = lora.trainable_parameters(denoiser)
    optimizer = build.make_optimizer(trainable, tune)
    cuda = device.type == "cuda"  # the dry run computes in fp32: bitsandbytes' CPU layers under CPU autocast differ
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(tune["mixed_precision"], torch.float32) if cuda \
        else torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)
    for step in range(steps + 1):
        if step == 1:
            if cuda:
                torch.cuda.synchronize(device)
            timed = time.perf_counter()
        with torch.autocast(device.type, dtype=half, enabled=half != torch.float32):
            eps, timesteps = noise.draw(clean, 0.0)
            output = family.denoise(denoiser, noise.noised(clean, eps, timesteps), timesteps, conditioning)
            loss = (output.float() - noise.target(clean, eps, timesteps)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - timed
    return {"family": name, "method": "qlora" if name == "flux" else "lora", "resolution": resolution,
            "batch_size": 1, "lora_rank": tune["lora_rank"], "optimizer": tune["optimizer"],
            "mixed_precision": str(half).removeprefix("torch."), "steps_timed": steps,
            "images_per_s": steps / seconds, "build_s": built_s, "final_loss": loss.item(),
            "peak_memory_gib": peak_gib(device),
            "trainable_parameters": sum(t.numel() for t in trainable)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(SETUPS))
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, two steps")
    args = parser.parse_args()
    device = limited_device(args.dry_run)
    figures = device_figures(device, args.dry_run)
    arch, resolution, steps = ("tiny", 32, 2) if args.dry_run else ("full", study_params(args.family)["encode"]
                                                                   ["resolution"], 5)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write(finetune: dict) -> None:
        args.out.write_text(json.dumps(figures | {"finetune": finetune}, indent=2) + "\n")

    write({"complete": False})
    try:
        figures["finetune"] = lora_steps(args.family, arch, device, resolution, steps,
                                         lambda seconds: write({"complete": False, "build_s": seconds}))
    except torch.OutOfMemoryError as error:
        figures["finetune"] = out_of_memory(error, device)
    print(args.family, json.dumps(figures["finetune"]), flush=True)
    write(figures["finetune"] | {"complete": True})


if __name__ == "__main__":
    main()
