"""Fine-tuning speed and memory: the straightforward recipe against ours, through the finetune stage's own code.

Side by side in one run, each configuration in its own process (so its peak memory is its own), at each batch size:
  (a) straightforward  what diffusers' train_text_to_image example does: VAE- and text-encode every step, fp16
                       autocast (bf16 on a CPU), bitsandbytes 8-bit AdamW, EMA on the device without foreach,
                       gradient checkpointing
  (b) ours             latents and text embeddings cached once (stylestudy/data/latents.py), bf16 where supported, SDPA,
                       channels_last, fused AdamW (foreach on a CPU), foreach EMA, torch.compile with --compile
  (c) LoRA             (b) with `method: lora`, rank 4 on the attention projections (stylestudy/train/lora.py)
  (d) CLIP loss        (b) with `clip_loss` on every step and every sample (one-step x0, VAE decode, guidance CLIP)
All build the models, data, optimizer and EMA as the finetune stage does (stylestudy.train.build,
finetune.prepare_inputs) and step with stylestudy.train.loop.train_batch. Reported:
images/s over the steady-state steps (warm-up steps, compilation included, timed apart), peak memory
(torch.cuda.max_memory_allocated on CUDA; the process's peak RSS on a CPU, which never goes down, so batch sizes run
in increasing order) and, on CUDA, MFU: UNet model FLOPs (forward+backward per image, counted with
torch.utils.flop_counter.FlopCounterMode over one uncompiled step of (b) without gradient checkpointing, where the
UNet is the only model that runs) x images/s / the device's dense bf16 peak (bench/device_peaks.py, by its name; a
device not listed gets no MFU unless --peak-flops gives its peak). --json is rewritten after every batch size of every
configuration, so a run stopped part-way keeps what it measured ("complete": false).

Run on a GPU:  python bench/finetune_speed.py   (study-shaped random SD2-base at 256 px, batch 1, 8, 32, 64), or
--sd models/pretrained/sd for a fetched pipeline. On a CPU it defaults to tiny random models at 32 px, batch 1 and 4.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

from stylestudy.data import dataset  # noqa: E402

CONFIGURATIONS = {
    "a": ("(a) straightforward", {"cache_latents": False, "mixed_precision": "fp16", "optimizer": "adamw8bit",
                                   "gradient_checkpointing": True, "channels_last": False, "compile_unet": False}),
    "b": ("(b) ours", {"cache_latents": True, "mixed_precision": "bf16", "optimizer": "adamw_fused",
                       "gradient_checkpointing": False, "channels_last": True}),
}
OURS = CONFIGURATIONS["b"][1]
CONFIGURATIONS |= {
    "c": ("(c) ours, LoRA r4", OURS | {"method": "lora", "lora_rank": 4, "lora_alpha": 4}),
    "d": ("(d) ours, CLIP loss", OURS | {"clip_loss": {"weight": 0.01, "kind": "global", "max_timestep": 1000,
                                                       "every": 1}}),
}
STYLE_PROMPT = "A black and white sketch of"


def parse_args() -> argparse.Namespace:
    import torch

    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sd", type=Path, help="a Stable Diffusion pipeline folder (default: build a random one)")
    parser.add_argument("--arch", choices=("tiny", "full"), default="full" if cuda else "tiny")
    parser.add_argument("--resolution", type=int, default=256 if cuda else 32)
    parser.add_argument("--batch-sizes", default="1,8,32,64" if cuda else "1,4", help="comma-separated")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 2, help="untimed steps first")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="compile (b)'s UNet")
    parser.add_argument("--ours-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="gradient checkpointing in (b) too: less memory, about a third more compute")
    parser.add_argument("--peak-flops", type=float, help="the device's dense bf16 FLOP/s (default: by its name)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def make_inputs(args: argparse.Namespace, root: Path) -> Path:
    """A pipeline folder (given or random) and synthetic sketches, one per image of the largest batch."""
    from stylestudy.models import builders
    from stylestudy.data import sketches

    sd = args.sd or root / "sd"
    if not args.sd:
        builders.save_random_sd(sd, 0, args.arch)
    builders.save_random_guide(root / "guide", 0, args.arch)
    n_images = max(int(b) for b in args.batch_sizes.split(","))
    sketches.make_synthetic_sketches(root / "raw", n_images, args.resolution, 0)
    (root / "sd_path").write_text(str(sd))
    return root


def settings(key: str, args: argparse.Namespace, batch: int) -> tuple[dict, Any]:
    """params.yaml's finetune section with the configuration's settings and the bench's sizes, and the encode
    settings (cache_latents is the configuration's)."""
    from stylestudy.core.config import load_params
    from stylestudy.data.latents import EncodeSettings

    p = dict(load_params("finetune", REPO / "params.yaml"))
    ours = {"compile_unet": args.compile, "gradient_checkpointing": args.ours_checkpointing} if key != "a" else {}
    configuration = dict(CONFIGURATIONS[key][1])
    encoding = load_params("encode", REPO / "params.yaml") | {
        "cache_latents": configuration.pop("cache_latents"), "resolution": args.resolution, "dataloader_num_workers": 0}
    p = p | configuration | ours | {"train_batch_size": batch, "gradient_accumulation_steps": 1, "use_ema": True,
                                    "max_train_steps": 10**9, "checkpoint_every": 0, "dataloader_num_workers": 0,
                                    "validate_every": 0}
    return p, EncodeSettings(**encoding)


def build(inputs: Path, p: dict, encoding: Any) -> tuple:
    """Accelerator, training state and the loop's extras, made by the stage's functions."""
    import dataclasses

    from diffusers.training_utils import EMAModel

    from stages import finetune
    from stylestudy.models import families
    from stylestudy.train import build as building
    from stylestudy.train import loop

    sd, raw = Path((inputs / "sd_path").read_text()), inputs / "raw"
    rows = dataset.read_metadata(raw)
    accelerator = building.build_accelerator(p, 0)
    family = families.check_pipeline_folder(sd)
    trainee = building.load_trainee(family, sd, p)
    unused = inputs / "unused"  # the stage's outputs: the bench writes none
    folders = finetune.Folders(sd=sd, guide=inputs / "guide", raw=raw, split=unused, out=unused, live=unused,
                               scratch=unused)
    prepared = finetune.prepare_inputs(folders, family, rows, [], trainee.noise, p, encoding, 0, STYLE_PROMPT,
                                       accelerator)
    dataloader = building.make_dataloader(prepared.data, p["train_batch_size"], 0, 0)
    state = building.prepare_training(trainee, dataloader, p, accelerator)
    if not encoding.cache_latents:  # (a): the example's EMAModel, one kernel per tensor
        state = dataclasses.replace(state, ema=EMAModel(state.model.parameters(), decay=p["ema_decay"]))
    state.ema.to(accelerator.device)
    return accelerator, state, loop.Extras(prepared.data.to_inputs, prepared.guide, None, None)


def batches(state: Any, accelerator: Any):
    """Batches without end, epoch after epoch."""
    from stylestudy.train import checkpoints

    epoch = 0
    while True:
        yield from checkpoints.epoch_batches(state.dataloader, epoch, 0, accelerator)
        epoch += 1


def one_step(batch: Any, state: Any, extras: Any, p: dict, accelerator: Any) -> None:
    from stylestudy.train import loop

    loop.train_batch(batch, state, extras, p, accelerator, 0)  # its grad norm is a float: the step has finished
    state.ema.step(state.trainable)


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_mib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(inputs: Path, p: dict, encoding: Any, args: argparse.Namespace) -> dict:
    """Warm-up and timed steps at one batch size: seconds, images/s and peak memory."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    accelerator, state, extras = build(inputs, p, encoding)
    stream = batches(state, accelerator)
    started = time.perf_counter()
    for _ in range(args.warmup):
        one_step(next(stream), state, extras, p, accelerator)
    synchronize()
    warmup_s, started = time.perf_counter() - started, time.perf_counter()
    for _ in range(args.steps):
        one_step(next(stream), state, extras, p, accelerator)
    synchronize()
    run_s = time.perf_counter() - started
    return {"batch": p["train_batch_size"], "warmup_s": warmup_s, "run_s": run_s,
            "images_per_s": args.steps * p["train_batch_size"] / run_s, "peak_memory_mib": peak_memory_mib()}


def unet_flops_per_image(inputs: Path, p: dict, encoding: Any) -> float:
    """Model FLOPs of the UNet's forward and backward per image: one uncompiled step of (b), counted by torch."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    p = p | {"compile_unet": False, "gradient_checkpointing": False}
    accelerator, state, extras = build(inputs, p, dataclasses.replace(encoding, cache_latents=True))
    batch = next(batches(state, accelerator))
    counter = FlopCounterMode(display=False)
    with counter:  # cached latents: the UNet is the only model that runs in the step
        one_step(batch, state, extras, p, accelerator)
    return counter.get_total_flops() / p["train_batch_size"]


def child(args: argparse.Namespace) -> None:
    """One configuration at every batch size, in increasing order: one JSON line per batch size as it is measured,
    then (b)'s FLOP count."""
    for b in args.batch_sizes.split(","):
        print(json.dumps({"row": measure(args.inputs, *settings(args.child, args, int(b)), args)}), flush=True)
    if args.child == "b":
        print(json.dumps({"flops_per_image": unet_flops_per_image(args.inputs, *settings("b", args, 1))}), flush=True)


def run_child(key: str, inputs: Path, args: argparse.Namespace, figures: dict, save) -> None:
    """One configuration in a fresh process, its figures put in figures[key] and saved as each arrives."""
    flags = ["--resolution", str(args.resolution), "--batch-sizes", args.batch_sizes, "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--compile" if args.compile else "--no-compile",
             "--ours-checkpointing" if args.ours_checkpointing else "--no-ours-checkpointing"]
    figures[key] = {"rows": [], "flops_per_image": None}
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, __file__, *flags, "--child", key, "--inputs", str(inputs)],
                                stdout=subprocess.PIPE, stderr=errors, text=True)
        for line in proc.stdout:
            if line.startswith("{"):
                part = json.loads(line)
                figures[key]["rows"] += [part["row"]] if "row" in part else []
                figures[key]["flops_per_image"] = part.get("flops_per_image", figures[key]["flops_per_image"])
                save()
        if proc.wait():
            errors.seek(0)
            sys.exit(f"configuration {key} failed:\n{errors.read()[-3000:]}")


