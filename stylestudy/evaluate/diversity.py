"""How varied a set of images is, on unit image embeddings: the Vendi score and the mean pairwise cosine distance.

Vendi score (Friedman and Dieng, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning", TMLR 2023):
exp of the Shannon entropy of the eigenvalues of K / n, K the cosine-similarity matrix of the n unit embeddings. It
is the effective number of distinct images: 1 when all are the same, n when they are orthogonal. It grows with n,
so sets are compared at equal n only. A bootstrap resample is the same set with each image weighted by how often it
was drawn (the weighted Vendi score of the paper: eigenvalues of D K D, D = diag(sqrt(weights))); a resample that
draws an image twice counts it as one more copy, so resampled values lie a little below the full set's.
The mean pairwise cosine distance is the mean of 1 - cos over pairs of distinct images; in a resample, over pairs of
draws of distinct images (as the unbiased MMD's within-set means).

A fine-tune that collapsed (every image the same few strokes) can move every distance toward the real images; its
diversity falls below the base model's and the real images'. `diversity_metrics` measures both differences.
"""
from __future__ import annotations

import logging

import numpy as np

from stylestudy.evaluate.statistics import bootstrap_p, flat, normalised, resample_counts, within_means

log = logging.getLogger(__name__)

MEASURES = ("vendi", "pairwise_distance")


def vendi_from_kernel(k: np.ndarray, weights: np.ndarray) -> float:
    """exp(entropy) of the eigenvalues of D K D, D = diag(sqrt(weights)), weights summing to 1."""
    root = np.sqrt(weights)
    eigenvalues = np.linalg.eigvalsh(root[:, None] * k * root[None, :]).clip(min=0)
    eigenvalues = eigenvalues[eigenvalues > 0]
    return float(np.exp(-(eigenvalues * np.log(eigenvalues)).sum()))


def vendi_score(embeddings: np.ndarray) -> float:
    """The Vendi score of a set of embeddings (cosine similarity of their unit vectors)."""
    unit = normalised(embeddings)
    return vendi_from_kernel(unit @ unit.T, np.full(len(unit), 1.0 / len(unit)))


def mean_pairwise_distance(embeddings: np.ndarray) -> float:
    """Mean of 1 - cos over the pairs of distinct rows."""
    unit = normalised(embeddings)
    return float(within_means(1.0 - unit @ unit.T, np.ones((1, len(unit))), unbiased=True)[0])


def _values(embeddings: np.ndarray, counts: np.ndarray) -> dict[str, tuple[float, np.ndarray]]:
    """Each measure's value on the whole set and on every resample given by counts (replicates x n)."""
    unit = normalised(embeddings)
    k = unit @ unit.T
    whole = np.ones((1, len(unit)))  # the set itself: every image drawn once
    vendi = [vendi_from_kernel(k, row / row.sum()) for row in (whole, *counts)]
    distance = within_means(1.0 - k, np.vstack([whole, counts]), unbiased=True)
    return {"vendi": (vendi[0], np.array(vendi[1:])), "pairwise_distance": (float(distance[0]), distance[1:])}


def equal_size(embeddings: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` rows of `embeddings` drawn without replacement (all of them, in order, when it has n)."""
    if len(embeddings) == n:
        return embeddings
    return embeddings[np.sort(rng.choice(len(embeddings), size=n, replace=False))]


def set_metrics(embeddings: np.ndarray, key: str, bootstrap_samples: int, seed: int) -> dict[str, float | int]:
    """Each measure of one set of images (a baseline's, a prompt's) with its 95% interval and n, named by the format
    string `key` (e.g. "diversity_{measure}_vd")."""
    counts = resample_counts(np.random.default_rng([seed, 3]), len(embeddings), bootstrap_samples)
    metrics: dict[str, float | int] = {}
    for measure, (value, replicates) in _values(embeddings, counts).items():
        metrics |= flat(key.format(measure=measure), value, replicates, len(embeddings))
    return metrics


def _difference(metrics: dict, name: str, a: tuple[float, np.ndarray], b: tuple[float, np.ndarray], n: int) -> None:
    """name (a - b) with its interval, n and bootstrap p, into metrics."""
    replicates = a[1] - b[1]
    metrics.update(flat(name, a[0] - b[0], replicates, n))
    metrics[f"{name}_p"] = bootstrap_p(replicates)


def diversity_metrics(base: np.ndarray, finetuned: np.ndarray, real: np.ndarray, *, bootstrap_samples: int,
                      seed: int) -> dict[str, float | int]:
    """Each measure of the base and fine-tuned images (paired resamples: their rows are the same prompts and seeds)
    and their difference (fine-tuned - base, `_diff`); of the real images and the fine-tuned ones at equal n
    (`_real`, `_real_diff`: fine-tuned - real), the larger set subsampled to the smaller one's size."""
    if base.shape != finetuned.shape:
        raise ValueError(f"base {base.shape} and finetuned {finetuned.shape} embeddings must be paired row by row")
    rng = np.random.default_rng([seed, 2])
    counts = resample_counts(rng, len(base), bootstrap_samples)
    paired = {model: _values(x, counts) for model, x in (("base", base), ("finetuned", finetuned))}
    n_equal = min(len(finetuned), len(real))
    if n_equal < len(real) or n_equal < len(finetuned):
        log.info("diversity against the real images at n=%d: %d generated and %d real images, the larger set "
                 "subsampled", n_equal, len(finetuned), len(real))
    equal_counts = resample_counts(rng, n_equal, bootstrap_samples), resample_counts(rng, n_equal, bootstrap_samples)
    tuned_at_n = _values(equal_size(finetuned, n_equal, rng), equal_counts[0])
    real_at_n = _values(equal_size(real, n_equal, rng), equal_counts[1])
    metrics: dict[str, float | int] = {}
    for measure in MEASURES:
        for model in ("base", "finetuned"):
            metrics |= flat(f"diversity_{measure}_{model}", *paired[model][measure], len(base))
        _difference(metrics, f"diversity_{measure}_diff", paired["finetuned"][measure], paired["base"][measure],
                    len(base))
        metrics |= flat(f"diversity_{measure}_real", *real_at_n[measure], n_equal)
        _difference(metrics, f"diversity_{measure}_real_diff", tuned_at_n[measure], real_at_n[measure], n_equal)
    return metrics
