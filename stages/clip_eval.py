"""clip_eval: CLIP cosine similarity (x100) between every generated image and its prompt, base against fine-tuned.

Reads CLIP_DIR (open_clip local-dir folder), SAMPLES_DIR/{base,finetuned}/ (PNGs + manifest.jsonl) and params
`clip_eval`, `shared`. Whether CLIP's text gets the style pre-prompt is `clip_eval.style_to_clip`.
Writes METRICS (flat: mean score per model and their paired difference, each with a 95% bootstrap CI and n) and
DETAIL_DIR/per_image.csv, DETAIL_DIR/per_prompt.csv. Scores in batches on the GPU in fp16 when there is one, in
fp32 on a CPU.

Run: python -m stages.clip_eval CLIP_DIR SAMPLES_DIR METRICS DETAIL_DIR (params.yaml is validated whole first)
Example: python -m stages.clip_eval models/pretrained/clip reports/samples reports/clip_eval.json reports/clip_eval
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from tqdm import tqdm

from stages import models
from stages.config import cli, load_params, load_shared, parse_args
from stages.evaluation import MODELS, mean_with_ci, read_samples, styled
from stages.outputs import atomic_dir, write_csv, write_json

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

def clip_scores(clip_dir: Path, rows: list[dict], texts: list[str], batch_size: int) -> list[float]:
    """100 x cosine similarity between each sample image and its text, on the GPU in fp16 when there is one."""
    import torch

    device, dtype = models.inference_device()
    model, preprocess, tokenizer = models.load_clip(clip_dir, device, half=dtype == torch.float16)
    return score_images(model, preprocess, tokenizer, [r["path"] for r in rows], texts, batch_size)


def score_images(model: Any, preprocess: Callable, tokenizer: Callable, images: list[Path | Image.Image],
                 texts: list[str], batch_size: int) -> list[float]:
    """100 x cosine similarity between each image (a file or in memory) and its text, batched on the model's device."""
    import torch
    from PIL import Image

    weight = next(model.parameters())
    scores = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch_size), desc="clip score", unit="batch"):
            batch = [Image.open(x) if isinstance(x, Path) else x for x in images[start:start + batch_size]]
            pixels = torch.stack([preprocess(image.convert("RGB")) for image in batch]).to(weight.device, weight.dtype)
            tokens = tokenizer(texts[start:start + batch_size]).to(weight.device)
            # fp16 keeps about 3 significant digits: normalise and compare in fp32.
            image_features = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
            text_features = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
            scores += (100 * (image_features * text_features).sum(dim=-1)).tolist()
    return scores


def summarise(per_image: list[dict], n_samples: int, seed: int) -> dict:
    """Flat metrics: mean score of each model and the paired fine-tuned minus base difference, with CIs."""
    by_model = {m: [r["clip_score"] for r in per_image if r["model"] == m] for m in MODELS}
    metrics = {}
    for model in MODELS:
        metrics |= mean_with_ci(by_model[model], n_samples, seed, f"clip_score_{model}")
    differences = list(np.subtract(by_model["finetuned"], by_model["base"]))
    return metrics | mean_with_ci(differences, n_samples, seed, "clip_score_diff")


def per_prompt(per_image: list[dict]) -> list[dict]:
    """Mean score per prompt and model, one row each (long format, so that DVC plots it as bars)."""
    prompts = dict.fromkeys(r["prompt"] for r in per_image)
    return [
        {"prompt": prompt, "model": model, "label": f"{model}: {prompt}",
         "clip_score": float(np.mean([r["clip_score"] for r in per_image if r["prompt"] == prompt and r["model"] == model]))}
        for prompt in prompts
        for model in MODELS
    ]


def run(clip_dir: Path, samples: Path, metrics_path: Path, detail: Path, p: dict, seed: int) -> dict:
    """Score all samples and write metrics and detail tables; return the metrics."""
    models.check_clip_folder(clip_dir)
    rows = read_samples(samples)
    all_rows = rows["base"] + rows["finetuned"]
    texts = [styled(r["prompt"], r["style_prompt"], p["style_to_clip"]) for r in all_rows]
    scores = clip_scores(clip_dir, all_rows, texts, p["batch_size"])
    per_image = [
        {"model": r["model"], "file_name": r["file_name"], "prompt": r["prompt"], "clip_text": text, "clip_score": s}
        for r, text, s in zip(all_rows, texts, scores)
    ]
    metrics = summarise(per_image, p["bootstrap_samples"], seed)
    with atomic_dir(detail) as tmp:
        write_csv(tmp / "per_image.csv", per_image, list(per_image[0]))
        prompt_rows = per_prompt(per_image)
        write_csv(tmp / "per_prompt.csv", prompt_rows, list(prompt_rows[0]))
    write_json(metrics_path, metrics)
    log.info("clip_eval: base %.2f, finetuned %.2f", metrics["clip_score_base"], metrics["clip_score_finetuned"])
    return metrics


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "clip_dir": "an open_clip local-dir folder (models/pretrained/clip)",
        "samples": "the folder holding base/ and finetuned/ samples (reports/samples)",
        "metrics": "the metrics JSON to write (reports/clip_eval.json)",
        "detail": "the folder for per-image and per-prompt tables (reports/clip_eval)",
    })
    run(args.clip_dir, args.samples, args.metrics, args.detail, load_params("clip_eval"), load_shared()["seed"])


if __name__ == "__main__":
    main()
