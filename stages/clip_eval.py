"""clip_eval: CLIP cosine similarity (x100) between every generated image and its prompt, base against fine-tuned,
and how far each model's images lie from the held-out real sketches.

Reads CLIP_DIR (open_clip local-dir folder), CSD_DIR (the CSD style embedder), SAMPLES_DIR/{base,finetuned}/ (PNGs +
manifest.jsonl), REAL_DIR (the real sketches' CLIP and CSD embeddings from embed_real) and params `clip_eval`,
`shared`. Whether CLIP's text gets the style
pre-prompt is `clip_eval.style_to_clip`.
Writes METRICS (flat): per prompt set (the study's 5 prompts: clip_score_*; the held-out test captions: test_clip_*)
the mean score of each model and their paired difference, each with a 95% bootstrap CI and n, and the difference's
sign-flip permutation p-value; per model the distance to the real sketches on CLIP image embeddings (kid_*, cmmd_*,
style_similarity_*, with CIs and the fine-tuned minus base difference); how varied each model's images are
(diversity_vendi_*, diversity_pairwise_distance_*: fine-tuned minus base, and fine-tuned against the real images at
equal n; docs/evaluation.md "Diversity"); the same distances in CSD's style space (kid_csd_*, cmmd_csd_*,
style_similarity_csd_*). A baseline generator whose samples folder holds images (SAMPLES_DIR/vd/:
Versatile Diffusion, when fetch.vd.enabled) adds its own keys (clip_score_vd, test_clip_score_vd, kid_vd, cmmd_vd,
style_similarity_vd, diversity_*_vd, with CIs and n); its empty folder adds none.
DETAIL_DIR gets per_image.csv, per_prompt.csv and diversity_per_prompt.csv (study set), and scorer.json (which CLIP
produced the numbers, and the sample sizes).
Embeds and scores in batches on the GPU in fp16 when there is one, in fp32 on a CPU.

Run: python -m stages.clip_eval CLIP_DIR CSD_DIR SAMPLES_DIR REAL_DIR METRICS DETAIL_DIR (params.yaml validated first)
Example: python -m stages.clip_eval models/pretrained/clip models/pretrained/csd reports/samples data/real_embeddings
         reports/clip_eval.json reports/clip_eval
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from stylestudy.evaluate import diversity, embeddings, statistics
from stylestudy.models import csd, loading
from stylestudy.core.config import cli, load_params, load_shared, parse_args
from stylestudy.evaluate.samples import MODELS, SET_PREFIXES, bootstrap_ci, mean_with_ci, of_set, read_samples, styled
from stylestudy.core.outputs import atomic_dir, write_csv, write_json

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


def score_images(model: Any, preprocess: Callable, tokenizer: Callable, images: list[Path | Image.Image],
                 texts: list[str], batch_size: int) -> list[float]:
    """100 x cosine similarity between each image (a file or in memory) and its text, batched on the model's device."""
    image_features = embeddings.embed_images(model, preprocess, images, batch_size)
    return cosine_x100(image_features, embeddings.embed_texts(model, tokenizer, texts, batch_size))


def cosine_x100(image_features: np.ndarray, text_features: np.ndarray) -> list[float]:
    """Row by row 100 x cosine of normalised embeddings, in float64."""
    return (100 * (image_features.astype(np.float64) * text_features.astype(np.float64)).sum(axis=1)).tolist()


def paired_summary(per_image: list[dict], p: dict, seed: int, prefix: str) -> dict:
    """Flat metrics of one prompt set: each model's mean score and the paired fine-tuned minus base difference,
    with CIs, n and the difference's sign-flip p-value."""
    by_model = {m: [r["clip_score"] for r in per_image if r["model"] == m] for m in MODELS}
    name = f"{prefix}clip_score"
    metrics = {}
    for model in MODELS:
        metrics |= mean_with_ci(by_model[model], p["bootstrap_samples"], seed, f"{name}_{model}")
    differences = list(np.subtract(by_model["finetuned"], by_model["base"]))
    metrics |= mean_with_ci(differences, p["bootstrap_samples"], seed, f"{name}_diff")
    return metrics | {f"{name}_diff_p": statistics.sign_flip_p(differences, p["permutation_samples"], seed)}


