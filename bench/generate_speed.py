"""Generation speed and memory: the naive loop, plain diffusers batched, and ours (the generate stage's code path).

Side by side in one run, each configuration loaded alone (so its peak memory is its own), warm-up timed apart:
  (a) naive     PNDM, 50 steps, batch 1: a plain diffusers pipeline called once per image
  (b) diffusers DPM-Solver++, 25 steps, every image of the prompt set in one batch, fp16 on a GPU
  (c) ours      the same settings through stages.generate: SDPA, fused QKV projections, channels_last, VAE decoded
                in batches, torch.compile of the UNet where available
Then the PSNR of (c) against (b) decoded with an fp32 VAE (same seeds), and the study's evaluation from loaded models:
2 models x prompts x images, CLIP scores and BLIP captions of all of them (stages.clip_eval / stages.blip_check code).

Run on a GPU:  python bench/generate_speed.py --models models/pretrained   (folders sd/, clip/, blip/, e.g. fetched
with `dvc exp run -S profile=full`), or `--arch full` to build study-shaped random models first. On a CPU it defaults
to tiny random models at 32 px (the test suite runs it that way). Settings not given come from params.yaml (generate).
--json is rewritten after each configuration ("complete": false until the evaluation is done).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages import blip_check, clip_eval, generate
from stylestudy.models import builders, families, loading  # noqa: E402
from stylestudy.core.config import load_params  # noqa: E402
from stylestudy.evaluate.samples import styled  # noqa: E402


def parse_args(cuda: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="folder with sd/, clip/, blip/ (default: build random ones)")
    parser.add_argument("--arch", choices=("tiny", "full"), default="full" if cuda else "tiny")
    parser.add_argument("--resolution", type=int, help="default: params.yaml on a GPU, 32 on a CPU")
    parser.add_argument("--prompts", type=int, help="use the first N prompts of params.yaml (default: all)")
    parser.add_argument("--images-per-prompt", type=int)
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps of (b) and (c)")
    parser.add_argument("--naive-steps", type=int, default=50)
    parser.add_argument("--naive-images", type=int, help="time (a) on the first N images only (default: all)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args()


def settings(args: argparse.Namespace, cuda: bool) -> dict:
    """The generate section of params.yaml with the bench's sizes and the batched configuration's settings."""
    p = dict(load_params("generate", REPO / "params.yaml"))
    p["prompts"] = p["prompts"][: args.prompts or None]
    p["images_per_prompt"] = args.images_per_prompt or p["images_per_prompt"]
    p["resolution"] = args.resolution or (p["resolution"] if cuda else 32)
    n_images = len(p["prompts"]) * p["images_per_prompt"]
    return p | {"scheduler": "dpmsolver++", "num_inference_steps": args.steps, "batch_size": n_images,
                "dtype": "auto", "compile": args.compile, "channels_last": True, "fuse_qkv": True}


def jobs(p: dict, seed: int) -> tuple[list[str], list[int]]:
    """The text and seed of every image, as the generate stage plans them."""
    rows = generate.plan("bench", p, seed)
    return [row["text_given"] for row in rows], [row["seed"] for row in rows]


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, *args):
    """(result, seconds) of one call, the device's queue drained before and after."""
    synchronize()
    started = time.perf_counter()
    result = fn(*args)
    synchronize()
    return result, time.perf_counter() - started


def reset_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def plain_pipeline(sd_dir: Path, scheduler: str):
    """A plain diffusers pipeline as the usual recipe loads it: fp16 on a GPU, nothing else changed."""
    device, dtype = loading.inference_device()
    pipe = families.load_pipeline(sd_dir).to(device, dtype=dtype)
    families.family_of_pipeline(pipe).set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_plain(pipe, p: dict, texts: list[str], seeds: list[int], output_type: str = "pil"):
    import torch

    generators = [torch.Generator(pipe.device).manual_seed(seed) for seed in seeds]
    return pipe(prompt=texts, generator=generators, height=p["resolution"], width=p["resolution"],
                num_inference_steps=p["num_inference_steps"], guidance_scale=p["guidance_scale"],
                output_type=output_type).images


