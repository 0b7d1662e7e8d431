"""Statistics for the evaluation stages: KID and CMMD on embeddings, style similarity, bootstrap intervals, paired
tests; and over training replicates (runs): Student-t intervals and Welch's t test. numpy (Student's t: mpmath's
incomplete beta), deterministic given an explicit seed."""
from __future__ import annotations

import logging
import math

import numpy as np

logger = logging.getLogger(__name__)

MODELS = ("base", "finetuned")
METRICS = ("kid", "cmmd", "style_similarity")
CMMD_SCALE = 1000.0  # the google-research reference reports MMD² x 1000
_TAIL = 2.5  # percent in each tail of a 95% percentile interval
_CHUNK_ENTRIES = 1 << 20  # signs held at once (8 MB): bounds memory whatever n_permutations and n are


def _rows(x: np.ndarray) -> np.ndarray:
    """Embeddings as a float64 (samples, features) matrix."""
    rows = np.asarray(x, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"embeddings must be a (samples, features) matrix, got shape {rows.shape}")
    return rows


def normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    rows = _rows(x)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's cubic kernel (x·y / d + 1)^3 (Binkowski et al. 2018; torchmetrics `poly_kernel`)."""
    x, y = _rows(x), _rows(y)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def rbf_kernel(x: np.ndarray, y: np.ndarray, sigma: float = 10.0) -> np.ndarray:
    """Gaussian kernel exp(-||x-y||² / 2σ²) of CMMD (Jayasumana et al. 2024; google-research `cmmd/distance.py`)."""
    x, y = _rows(x), _rows(y)
    squared = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    # Rounding can leave tiny negative squared distances between near-identical rows.
    return np.exp(-np.maximum(squared, 0.0) / (2.0 * sigma**2))


def _within_mean(k: np.ndarray, unbiased: bool) -> float:
    """Mean kernel value within one set; the U-statistic leaves out each sample paired with itself."""
    m = k.shape[0]
    if not unbiased:
        return float(k.mean())
    if m < 2:
        raise ValueError("the unbiased MMD² needs at least 2 samples per set")
    return float((k.sum() - np.trace(k)) / (m * (m - 1)))


def mmd2(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray, unbiased: bool) -> float:
    """Squared MMD from kernel matrices: U-statistic if unbiased, else V-statistic (Gretton et al. 2012, eqs. 3, 5)."""
    return _within_mean(k_xx, unbiased) + _within_mean(k_yy, unbiased) - 2.0 * float(k_xy.mean())


def kid(x: np.ndarray, y: np.ndarray, subsets: int, subset_size: int, seed: int) -> float:
    """KID: mean unbiased cubic-kernel MMD² over random subsets of both sets (Binkowski et al. 2018; torchmetrics)."""
    x, y = _rows(x), _rows(y)
    if not 2 <= subset_size <= min(len(x), len(y)):
        raise ValueError(f"kid subset_size {subset_size} must be in [2, {min(len(x), len(y))}] (the smaller set)")
    rng = np.random.default_rng(seed)
    # One kernel over the full sets; every subset reads its block instead of recomputing products.
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    values = []
    for _ in range(subsets):
        i = rng.choice(len(x), subset_size, replace=False)
        j = rng.choice(len(y), subset_size, replace=False)
        values.append(mmd2(k_xx[np.ix_(i, i)], k_yy[np.ix_(j, j)], k_xy[np.ix_(i, j)], unbiased=True))
    return float(np.mean(values))


def cmmd(x: np.ndarray, y: np.ndarray) -> float:
    """CMMD: 1000 x biased RBF MMD² (σ=10) of L2-normalised embeddings (google-research `cmmd/distance.py`)."""
    x, y = normalised(x), normalised(y)
    return CMMD_SCALE * mmd2(rbf_kernel(x, x), rbf_kernel(y, y), rbf_kernel(x, y), unbiased=False)


def resample_counts(rng: np.random.Generator, n: int, replicates: int) -> np.ndarray:
    """(replicates, n) matrix: how often each of n samples is drawn in each bootstrap resample of size n."""
    draws = rng.integers(0, n, size=(replicates, n))
    # Offsetting each row's indices lets one bincount count all replicates at once.
    offsets = np.arange(replicates)[:, None] * n
    return np.bincount((draws + offsets).ravel(), minlength=replicates * n).reshape(replicates, n).astype(np.float64)


def within_means(k: np.ndarray, counts: np.ndarray, unbiased: bool) -> np.ndarray:
    """Within-set kernel mean of each resample given by counts; unbiased leaves out pairs of draws of one sample."""
    m = counts.sum(1)
    total = ((counts @ k) * counts).sum(1)
    if not unbiased:
        return total / m**2
    squares = counts**2
    pairs = m**2 - squares.sum(1)
    # A resample that drew a single sample m times has no distinct pairs: no value (nan) rather than a division by 0.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (total - squares @ np.diag(k)) / pairs, np.nan)