def baseline_summary(per_image: list[dict], p: dict, seed: int, prefix: str) -> dict:
    """Flat metrics of one prompt set for each baseline present: its mean score with CI and n (no difference: it is
    no fine-tune of the base)."""
    metrics = {}
    for model in dict.fromkeys(r["model"] for r in per_image if r["model"] not in MODELS):
        scores = [r["clip_score"] for r in per_image if r["model"] == model]
        metrics |= mean_with_ci(scores, p["bootstrap_samples"], seed, f"{prefix}clip_score_{model}")
    return metrics


def per_prompt(per_image: list[dict], n_samples: int, seed: int) -> list[dict]:
    """Mean score per prompt and model with its 95% CI, one row each (long format: one bar each in a chart)."""
    prompts = dict.fromkeys(r["prompt"] for r in per_image)
    rows = []
    for prompt in prompts:
        for model in dict.fromkeys(r["model"] for r in per_image):
            scores = [r["clip_score"] for r in per_image if r["prompt"] == prompt and r["model"] == model]
            low, high = bootstrap_ci(scores, n_samples, seed)
            rows.append({"prompt": prompt, "model": model, "label": f"{model}: {prompt}",
                         "clip_score": float(np.mean(scores)), "ci_low": low, "ci_high": high, "n": len(scores)})
    return rows


def distances(image_features: dict[str, np.ndarray], real: np.ndarray, p: dict, seed: int) -> dict:
    """KID, CMMD and style similarity of each model's images to the real sketches (baselines' too); none (a recorded
    skip) when either side has fewer than the 2 images an unbiased MMD needs."""
    if min(len(real), len(image_features["base"])) < 2:
        log.warning("clip_eval: %d real test sketches and %d images per model: kid, cmmd and style_similarity need "
                    "2 of each and are skipped", len(real), len(image_features["base"]))
        return {"n_real_sketches": len(real)}
    metrics = distance_metrics(image_features, real, p, seed)
    metrics |= diversity.diversity_metrics(image_features["base"], image_features["finetuned"], real,
                                           bootstrap_samples=p["bootstrap_samples"], seed=seed)
    for model in (m for m in image_features if m not in MODELS):
        key = f"diversity_{{measure}}_{model}"
        metrics |= diversity.set_metrics(image_features[model], key, p["bootstrap_samples"], seed)
    return metrics


def distance_metrics(image_features: dict[str, np.ndarray], real: np.ndarray, p: dict, seed: int) -> dict:
    """KID, CMMD and style similarity of the pair (and their differences) and of each baseline."""
    settings = {"bootstrap_samples": p["bootstrap_samples"], "kid_subsets": p["kid_subsets"],
                "kid_subset_size": p["kid_subset_size"], "seed": seed}
    metrics = statistics.distance_metrics(image_features["base"], image_features["finetuned"], real, **settings)
    for model in (m for m in image_features if m not in MODELS):
        metrics |= statistics.single_distance_metrics(image_features[model], real, model, **settings)
    return metrics


def csd_distances(style_features: dict[str, np.ndarray], real: np.ndarray, p: dict, seed: int) -> dict:
    """The distances measured in CSD's style space instead of CLIP's: <metric>_csd_<model> (kid_csd_diff, ...),
    with the same intervals and p-values; none where CLIP's are skipped."""
    if min(len(real), len(style_features["base"])) < 2:
        return {}
    measured = distance_metrics(style_features, real, p, seed)
    metrics = {}
    for key, value in measured.items():
        metric = next((m for m in statistics.METRICS if key.startswith(f"{m}_")), None)
        if metric is not None and key != "kid_subset_size":  # it and n_real_sketches are CLIP's already
            metrics[f"{metric}_csd_{key[len(metric) + 1:]}"] = value
    return metrics


def diversity_per_prompt(per_image: list[dict], image_features: np.ndarray, n_samples: int, seed: int) -> list[dict]:
    """Each model's diversity among the images of each prompt (those with several), with 95% intervals."""
    rows = []
    for prompt in dict.fromkeys(r["prompt"] for r in per_image):
        for model in dict.fromkeys(r["model"] for r in per_image):
            index = [i for i, r in enumerate(per_image) if r["prompt"] == prompt and r["model"] == model]
            if len(index) > 1:
                rows.append({"prompt": prompt, "model": model}
                            | diversity.set_metrics(image_features[index], "{measure}", n_samples, seed))
    return rows


