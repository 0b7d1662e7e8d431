"""Peak training memory of the study's fine-tunes, measured by tensor accounting (stylestudy/train/memory.py).

Each run builds one family's denoiser at its `full` shapes (stylestudy/models/builders*.py: real shapes, random
weights), at the study's settings (conf/config.yaml `finetune`: 8-bit AdamW, gradient checkpointing, EMA, gradient
clipping, fp16 autocast with fp32 weights, batch 1), full or LoRA (FLUX: LoRA on its NF4 base only, as the family
trains it; a full fine-tune is refused by params validation), and tracks two optimizer steps with MemTracker as
stylestudy/train/memory_plan.py takes them (the same function that checks `finetune.memory_budget_gb`): each step
is two micro-batches (forward, backward) of the family's example inputs (Family.example_inputs) then clipping, the
optimizer step and the EMA update. The study accumulates 4 micro-batches; from the second on, each starts from the
same tensors (the gradients of the ones before), so two give the same peak. What is not run: the noise process (its
tensors are latent-sized, under 1 MB here) and the fp16 loss scaler on a CPU (a few scalars). Denoisers are held as
on a GPU (FLUX's base computes in bf16).

Where: by default on fake tensors on the CPU (FakeTensorMode: shapes without data; seconds a run, no memory), with
bf16 autocast (fp16 runs as bf16 on a CPU: the same bytes). `--real` runs real tensors (tiny shapes on a CPU, or any
shapes on a GPU); on CUDA each run also reports `torch.cuda.max_memory_allocated` over the run beside the tracked
peak. A family adds one `Entry` to ENTRIES (its modules' builder, methods and resolutions).

Memory options (stylestudy/train/lowmem.py): `--set KEY=VALUE` puts finetune settings over the study's (refused as
finetune refuses them) and names the runs with them. The denoiser's dtypes, the fused step's hooks with their
stochastic rounding, and the EMA are the loop's own objects (lowmem.make_trainable, FusedBackward, make_ema); with
fused_backward one micro-batch, whose backward pass steps. An EMA on the CPU is made on the meta device under fake
tensors: memory off the device measured.

Run: python bench/memory_measured.py --json bench/memory_measured.json [--only sd3-full-512] [--arch tiny --real]
    [--set fused_backward=true --set gradient_accumulation_steps=1 --set mixed_precision=bf16 ...]
(runs already in the JSON file and not chosen keep their figures there)
"""
from __future__ import annotations

import argparse
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

from stylestudy.models import builders, builders_flux, builders_sd3, builders_sdxl  # noqa: E402
from stylestudy.models.families import Family, flux, sd2, sd3, sdxl  # noqa: E402
from stylestudy.core.checks import check_memory_settings  # noqa: E402
from stylestudy.core.config import UserError  # noqa: E402
from stylestudy.train import memory_plan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Entry:
    """One family: its modules at an architecture ("full", "tiny", built on the meta device for their configs), the
    methods it trains and the resolutions its study trains at."""

    family: Family
    modules: Callable[[str], dict[str, Any]]
    methods: tuple[str, ...]
    resolutions: tuple[int, ...]


ENTRIES = {
    "sd2": Entry(sd2.FAMILY, builders.build_sd_modules, ("full", "lora"), (256, 512)),
    "sd3": Entry(sd3.FAMILY, builders_sd3.build_sd3_modules, ("full", "lora"), (512,)),
    "sdxl": Entry(sdxl.FAMILY, builders_sdxl.build_sdxl_modules, ("full", "lora"), (512,)),
    # a full fine-tune of FLUX is refused by params validation (core/checks.py check_family_settings): LoRA only,
    # on the NF4 base the family trains by default (model.base_quantization)
    "flux": Entry(flux.FAMILY, lambda arch: builders_flux.build_flux_modules(arch, device="meta"), ("lora",), (512,)),
}


def study_settings(overrides: dict) -> dict:
    """The fine-tune's settings as conf/config.yaml gives them (the study's), with `overrides` (--set) over them,
    refused as finetune refuses them (checks.check_memory_settings)."""
    p = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["finetune"] | overrides
    check_memory_settings(p)
    return p


def configs(entry: Entry, arch: str) -> tuple[dict, dict]:
    """The denoiser's config (as its config.json names its class) and the VAE's, of `arch`."""
    with torch.device("meta"):
        modules = entry.modules(arch)
    denoiser = modules[entry.family.denoiser_folder]
    return dict(denoiser.config) | {"_class_name": type(denoiser).__name__}, dict(modules["vae"].config)


def measure(entry: Entry, method: str, resolution: int, arch: str, device: torch.device, fake: bool,
            overrides: dict) -> dict:
    p = study_settings(overrides | {"method": method})
    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config, vae_config = configs(entry, arch)
    shape = memory_plan.latent_shape(entry.family, vae_config, config, resolution, p["train_batch_size"])
    measured = memory_plan.measure_training(entry.family, config, p, shape, on_gpu=True, device=device, fake=fake)
    peak = measured.peak
    figures = {"method": method, "resolution": resolution, "arch": arch, "fake_tensors": fake, "settings": overrides,
               "micro_batches": memory_plan.micro_batches(p), "parameters": measured.parameters, "trainable_parameters": measured.trainable_parameters,
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
                        "are named with them")
    args = parser.parse_args()
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    suffix = "".join(f" {item}" for item in sorted(args.set))
    device = torch.device(args.device)
    runs = {f"{name}-{method}-{resolution}": (entry, method, resolution) for name, entry in ENTRIES.items()
            for method in entry.methods for resolution in entry.resolutions}
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
               "runs": {}}
    if args.json and args.json.is_file():  # the runs not chosen keep their figures
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