def environment(args: argparse.Namespace) -> dict:
    """The device, versions, and the peak FLOP/s MFU is taken against (None: no MFU) with where it came from."""
    import torch

    from device_peaks import peak_flops

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    known = peak_flops(device) if cuda else None
    peak, said = (args.peak_flops, "--peak-flops") if args.peak_flops else (
        (known[0], f"{known[1]}, bench/device_peaks.py") if known else
        (None, f"{device} is not in bench/device_peaks.py: no MFU (give --peak-flops)") if cuda else (None, None))
    return {"device": device, "python": platform.python_version(), "command": " ".join(sys.argv),
            "peak_flops": peak, "peak_flops_source": said} | {
        name: metadata.version(name) for name in ("torch", "diffusers", "accelerate", "bitsandbytes")}


def report(figures: dict, args: argparse.Namespace, env: dict) -> list[str]:
    """The table, the FLOP count and how it was obtained."""
    flops, peak = figures["b"]["flops_per_image"], env["peak_flops"]
    lines = [f"{'configuration':<22}{'batch':>6}{'warm-up s':>11}{'images/s':>11}{'peak MiB':>11}{'MFU':>8}"]
    for key, (name, _) in CONFIGURATIONS.items():
        for row in figures[key]["rows"]:
            mfu = f"{flops * row['images_per_s'] / peak:.1%}" if peak else "-"
            lines.append(f"{name:<22}{row['batch']:>6}{row['warmup_s']:>11.2f}{row['images_per_s']:>11.2f}"
                         f"{row['peak_memory_mib']:>11.0f}{mfu:>8}")
    lines.append(f"UNet model FLOPs per image, forward+backward at {args.resolution} px: {flops / 1e12:.4g} TFLOP "
                 "(torch.utils.flop_counter.FlopCounterMode over one uncompiled step of (b), batch 1, cached latents, "
                 "no gradient checkpointing)")
    if peak:
        lines.append(f"MFU = FLOPs per image x images/s / {peak:.3g} FLOP/s ({env['peak_flops_source']})")
    elif env["peak_flops_source"]:
        lines.append(env["peak_flops_source"])
    return lines


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    env, figures = environment(args), {}

    def save(complete: bool = False) -> None:
        if args.json:
            args.json.write_text(json.dumps({"environment": env, "configurations": figures, "complete": complete},
                                            indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        inputs = make_inputs(args, Path(tmp))
        for key in CONFIGURATIONS:
            run_child(key, inputs, args, figures, save)
    save(complete=True)
    print("\n".join(f"{k}: {v}" for k, v in env.items()))
    print("\n".join(report(figures, args, env)))


if __name__ == "__main__":
    main()