def embed_samples(clip_dir: Path, rows: list[dict], texts: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and text embeddings of every sample, on the GPU in fp16 when there is one."""
    import torch

    device, dtype = loading.inference_device()
    model, preprocess, tokenizer = loading.load_clip(clip_dir, device, half=dtype == torch.float16)
    return (embeddings.embed_images(model, preprocess, [r["path"] for r in rows], batch_size),
            embeddings.embed_texts(model, tokenizer, texts, batch_size))


def style_embeddings(csd_dir: Path, rows: list[dict], batch_size: int) -> np.ndarray:
    """CSD style embeddings of every sample, on the inference device."""
    device, dtype = loading.inference_device()
    model, preprocess = csd.load(csd_dir, device, dtype)
    return embeddings.embed_images(model, preprocess, [r["path"] for r in rows], batch_size, "csd images")


def write_details(detail: Path, per_image: list[dict], image_features: np.ndarray, scorer: dict, p: dict,
                  seed: int) -> None:
    """Per image, per prompt (score, diversity) and which models scored, into `detail`, whole or not at all."""
    with atomic_dir(detail) as tmp:
        write_csv(tmp / "per_image.csv", per_image, list(per_image[0]))
        prompt_rows = per_prompt(of_set(per_image, "study"), p["bootstrap_samples"], seed)
        write_csv(tmp / "per_prompt.csv", prompt_rows, list(prompt_rows[0]))
        study = [i for i, r in enumerate(per_image) if r["set"] == "study"]
        spread = diversity_per_prompt([per_image[i] for i in study], image_features[study], p["bootstrap_samples"],
                                      seed)
        if spread:
            write_csv(tmp / "diversity_per_prompt.csv", spread, list(spread[0]))
        write_json(tmp / "scorer.json", scorer)


def run(clip_dir: Path, csd_dir: Path, samples: Path, real_dir: Path, metrics_path: Path, detail: Path, p: dict,
        seed: int) -> dict:
    """Score all samples with CLIP (and their style with CSD) and write metrics and detail tables; return the
    metrics."""
    loading.check_clip_folder(clip_dir)
    clip, style = embeddings.describe_clip(clip_dir), embeddings.describe_csd(csd_dir)
    real = embeddings.load_real(real_dir, clip)
    real_style = embeddings.load_real(real_dir, style, embeddings.CSD_KEY)
    rows = read_samples(samples)
    all_rows = [row for model_rows in rows.values() for row in model_rows]
    texts = [styled(r["prompt"], r["style_prompt"], p["style_to_clip"]) for r in all_rows]
    image_features, text_features = embed_samples(clip_dir, all_rows, texts, p["batch_size"])
    per_image = [
        {"set": r["set"], "model": r["model"], "file_name": r["file_name"], "prompt": r["prompt"], "clip_text": text,
         "clip_score": score}
        for r, text, score in zip(all_rows, texts, cosine_x100(image_features, text_features))
    ]
    metrics = {}
    for name, prefix in SET_PREFIXES.items():
        if of_set(per_image, name):
            metrics |= paired_summary(of_set(per_image, name), p, seed, prefix)
            metrics |= baseline_summary(of_set(per_image, name), p, seed, prefix)
    n_base = len(rows["base"])

    def by_model(features: np.ndarray) -> dict[str, np.ndarray]:
        return {model: features[k * n_base:(k + 1) * n_base] for k, model in enumerate(rows)}

    metrics |= distances(by_model(image_features), real, p, seed)
    metrics |= csd_distances(by_model(style_embeddings(csd_dir, all_rows, p["batch_size"])), real_style, p, seed)
    write_details(detail, per_image, image_features, {"clip": clip, "csd": style, "images_per_model": n_base,
                                                      "n_real_sketches": len(real)}, p, seed)
    write_json(metrics_path, metrics)
    log.info("clip_eval: base %.2f, finetuned %.2f", metrics["clip_score_base"], metrics["clip_score_finetuned"])
    return metrics


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "clip_dir": "an open_clip local-dir folder (models/pretrained/clip)",
        "csd_dir": "the CSD style embedder's folder (models/pretrained/csd)",
        "samples": "the folder holding base/ and finetuned/ samples (reports/samples)",
        "real": "the real test sketches' embeddings from embed_real (data/real_embeddings)",
        "metrics": "the metrics JSON to write (reports/clip_eval.json)",
        "detail": "the folder for per-image and per-prompt tables (reports/clip_eval)",
    })
    run(args.clip_dir, args.csd_dir, args.samples, args.real, args.metrics, args.detail, load_params("clip_eval"),
        load_shared()["seed"])


if __name__ == "__main__":
    main()
