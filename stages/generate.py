"""generate: render every evaluation prompt, images_per_prompt times, with one pipeline of the model family.

Two prompt sets: the study's prompts (set `study`, images_per_prompt each) and, with generate.test_captions > 0, the
captions of that many held-out test images (set `test`, one image each; images the model never trained on).
Reads MODEL_DIR (a pipeline folder of params `model`'s family: the pretrained or the fine-tuned one; or a baseline's,
Versatile Diffusion, recognised by its model_index.json: the same plan, settings as its generator can run them, see
stylestudy/models/families/vd.py; a baseline that fetch left switched off gives an empty OUT_DIR, no rows),
SPLIT_DIR/test.jsonl and params `generate`, `model`, `shared`. Writes OUT_DIR/<prompt>_<image>.png,
OUT_DIR/test_<caption>.png and OUT_DIR/manifest.jsonl (set, model, prompt, text given, seed, settings, and the device
and dtype that computed it). Every image has its own generator (seed + index), so any one can be regenerated alone;
both models get the same seeds. Speed settings (dtype, compile, channels_last, fuse_qkv, vae_batch_size) are what
bench/generate_speed.py measures against plain diffusers; it imports this module's code path. `memory` decides which
components share the GPU (stylestudy/models/placement.py): SD3 on a 16 GB card encodes every prompt first.

Run: python -m stages.generate MODEL_NAME MODEL_DIR SPLIT_DIR OUT_DIR (params.yaml is validated whole before any work)
Example: python -m stages.generate finetuned models/finetuned data/split reports/samples/finetuned
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from stylestudy.data import dataset
from stylestudy.models import families, loading, placement
from stylestudy.models.families import Family, Generator
from stylestudy.core.config import cli, load_params, load_shared, parse_args, require_path
from stylestudy.evaluate.samples import image_seed, styled
from stylestudy.core.outputs import atomic_dir

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from PIL import Image

log = logging.getLogger(__name__)

SPEED = ("compile", "channels_last", "fuse_qkv", "vae_batch_size", "memory")  # change pixels by float rounding at most


def held_out_captions(split: Path, wanted: int, seed: int) -> list[dict]:
    """`wanted` rows of the test split (file_name, text), drawn with the seed; all of them when it holds fewer."""
    if wanted == 0:
        return []
    rows = dataset.read_jsonl(require_path(split / "test.jsonl", "run the split stage first"))
    if len(rows) < wanted:
        log.warning("generate.test_captions is %d but %s holds %d test captions: using %s", wanted,
                    split / "test.jsonl", len(rows), "all of them" if rows else "none (the held-out set is skipped)")
        return rows
    chosen = np.random.default_rng(seed).choice(len(rows), size=wanted, replace=False)
    return [rows[i] for i in sorted(chosen)]


def plan(model: str, p: dict, seed: int, held_out: list[dict] = ()) -> list[dict]:
    """One manifest row per image to render, in a fixed order: the study's prompts, then the held-out captions."""
    settings = {k: p[k] for k in ("scheduler", "num_inference_steps", "guidance_scale", "resolution", "style_prompt",
                                  "style_to_generator")}
    study = [
        {"file_name": f"{i:02d}_{j:02d}.png", "set": "study", "model": model, "prompt_index": i, "prompt": prompt,
         "image_index": j, "seed": image_seed(seed, i, j, p["images_per_prompt"])}
        for i, prompt in enumerate(p["prompts"])
        for j in range(p["images_per_prompt"])
    ]
    first_free = len(p["prompts"]) * p["images_per_prompt"]  # held-out seeds follow the study's: no image shares one
    test = [
        {"file_name": f"test_{k:04d}.png", "set": "test", "model": model, "prompt_index": k, "prompt": row["text"],
         "image_index": 0, "seed": seed + first_free + k, "source_file": row["file_name"]}
        for k, row in enumerate(held_out)
    ]
    return [row | {"text_given": styled(row["prompt"], p["style_prompt"], p["style_to_generator"])} | settings
            for row in study + test]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA, fp32 elsewhere. fp16 asked for on a CPU runs as bf16, the half type CPU kernels support."""
    import torch

    if name == "auto":
        return loading.default_dtype(device)
    if name == "fp16" and device.type != "cuda":
        log.warning("generate.dtype fp16 runs as bf16 on %s", device.type)
        return torch.bfloat16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def speed_up(pipe: DiffusionPipeline, family: Generator, p: dict) -> None:
    """What plain diffusers leaves on the table: fused QKV projections, channels_last, a compiled denoiser; SDPA
    always."""
    import torch

    family.use_fused_attention(pipe)  # torch's fused attention kernels (flash / memory-efficient on CUDA)
    denoiser = family.denoiser_of(pipe)
    if p["fuse_qkv"]:
        family.fuse_qkv(pipe)  # one matmul for q, k, v (k, v in cross-attention): fewer, larger kernels
    if p["channels_last"]:
        denoiser.to(memory_format=torch.channels_last)  # NHWC: what cuDNN's fastest convolutions want
        pipe.vae.to(memory_format=torch.channels_last)
    if p["compile"]:
        denoiser.compile(fullgraph=True)  # compiled at the first call (warm-up); the denoiser does >90% of the FLOPs


def load_pipeline(model_dir: Path, p: dict, family: Generator | None = None) -> DiffusionPipeline:
    """The pipeline (of `family`; None: the folder's, with default settings) in generate.dtype, placed on the device
    accelerate picks as generate.memory says, with the scheduler and speed-ups asked for."""
    device, _ = loading.inference_device()
    family = families.generator_for(model_dir, family)
    pipe = family.load_pipeline(model_dir)
    family.cast(pipe, resolve_dtype(p["dtype"], device))  # T5's wo in fp32, SDXL's VAE (model.vae_precision)
    family.set_scheduler(pipe, p["scheduler"])
    speed_up(pipe, family, p)
    placement.place(pipe, p["memory"], device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode(pipe: DiffusionPipeline, family: Generator, latents: torch.Tensor, vae_batch_size: int) -> list[Image.Image]:
    """Decode latents vae_batch_size at a time: the decoder's activations, large at 512 px, stay bounded."""
    import torch

    images = []
    with torch.no_grad():
        device = placement.execution_device(pipe)  # with model offload the VAE waits elsewhere between calls
        for chunk in latents.split(vae_batch_size):
            chunk = family.from_latents(pipe.vae.config, chunk.to(device, pipe.vae.dtype))
            images += pipe.image_processor.postprocess(pipe.vae.decode(chunk, return_dict=False)[0], output_type="pil")
    return images


def generate_latents(pipe: DiffusionPipeline, family: Generator, prompts: dict, seeds: list[int], p: dict) \
        -> torch.Tensor:
    """The latents of one batch (`prompts`: the texts, or their embeddings), one generator per image: an image does
    not depend on its batch."""
    import torch

    generators = [torch.Generator(placement.execution_device(pipe)).manual_seed(seed) for seed in seeds]
    return pipe(**prompts, generator=generators, height=p["resolution"], width=p["resolution"],
                num_inference_steps=p["num_inference_steps"], guidance_scale=p["guidance_scale"], output_type="latent",
                **family.generation_kwargs()).images


def generate_images(pipe: DiffusionPipeline, prompts: list[str] | dict, seeds: list[int], p: dict,
                    family: Generator | None = None) -> list[Image.Image]:
    """One batch of images, decoded; `prompts`: the texts, or the pipeline's keywords for their embeddings."""
    family = family or families.family_of_pipeline(pipe)
    prompts = prompts if isinstance(prompts, dict) else {"prompt": prompts}
    return decode(pipe, family, generate_latents(pipe, family, prompts, seeds, p), p["vae_batch_size"])


def render(pipe: DiffusionPipeline, family: Generator, rows: list[dict], p: dict, out: Path) -> None:
    """Render the planned images in batches of batch_size and save them as PNGs; with memory `sequential`, every
    prompt is encoded first and the text encoders freed before the denoiser runs."""
    batches = [rows[i:i + p["batch_size"]] for i in range(0, len(rows), p["batch_size"])]
    texts = [[row["text_given"] for row in batch] for batch in batches]
    if p["memory"] == "sequential":
        device, _ = loading.inference_device()
        prompts = placement.encode_all_then_free(pipe, family, texts, p["guidance_scale"] > 1, device)
    else:
        prompts = texts
    for batch, batch_prompts in tqdm(list(zip(batches, prompts)), desc="generate", unit="batch"):
        images = generate_images(pipe, batch_prompts, [row["seed"] for row in batch], p, family)
        for row, image in zip(batch, images):
            image.save(out / row["file_name"])


def run(model: str, model_dir: Path, split: Path, out: Path, p: dict, seed: int,
        family: Family = families.FAMILIES["sd2"]) -> list[dict]:
    """Render all images of one model (a pipeline of `family`, or a baseline's) into `out`; return the manifest rows
    (none, in an empty folder, for a baseline switched off)."""
    if families.switched_off(model_dir):
        log.info("generate %s: switched off in %s; writing an empty manifest", model, model_dir)
        with atomic_dir(out) as tmp:
            dataset.write_jsonl(tmp / "manifest.jsonl", [])
        return []
    family = families.generator_for(model_dir, family)
    p = family.runnable(p)
    held_out = held_out_captions(split, p["test_captions"], seed)
    pipe = load_pipeline(model_dir, p, family)
    # How the images were computed goes beside what was asked for: half precision moves pixels, the rest rounding.
    dtype = str(family.denoiser_of(pipe).dtype).split(".")[-1]
    device, _ = loading.inference_device()
    rendered = {k: p[k] for k in SPEED} | {"device": device.type, "dtype": dtype}
    rows = [row | rendered for row in plan(model, p, seed, held_out)]
    log.info("generate %d images with %s (%s) on %s", len(rows), model, model_dir, device)
    with atomic_dir(out) as tmp:
        render(pipe, family, rows, p, tmp)
        dataset.write_jsonl(tmp / "manifest.jsonl", rows)
    return rows


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "model": {"help": "the name recorded in the manifest: base or finetuned"},
        "model_dir": "a Stable Diffusion pipeline folder (models/pretrained/sd or models/finetuned)",
        "split": "the split folder whose test.jsonl holds the held-out captions (data/split)",
        "out": "the folder to write the PNGs and manifest.jsonl into (reports/samples/<model>)",
    })
    p, shared = load_params("generate"), load_shared()
    loading.require_gpu(shared["profile"])
    run(args.model, args.model_dir, args.split, args.out, p, shared["seed"], families.from_params(load_params("model")))


if __name__ == "__main__":
    main()