def figure(name: str, warmup_s: float, run_s: float, n_images: int) -> dict:
    return {"configuration": name, "warmup_s": warmup_s, "run_s": run_s, "images_per_s": n_images / run_s,
            "peak_memory_mib": peak_memory_mib()}


def run_naive(sd_dir: Path, p: dict, texts: list[str], seeds: list[int], steps: int) -> dict:
    """(a) one pipeline call per image, PNDM."""
    reset_memory()
    q = p | {"scheduler": "pndm", "num_inference_steps": steps}
    pipe = plain_pipeline(sd_dir, "pndm")
    _, warmup = timed(call_plain, pipe, q, texts[:1], seeds[:1])
    _, seconds = timed(lambda: [call_plain(pipe, q, [text], [seed]) for text, seed in zip(texts, seeds)])
    return figure(f"(a) naive: PNDM {steps} steps, batch 1", warmup, seconds, len(texts))


def decode_fp32(pipe, latents) -> list:
    """The reference decode: an fp32 copy of the VAE, one latent at a time."""
    import torch

    vae = copy.deepcopy(pipe.vae).float()
    images = []
    with torch.no_grad():
        for chunk in latents.float().split(1):
            images += pipe.image_processor.postprocess(vae.decode(chunk / vae.config.scaling_factor).sample)
    return images


def run_plain(sd_dir: Path, p: dict, texts: list[str], seeds: list[int]) -> tuple[dict, list, list]:
    """(b) plain diffusers, every image in one call; returns its figure, its images and the fp32-VAE reference."""
    reset_memory()
    pipe = plain_pipeline(sd_dir, p["scheduler"])
    _, warmup = timed(call_plain, pipe, p, texts, seeds)
    images, seconds = timed(call_plain, pipe, p, texts, seeds)
    result = figure(f"(b) diffusers: DPM-Solver++ {p['num_inference_steps']} steps, batch {len(texts)}", warmup,
                    seconds, len(texts))
    reference = decode_fp32(pipe, call_plain(pipe, p, texts, seeds, output_type="latent"))
    return result, images, reference


def run_ours(sd_dir: Path, p: dict, texts: list[str], seeds: list[int]) -> tuple[dict, list, object]:
    """(c) the generate stage's code path with the same settings as (b); returns its figure, images and pipeline."""
    reset_memory()
    pipe = generate.load_pipeline(sd_dir, p)
    _, warmup = timed(generate.generate_images, pipe, texts, seeds, p)
    images, seconds = timed(generate.generate_images, pipe, texts, seeds, p)
    extras = ", compiled UNet" if p["compile"] else ""
    name = f"(c) ours: same + fused QKV, channels_last, VAE batches of {p['vae_batch_size']}{extras}"
    return figure(name, warmup, seconds, len(texts)), images, pipe


def run_evaluation(pipe, model_dirs: Path, p: dict, texts: list[str], seeds: list[int]) -> dict:
    """The study's evaluation from loaded models: two models' images, then CLIP scores and BLIP captions of all."""
    import torch

    device, dtype = loading.inference_device()
    clip = loading.load_clip(model_dirs / "clip", device, half=dtype == torch.float16)
    blip = loading.load_blip(model_dirs / "blip", device, dtype)
    max_new_tokens = load_params("blip_check", REPO / "params.yaml")["max_new_tokens"]
    clip_texts = [styled(prompt, p["style_prompt"], True) for prompt in p["prompts"]
                  for _ in range(p["images_per_prompt"])] * 2
    reset_memory()
    # Both models have the same architecture: the base pipeline renders twice (the fine-tuned one has other weights).
    images, generate_s = timed(lambda: [im for _ in range(2) for im in generate.generate_images(pipe, texts, seeds, p)])
    _, clip_s = timed(clip_eval.score_images, *clip, images, clip_texts, len(images))
    _, blip_s = timed(blip_check.caption_images, *blip, images, len(images), max_new_tokens)
    return {"images": len(images), "generate_s": generate_s, "clip_s": clip_s, "blip_s": blip_s,
            "total_s": generate_s + clip_s + blip_s, "peak_memory_mib": peak_memory_mib()}