def bootstrap_mmd2(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray, counts_x: np.ndarray,
                   counts_y: np.ndarray, unbiased: bool) -> np.ndarray:
    """MMD² of each bootstrap resample from full-set kernels and draw counts, so no kernel is recomputed."""
    cross = ((counts_x @ k_xy) * counts_y).sum(1) / (counts_x.sum(1) * counts_y.sum(1))
    return within_means(k_xx, counts_x, unbiased) + within_means(k_yy, counts_y, unbiased) - 2.0 * cross


def _model_values(gen: np.ndarray, real: np.ndarray, gen_counts: np.ndarray, real_counts: np.ndarray,
                  kid_subsets: int, kid_subset_size: int, seed: int) -> dict[str, tuple[float, np.ndarray]]:
    """Point value and bootstrap replicates of each metric for one model's generated images."""
    poly = (polynomial_kernel(gen, gen), polynomial_kernel(real, real), polynomial_kernel(gen, real))
    gen_unit, real_unit = normalised(gen), normalised(real)
    rbf = (rbf_kernel(gen_unit, gen_unit), rbf_kernel(real_unit, real_unit), rbf_kernel(gen_unit, real_unit))
    centroid = real_unit.mean(0)
    style = 100.0 * gen_unit @ (centroid / np.linalg.norm(centroid))
    return {
        "kid": (kid(gen, real, kid_subsets, kid_subset_size, seed),
                bootstrap_mmd2(*poly, gen_counts, real_counts, unbiased=True)),
        "cmmd": (cmmd(gen, real), CMMD_SCALE * bootstrap_mmd2(*rbf, gen_counts, real_counts, unbiased=False)),
        "style_similarity": (float(style.mean()), gen_counts @ style / len(style)),
    }


def flat(name: str, value: float, replicates: np.ndarray, n: int) -> dict[str, float | int]:
    """Flat metrics for one value: name, name_ci_low, name_ci_high (95% percentile bootstrap), name_n."""
    low, high = np.nanpercentile(replicates, [_TAIL, 100.0 - _TAIL])
    return {name: float(value), f"{name}_ci_low": float(low), f"{name}_ci_high": float(high), f"{name}_n": n}


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from B bootstrap replicates of a difference: twice the smaller tail,
    (k + 1) / (B + 1) with k the replicates on that side of zero (so never 0: at least 2 / (B + 1)), capped at 1. It
    is the test the 95% percentile interval inverts: p < 0.05 when the interval excludes zero, up to granularity."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[~np.isnan(reps)]
    tail = min((reps <= 0).sum(), (reps >= 0).sum())
    return float(min(1.0, 2.0 * (tail + 1) / (len(reps) + 1)))


def _resamples(n: int, n_real: int, bootstrap_samples: int, kid_subset_size: int,
               seed: int) -> tuple[int, np.ndarray, np.ndarray]:
    """KID's subset size (clamped to both sets) and the bootstrap draw counts of generated and real rows."""
    subset_size = min(kid_subset_size, n, n_real)
    if subset_size < kid_subset_size:
        logger.info("kid_subset_size %d clamped to %d (%d generated, %d real)", kid_subset_size, subset_size, n, n_real)
    # One set of resamples for every metric and every model: the diff replicates are then paired by construction.
    # The stream differs from kid's subset draws (seed alone), which all models share so kid_diff is paired too.
    rng = np.random.default_rng([seed, 1])
    return subset_size, resample_counts(rng, n, bootstrap_samples), resample_counts(rng, n_real, bootstrap_samples)


def single_distance_metrics(generated: np.ndarray, real: np.ndarray, name: str, *, bootstrap_samples: int,
                            kid_subsets: int, kid_subset_size: int, seed: int) -> dict[str, float | int]:
    """KID, CMMD and style similarity of one more model (a baseline: <metric>_<name>) against the real sketches, with
    the resamples and KID subsets distance_metrics gives the pair when it has as many images."""
    generated, real = _rows(generated), _rows(real)
    subset_size, gen_counts, real_counts = _resamples(len(generated), len(real), bootstrap_samples, kid_subset_size,
                                                      seed)
    values = _model_values(generated, real, gen_counts, real_counts, kid_subsets, subset_size, seed)
    metrics: dict[str, float | int] = {}
    for metric in METRICS:
        metrics.update(flat(f"{metric}_{name}", *values[metric], len(generated)))
    return metrics


