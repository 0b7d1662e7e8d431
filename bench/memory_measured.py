"""Peak training memory of the study's fine-tunes, measured by tensor accounting (stylestudy/train/memory.py).

Each run builds one family's denoiser at its `full` shapes (stylestudy/models/builders*.py: real shapes, random
weights), at the study's settings (conf/config.yaml `finetune`: 8-bit AdamW, gradient checkpointing, EMA, gradient
clipping, fp16 autocast with fp32 weights, batch 1), full or LoRA, and tracks two optimizer steps with MemTracker:
each step is two micro-batches (forward, backward) then clipping, the optimizer step and the EMA update. The study
accumulates 4 micro-batches; from the second on, each starts from the same tensors (the gradients of the ones
before), so two give the same peak. What is not run: the noise process (its tensors are latent-sized, under 1 MB
here) and the fp16 loss scaler on a CPU (a few scalars).

Where: by default on fake tensors on the CPU (FakeTensorMode: shapes without data; seconds a run, no memory), with
bf16 autocast (fp16 runs as bf16 on a CPU: the same bytes). `--real` runs real tensors (tiny shapes on a CPU, or any
shapes on a GPU); on CUDA each run also reports `torch.cuda.max_memory_allocated` over the run beside the tracked
peak. A family adds one `Entry` to ENTRIES (its denoiser's builder and its inputs at a resolution).

Memory options (stylestudy/train/lowmem.py): `--set KEY=VALUE` puts finetune settings over the study's (refused as
finetune refuses them) and names the runs with them, added to --json's other runs. The denoiser's dtypes, the fused
step's hooks with their stochastic rounding, and the EMA are the loop's own objects (lowmem.make_trainable,
FusedBackward, make_ema); with fused_backward one micro-batch, whose backward pass steps. An EMA on the CPU is made on
the meta device under fake tensors: memory off the device measured.

Run: python bench/memory_measured.py --json bench/memory_measured.json [--only sd3-full-512] [--arch tiny --real]
    [--set fused_backward=true --set gradient_accumulation_steps=1 --set mixed_precision=bf16 ...]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import yaml  # noqa: E402

from stylestudy.models import builders, builders_sd3, builders_sdxl  # noqa: E402
from stylestudy.models.families import Conditioning, Family, sd2, sd3, sdxl  # noqa: E402
from stylestudy.core.config import UserError, check_memory_settings  # noqa: E402
from stylestudy.train import build, lora, lowmem, memory  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MICRO_BATCHES = 2  # see the docstring: the study's 4 give the same peak


@dataclass(frozen=True)
class Entry:
    """One family: its denoiser at an architecture ("full", "tiny"), its inputs for one sample at a resolution, and
    the resolutions its study trains at."""

    family: Family
    denoiser: Callable[[str], Any]
    inputs: Callable[[Any, int], tuple[Any, Any, Conditioning]]
    resolutions: tuple[int, ...]


def sd2_inputs(config: Any, resolution: int) -> tuple[Any, Any, Conditioning]:
    latents = torch.randn(1, config.in_channels, resolution // 8, resolution // 8)
    return latents, torch.tensor([500]), Conditioning(torch.randn(1, 77, config.cross_attention_dim))


def sdxl_inputs(config: Any, resolution: int) -> tuple[Any, Any, Conditioning]:
    latents, timesteps, text = sd2_inputs(config, resolution)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    crops = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]])
    return latents, timesteps, Conditioning(text.sequence, torch.randn(1, pooled), crops)


def sd3_inputs(config: Any, resolution: int) -> tuple[Any, Any, Conditioning]:
    latents = torch.randn(1, config.in_channels, resolution // 8, resolution // 8)
    # 154 tokens: CLIP's 77 and T5's 77 (model.t5_max_length), as the encode stage caches them
    conditioning = Conditioning(torch.randn(1, 154, config.joint_attention_dim),
                                torch.randn(1, config.pooled_projection_dim))
    return latents, torch.tensor([500.0]), conditioning


def sd2_unet(arch: str) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**builders.UNET_COMMON, **builders.SD_ARCHITECTURES[arch]["unet"])


def sdxl_unet(arch: str) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**builders_sdxl.UNET_COMMON, **builders_sdxl.ARCHITECTURES[arch]["unet"])


ENTRIES = {
    "sd2": Entry(sd2.FAMILY, sd2_unet, sd2_inputs, (256, 512)),
    "sd3": Entry(sd3.FAMILY, lambda arch: builders_sd3.build_sd3_modules(arch, only="transformer")["transformer"],
                 sd3_inputs, (512,)),
    "sdxl": Entry(sdxl.FAMILY, sdxl_unet, sdxl_inputs, (512,)),
}


def study_settings(overrides: dict | None = None) -> dict:
    """The fine-tune's settings as conf/config.yaml gives them (the study's), with `overrides` (--set) over them,
    refused as finetune refuses them (config.check_memory_settings)."""
    p = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["finetune"] | (overrides or {})
    check_memory_settings(p)
    return p


def micro_batches(p: dict) -> int:
    """Two stand for the study's accumulation (see the docstring); one without accumulation (fused_backward)."""
    return MICRO_BATCHES if p["gradient_accumulation_steps"] > 1 else 1