def psnr(images: list, reference: list) -> float:
    """Peak signal-to-noise ratio in dB over all pixels of all images (8-bit)."""
    a = np.stack([np.asarray(image, dtype=np.float64) for image in images])
    b = np.stack([np.asarray(image, dtype=np.float64) for image in reference])
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def measure(model_dirs: Path, p: dict, args: argparse.Namespace, results: dict, save) -> None:
    """Every figure of the report, put in `results` and saved as each part is measured."""
    texts, seeds = jobs(p, args.seed)
    sd_dir = model_dirs / "sd"
    naive_images = args.naive_images or len(texts)
    results["configurations"] = [run_naive(sd_dir, p, texts[:naive_images], seeds[:naive_images], args.naive_steps)]
    save()
    plain, plain_images, reference = run_plain(sd_dir, p, texts, seeds)
    results["configurations"].append(plain)
    results["psnr_diffusers_db"] = psnr(plain_images, reference)
    save()
    ours, our_images, pipe = run_ours(sd_dir, p, texts, seeds)
    results["configurations"].append(ours)
    results |= {"speedup_over_diffusers": ours["images_per_s"] / plain["images_per_s"],
                "psnr_ours_db": psnr(our_images, reference)}
    save()
    results["evaluation"] = run_evaluation(pipe, model_dirs, p, texts, seeds)


def build_models(folder: Path, arch: str, seed: int) -> Path:
    """Random SD, CLIP and BLIP folders of `arch`, as `fetch` writes them."""
    for kind in ("sd", "clip", "blip"):
        getattr(builders, f"save_random_{kind}")(folder / kind, seed, arch=arch)
    return folder


def environment() -> dict:
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    versions = {name: metadata.version(name) for name in ("torch", "diffusers", "transformers", "open-clip-torch")}
    return {"device": device, "python": platform.python_version(), "libraries": versions}


def report(results: dict, p: dict, args: argparse.Namespace) -> None:
    env = results["environment"]
    print(f"device: {env['device']}; " + ", ".join(f"{k} {v}" for k, v in env["libraries"].items()))
    print(f"models: {args.models or args.arch + ' random'}; {p['resolution']} px, {len(p['prompts'])} prompts x "
          f"{p['images_per_prompt']} images, guidance {p['guidance_scale']}, dtype {p['dtype']}")
    print(f"{'configuration':<78}{'warm-up s':>10}{'run s':>9}{'images/s':>10}{'peak MiB':>10}")
    for row in results["configurations"]:
        memory = "-" if row["peak_memory_mib"] is None else f"{row['peak_memory_mib']:.0f}"
        print(f"{row['configuration']:<78}{row['warmup_s']:>10.2f}{row['run_s']:>9.2f}{row['images_per_s']:>10.2f}"
              f"{memory:>10}")
    print(f"speed-up of (c) over (b): {results['speedup_over_diffusers']:.2f}x (target >= 1.5x on a GPU)")
    print(f"PSNR of (c) against (b) with an fp32 VAE: {results['psnr_ours_db']:.1f} dB (target >= 30); "
          f"(b) itself: {results['psnr_diffusers_db']:.1f} dB")
    e = results["evaluation"]
    print(f"study evaluation from loaded models ({e['images']} images, CLIP, BLIP; ours): {e['total_s']:.2f} s "
          f"(generate {e['generate_s']:.2f}, CLIP {e['clip_s']:.2f}, BLIP {e['blip_s']:.2f}); target <= 15 s, H100")


def main() -> None:
    import torch

    cuda = torch.cuda.is_available()
    args = parse_args(cuda)
    p = settings(args, cuda)
    results = {"environment": environment(), "complete": False}

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="generate-speed-") as tmp:
        model_dirs = args.models or build_models(Path(tmp), args.arch, args.seed)
        measure(model_dirs, p, args, results, save)
    results["complete"] = True
    save()
    report(results, p, args)


if __name__ == "__main__":
    main()