def distance_metrics(base: np.ndarray, finetuned: np.ndarray, real: np.ndarray, *, bootstrap_samples: int,
                     kid_subsets: int, kid_subset_size: int, seed: int) -> dict[str, float | int]:
    """KID, CMMD and style similarity of both models against real sketches, their paired differences and 95% CIs."""
    base, finetuned, real = _rows(base), _rows(finetuned), _rows(real)
    if base.shape != finetuned.shape:
        raise ValueError(f"base {base.shape} and finetuned {finetuned.shape} embeddings must be paired row by row")
    n, n_real = len(base), len(real)
    subset_size, gen_counts, real_counts = _resamples(n, n_real, bootstrap_samples, kid_subset_size, seed)
    values = {model: _model_values(gen, real, gen_counts, real_counts, kid_subsets, subset_size, seed)
              for model, gen in zip(MODELS, (base, finetuned))}
    metrics: dict[str, float | int] = {}
    for metric in METRICS:
        for model in MODELS:
            metrics.update(flat(f"{metric}_{model}", *values[model][metric], n))
        (base_value, base_reps), (tuned_value, tuned_reps) = values["base"][metric], values["finetuned"][metric]
        metrics.update(flat(f"{metric}_diff", tuned_value - base_value, tuned_reps - base_reps, n))
        metrics[f"{metric}_diff_p"] = bootstrap_p(tuned_reps - base_reps)
    metrics["n_real_sketches"] = n_real
    metrics["kid_subset_size"] = subset_size
    return metrics


def _sign_flip_count(differences: np.ndarray, signs: np.ndarray, observed: float, tolerance: float) -> int:
    """How many sign patterns (rows of ±1) give a |sum| at least the observed one."""
    return int((np.abs(signs @ differences) >= observed - tolerance).sum())


def sign_flip_p(differences: np.ndarray, n_permutations: int, seed: int) -> float:
    """Two-sided paired sign-flip p-value for mean ≠ 0: exact if 2^n <= n_permutations, else Monte Carlo with +1."""
    d = np.asarray(differences, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    if not d.any():
        return 1.0
    # Sums rank patterns exactly as means do (n is fixed); the tolerance keeps float ties such as ±a±b = ±c counted.
    observed, tolerance = abs(d.sum()), 1e-12 * np.abs(d).sum()
    bits, chunk = np.arange(d.size), max(1, _CHUNK_ENTRIES // d.size)
    if d.size < 63 and 2**d.size <= n_permutations:
        count = 0
        for start in range(0, 2**d.size, chunk):
            patterns = np.arange(start, min(start + chunk, 2**d.size))[:, None]
            count += _sign_flip_count(d, ((patterns >> bits) & 1) * 2.0 - 1.0, observed, tolerance)
        return count / 2**d.size
    rng = np.random.default_rng(seed)
    count = 0
    for start in range(0, n_permutations, chunk):
        signs = rng.choice([-1.0, 1.0], size=(min(chunk, n_permutations - start), d.size))
        count += _sign_flip_count(d, signs, observed, tolerance)
    return (1 + count) / (1 + n_permutations)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927); (0, 1) when there are no trials."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    shrink = 1.0 + z**2 / n
    centre = (p + z**2 / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Exact McNemar test: two-sided binomial p of the discordant counts b, c under p = 1/2 (McNemar 1947)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


# ------------------------------------------------------------------- over training replicates (runs, not images)

def student_t_p(t: float, df: float) -> float:
    """Two-sided P(|T| >= |t|) under Student's t with df degrees of freedom: I_{df/(df+t²)}(df/2, 1/2)."""
    import mpmath  # torch's own dependency (through sympy); imported here, as numpy has no incomplete beta

    if math.isinf(t):
        return 0.0
    return float(mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True))


def student_t_quantile(q: float, df: float) -> float:
    """The q quantile (0.5 < q < 1) of Student's t: the root of the two-sided tail = 2 (1 - q), by bisection."""
    target, low, high = 2 * (1 - q), 0.0, 1.0
    while student_t_p(high, df) > target:
        low, high = high, 2 * high
    for _ in range(100):  # the bracket halves each time: 2^-100 of it is far below float resolution
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_p(middle, df) > target else (low, middle)
    return (low + high) / 2


def t_interval(values: list[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval of the mean over independent runs: mean ± t_{n-1} s / sqrt(n); NaN bounds below 2."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = student_t_quantile(0.5 + confidence / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def welch_t_test(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> tuple[float, float, float]:
    """Welch's unequal-variance t test of mean(a) = mean(b) (Welch 1947): t, Welch-Satterthwaite df, two-sided p."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if min(a.size, b.size) < 2:
        raise ValueError(f"Welch's t needs at least 2 runs per setting, got {a.size} and {b.size}")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff = float(a.mean() - b.mean())
    if va + vb == 0:  # every run of both settings gave the same value: the test says equal or certainly not
        return (0.0 if diff == 0 else math.copysign(math.inf, diff)), math.nan, float(diff == 0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    return t, float(df), student_t_p(t, df)
