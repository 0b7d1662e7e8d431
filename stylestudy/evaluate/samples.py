"""What generation and scoring share: the text of a prompt, the seed of each image, bootstrap confidence intervals."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stylestudy.data import dataset
from stylestudy.core.config import UserError, require_path

MODELS = ("base", "finetuned")
# Generators beside the pair, never fine-tuned: scored when their folder holds images, with keys of their own (*_vd).
BASELINES = ("vd",)
# The prompt sets of generate's manifest and the prefix of their metric keys: the study's keys keep meaning its prompts.
SET_PREFIXES = {"study": "", "test": "test_"}


def styled(prompt: str, style_prompt: str, apply: bool) -> str:
    """The prompt with the style pre-prompt in front ("A black and white sketch of" + " " + prompt) when asked."""
    return f"{style_prompt} {prompt}" if apply else prompt


def image_seed(seed: int, prompt_index: int, image_index: int, images_per_prompt: int) -> int:
    """One seed per image (seed + its index), so any image can be regenerated alone and pairs match across models."""
    return seed + prompt_index * images_per_prompt + image_index


def bootstrap_ci(values: list[float], n_samples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    values_array = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    resampled = rng.choice(values_array, size=(n_samples, len(values_array)), replace=True).mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return float(low), float(high)


def mean_with_ci(values: list[float], n_samples: int, seed: int, name: str) -> dict[str, float | int]:
    """Flat metrics for one mean: name, name_ci_low, name_ci_high, name_n."""
    low, high = bootstrap_ci(values, n_samples, seed)
    return {name: float(np.mean(values)), f"{name}_ci_low": low, f"{name}_ci_high": high, f"{name}_n": len(values)}


def read_samples(samples: Path) -> dict[str, list[dict]]:
    """The manifest rows of each model's samples, with the image path added: base and finetuned, then each baseline
    whose folder holds images (an absent folder or an empty manifest, a baseline switched off, is left out)."""
    rows = {}
    for model in MODELS + BASELINES:
        folder = samples / model
        if model in BASELINES and not (folder / "manifest.jsonl").is_file():
            continue
        manifest = require_path(folder / "manifest.jsonl", f"run `dvc repro generate@{model}` first")
        rows[model] = [row | {"path": folder / row["file_name"]} for row in dataset.read_jsonl(manifest)]
    rows = {model: model_rows for model, model_rows in rows.items() if model in MODELS or model_rows}
    pairs = {m: [(r["set"], r["prompt_index"], r["image_index"], r["seed"]) for r in rows[m]] for m in rows}
    for model in rows:
        if pairs[model] != pairs["base"]:
            raise UserError(f"{samples}: base and {model} samples differ in prompts, seeds or counts; rerun generate")
    return rows


def of_set(rows: list[dict], name: str) -> list[dict]:
    """The rows of one prompt set (study or test), in manifest order."""
    return [r for r in rows if r["set"] == name]
