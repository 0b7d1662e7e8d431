"""generate: render every evaluation prompt, images_per_prompt times, with one Stable Diffusion pipeline.

Reads MODEL_DIR (a pipeline folder: the pretrained or the fine-tuned one) and params `generate`, `shared`.
Writes OUT_DIR/<prompt>_<image>.png and OUT_DIR/manifest.jsonl (model, prompt, text given, seed, settings).
Every image has its own generator (seed + index), so any one can be regenerated alone; both models get the same seeds.

Run: python -m stages.generate MODEL_NAME MODEL_DIR OUT_DIR
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tqdm import tqdm

from stages import data, models
from stages.config import (
    BOOL, MULTIPLE_OF_8, NON_EMPTY_STRING, NON_NEGATIVE_NUMBER, POSITIVE_INT, cli, load_params, load_shared,
    non_empty_list_of, one_of,
)
from stages.evaluation import image_seed, styled
from stages.outputs import atomic_dir

log = logging.getLogger(__name__)

SCHEDULERS = ("pndm", "ddim", "dpmsolver++", "euler")
SCHEMA = {
    "prompts": non_empty_list_of(NON_EMPTY_STRING), "images_per_prompt": POSITIVE_INT,
    "style_prompt": NON_EMPTY_STRING, "style_to_generator": BOOL, "scheduler": one_of(*SCHEDULERS),
    "num_inference_steps": POSITIVE_INT, "guidance_scale": NON_NEGATIVE_NUMBER, "resolution": MULTIPLE_OF_8,
    "batch_size": POSITIVE_INT,
}


def plan(model: str, p: dict, seed: int) -> list[dict]:
    """One manifest row per image to render, in a fixed order."""
    settings = {k: p[k] for k in ("scheduler", "num_inference_steps", "guidance_scale", "resolution", "style_prompt",
                                  "style_to_generator")}
    return [
        {"file_name": f"{i:02d}_{j:02d}.png", "model": model, "prompt_index": i, "prompt": prompt, "image_index": j,
         "text_given": styled(prompt, p["style_prompt"], p["style_to_generator"]),
         "seed": image_seed(seed, i, j, p["images_per_prompt"])} | settings
        for i, prompt in enumerate(p["prompts"])
        for j in range(p["images_per_prompt"])
    ]


def set_scheduler(pipe, name: str) -> None:
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    config = pipe.scheduler.config
    if name == "dpmsolver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    else:
        pipe.scheduler = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[name].from_config(config)


def load_pipeline(model_dir: Path, scheduler: str):
    """The pipeline on the device accelerate picks, in fp16 on a GPU and fp32 on a CPU."""
    import torch
    from accelerate import PartialState

    device = PartialState().device
    pipe = models.load_sd_pipeline(model_dir)
    pipe.to(device, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, rows: list[dict], p: dict, out: Path) -> None:
    """Render the planned images in batches, one generator per image."""
    import torch

    batches = [rows[i:i + p["batch_size"]] for i in range(0, len(rows), p["batch_size"])]
    for batch in tqdm(batches, desc="generate", unit="batch"):
        generators = [torch.Generator(pipe.device).manual_seed(row["seed"]) for row in batch]
        images = pipe(
            prompt=[row["text_given"] for row in batch], generator=generators, height=p["resolution"],
            width=p["resolution"], num_inference_steps=p["num_inference_steps"], guidance_scale=p["guidance_scale"],
        ).images
        for row, image in zip(batch, images):
            image.save(out / row["file_name"])


def run(model: str, model_dir: Path, out: Path, p: dict, seed: int) -> list[dict]:
    """Render all images of one model into `out`; return the manifest rows."""
    models.check_sd_folder(model_dir)
    rows = plan(model, p, seed)
    pipe = load_pipeline(model_dir, p["scheduler"])
    log.info("generate %d images with %s (%s) on %s", len(rows), model, model_dir, pipe.device)
    with atomic_dir(out) as tmp:
        render(pipe, rows, p, tmp)
        data.write_jsonl(tmp / "manifest.jsonl", rows)
    return rows


@cli
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="name recorded in the manifest, e.g. base or finetuned")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    run(args.model, args.model_dir, args.out, load_params("generate", SCHEMA), load_shared()["seed"])


if __name__ == "__main__":
    main()
