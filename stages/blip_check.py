"""blip_check: caption every generated image with BLIP and count the captions that name the sketch style.

Reads BLIP_DIR (transformers BLIP captioning folder), SAMPLES_DIR/{base,finetuned}/ and params `blip_check`.
Writes METRICS (flat; per prompt set: the study's prompts style_share_*, the held-out captions test_style_share_*):
the share of style captions per model with its Wilson 95% interval and n, and the fine-tuned minus base difference
with McNemar's exact p-value (the same seeds pair the images), and DETAIL_DIR/captions.csv. A baseline generator
whose samples folder holds images (SAMPLES_DIR/vd/, when fetch.vd.enabled) adds its share (style_share_vd,
test_style_share_vd, with interval and n); its empty folder adds none.
Captions in batches on the GPU in fp16 when there is one, in fp32 on a CPU.

Run: python -m stages.blip_check BLIP_DIR SAMPLES_DIR METRICS DETAIL_DIR (params.yaml is validated whole first)
Example: python -m stages.blip_check models/pretrained/blip reports/samples reports/blip_check.json reports/blip_check
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from stylestudy.models import loading
from stylestudy.evaluate import statistics
from stylestudy.core.config import cli, load_params, parse_args
from stylestudy.evaluate.samples import MODELS, SET_PREFIXES, of_set, read_samples
from stylestudy.core.outputs import atomic_dir, write_csv, write_json

if TYPE_CHECKING:
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

log = logging.getLogger(__name__)

def captions(blip_dir: Path, paths: list[Path], p: dict) -> list[str]:
    """Greedy BLIP captions of the sample images, on the GPU in fp16 when there is one."""
    device, dtype = loading.inference_device()
    model, processor = loading.load_blip(blip_dir, device, dtype)
    return caption_images(model, processor, paths, p["batch_size"], p["max_new_tokens"])


def caption_images(model: BlipForConditionalGeneration, processor: BlipProcessor, images: list[Path | Image.Image],
                   batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy captions of images (files or in memory), batched on the model's device and dtype."""
    import torch
    from PIL import Image

    texts = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="blip caption", unit="batch"):
            batch = [Image.open(x) if isinstance(x, Path) else x for x in images[start:start + batch_size]]
            inputs = processor(images=[image.convert("RGB") for image in batch], return_tensors="pt")
            inputs = inputs.to(model.device, model.dtype)  # casts the pixels only, never token ids
            ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            texts += [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    return texts


# What English adds to a style word: "drawings", "sketches", "sketched", "sketching", "illustrations", "pencilled".
INFLECTIONS = r"(?:s|es|d|ed|led|ing|ings)?"


def style_matcher(style_words: list[str]) -> re.Pattern:
    """Matches any style word or its plural or inflected form as a whole word, case-insensitively ("drawings" but not
    "withdrawing"); in a phrase the last word inflects ("line arts")."""
    words = "|".join(re.escape(w.strip()) for w in style_words)
    return re.compile(r"\b(?:" + words + r")" + INFLECTIONS + r"\b", re.IGNORECASE)


def share_of(flags: list[bool], key: str) -> dict:
    """The share of captions naming the style, its Wilson 95% interval and n, under `key`."""
    n, named = len(flags), sum(flags)
    low, high = statistics.wilson_interval(named, n)
    return {key: named / n, f"{key}_ci_low": low, f"{key}_ci_high": high, f"{key}_n": n}


def share_summary(table: list[dict], prefix: str) -> dict:
    """Flat metrics of one prompt set: each model's style share (Wilson 95% interval, n), and the paired difference
    with McNemar's exact p-value."""
    flags = {m: [row["names_style"] for row in table if row["model"] == m] for m in MODELS}
    name = f"{prefix}style_share"
    metrics = {}
    for model in MODELS:
        metrics |= share_of(flags[model], f"{name}_{model}")
    for model in dict.fromkeys(row["model"] for row in table if row["model"] not in MODELS):  # baselines
        metrics |= share_of([row["names_style"] for row in table if row["model"] == model], f"{name}_{model}")
    only_base = sum(b and not f for b, f in zip(flags["base"], flags["finetuned"]))
    only_finetuned = sum(f and not b for b, f in zip(flags["base"], flags["finetuned"]))
    return metrics | {f"{name}_diff": metrics[f"{name}_finetuned"] - metrics[f"{name}_base"],
                      f"{name}_diff_n": len(flags["base"]),
                      f"{name}_diff_p": statistics.mcnemar_exact_p(only_base, only_finetuned)}


def run(blip_dir: Path, samples: Path, metrics_path: Path, detail: Path, p: dict) -> dict:
    """Caption all samples and write the style shares; return the metrics."""
    loading.check_blip_folder(blip_dir)
    rows = read_samples(samples)
    all_rows = [row for model_rows in rows.values() for row in model_rows]
    texts = captions(blip_dir, [r["path"] for r in all_rows], p)
    matcher = style_matcher(p["style_words"])
    table = [
        {"set": r["set"], "model": r["model"], "file_name": r["file_name"], "prompt": r["prompt"], "caption": text,
         "names_style": bool(matcher.search(text))}
        for r, text in zip(all_rows, texts)
    ]
    metrics = {}
    for name, prefix in SET_PREFIXES.items():
        if of_set(table, name):
            metrics |= share_summary(of_set(table, name), prefix)
    with atomic_dir(detail) as tmp:
        write_csv(tmp / "captions.csv", table, list(table[0]))
    write_json(metrics_path, metrics)
    log.info("blip_check: %s", metrics)
    return metrics


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "blip_dir": "a transformers BLIP captioning folder (models/pretrained/blip)",
        "samples": "the folder holding base/ and finetuned/ samples (reports/samples)",
        "metrics": "the metrics JSON to write (reports/blip_check.json)",
        "detail": "the folder for the captions table (reports/blip_check)",
    })
    run(args.blip_dir, args.samples, args.metrics, args.detail, load_params("blip_check"))


if __name__ == "__main__":
    main()