def training_step(entry: Entry, model: Any, state: dict, resolution: int, device: torch.device) \
        -> Callable[[Callable[[], None]], None]:
    """One optimizer step as stylestudy/train/loop.py takes it: micro-batches, clipping, step, EMA; with
    fused_backward (state["fused"], stylestudy/train/lowmem.py's hooks) one micro-batch whose backward pass steps."""
    fused, count = state["fused"], micro_batches(state["p"])
    half = torch.float16 if device.type == "cuda" and state["p"]["mixed_precision"] == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" and half == torch.float16 else None

    def step(after_backward: Callable[[], None]) -> None:
        for _ in range(count):
            with torch.device(device):
                latents, timesteps, conditioning = entry.inputs(model.config, resolution)
            with torch.autocast(device.type, dtype=half):
                prediction = entry.family.denoise(model, latents, timesteps, conditioning)
            loss = (prediction.float() - latents).pow(2).mean() / count
            (scaler.scale(loss) if scaler else loss).backward()
            after_backward()
        if fused is not None:
            fused.take_squared_norm()  # the loop reads it as a float: data fake tensors lack
            if state["ema"] is not None:
                state["ema"].step(state["trainable"])
            return
        if scaler:
            scaler.unscale_(state["optimizer"])
        torch.nn.utils.clip_grad_norm_(state["trainable"], state["max_grad_norm"])
        scaler.step(state["optimizer"]) if scaler else state["optimizer"].step()
        if scaler:
            scaler.update()
        state["optimizer"].zero_grad(set_to_none=True)
        if state["ema"] is not None:
            state["ema"].step(state["trainable"])
    return step


def denoiser(entry: Entry, p: dict, arch: str, device: torch.device) -> Any:
    """The denoiser to train as finetune makes it (lowmem.make_trainable: LoRA adapter or every weight, in the
    dtypes the memory options give them), on `device` ("meta" for fake runs)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = entry.denoiser(arch)
        lowmem.make_trainable(model, p, entry.family.lora_targets, torch.device("cpu"))
    return model


def measure(entry: Entry, method: str, resolution: int, arch: str, device: torch.device, fake: bool,
            overrides: dict) -> dict:
    p = study_settings(overrides | {"method": method})
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = denoiser(entry, p, arch, torch.device("meta") if fake else device)
    with memory.fake_tensors() if fake else contextlib.nullcontext() as mode:
        if fake:
            memory.fake_parameters(model, device)
        if p["gradient_checkpointing"]:
            model.enable_gradient_checkpointing()
        model.train()
        trainable = lora.trainable_parameters(model)
        optimizer = memory.make_optimizer(lambda: build.make_optimizer(trainable, p), mode)
        # off the device measured: the CPU's memory on a GPU, the meta device (no memory) on fake tensors
        ema = lowmem.make_ema(trainable, p, device, host="meta" if fake else "cpu")
        fused = lowmem.FusedBackward(trainable, optimizer, p["max_grad_norm"]) if p["fused_backward"] else None
        state = {"optimizer": optimizer, "trainable": trainable, "ema": ema, "max_grad_norm": p["max_grad_norm"],
                 "fused": fused, "p": p}
        on_device = [t for t in (ema.shadow_params if ema else ()) if t.device.type == device.type]
        peak = memory.track_steps(model, optimizer, training_step(entry, model, state, resolution, device),
                                  others=on_device)
    figures = {"method": method, "resolution": resolution, "arch": arch, "fake_tensors": fake, "settings": overrides,
               "micro_batches": micro_batches(p),
               "parameters": sum(t.numel() for t in model.parameters()),
               "trainable_parameters": sum(t.numel() for t in trainable),
               "peak_gib": peak.gib(), "peak_bytes": {"total": peak.total, **peak.categories},
               "between_steps_gib": {name: round(value / 2**30, 3) for name, value in peak.between_steps.items()},
               "seconds": round(time.perf_counter() - started, 1)}
    if device.type == "cuda":
        figures["cuda_max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--only", default="", help="comma-separated runs, e.g. sd3-full-512 (default: all)")
    parser.add_argument("--arch", default="full", help="the builders' architecture: full (default) or tiny")
    parser.add_argument("--real", action="store_true", help="real tensors instead of fake ones")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda with --real")
    parser.add_argument("--resolution", type=int, default=0, help="every run at this size (tiny shapes: 64 at most)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a finetune setting over the study's (repeatable), e.g. fused_backward=true; the runs "
                        "are named with them and added to --json's other runs")
    args = parser.parse_args()
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    suffix = "".join(f" {item}" for item in sorted(args.set))
    device = torch.device(args.device)
    runs = {f"{name}-{method}-{resolution}": (entry, method, resolution) for name, entry in ENTRIES.items()
            for method in ("full", "lora") for resolution in entry.resolutions}
    chosen = [name for name in args.only.split(",") if name] or list(runs)
    unknown = sorted(set(chosen) - set(runs))
    if unknown:
        sys.exit(f"error: unknown runs {unknown}; known: {sorted(runs)}")
    import bitsandbytes

    # fused_backward frees each gradient in its own hook, before MemTracker's (which then finds None): it counted that
    # gradient already, from the hook that sees it arrive
    warnings.filterwarnings("ignore", "Expected a tensor or a traceable wrapper-subclass of tensor")
    figures = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor()}",
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
               "micro_batches": MICRO_BATCHES, "runs": {}}
    if overrides and args.json and args.json.is_file():  # rows with other settings join the study's
        figures["runs"] = json.loads(args.json.read_text())["runs"]
    for name in chosen:
        entry, method, resolution = runs[name]
        figures["runs"][name + suffix] = measure(entry, method, args.resolution or resolution, args.arch, device,
                                                 fake=not args.real, overrides=overrides)
        print(name + suffix, json.dumps(figures["runs"][name + suffix]["peak_gib"]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as refused:  # settings finetune would refuse: its one line, not a traceback
        sys.exit(f"error: {refused}")
