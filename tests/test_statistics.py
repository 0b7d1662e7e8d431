"""KID, CMMD, style similarity, the index-count bootstrap and the paired tests of stylestudy/evaluate/statistics.py."""
import logging

import numpy as np
import pytest

from stylestudy.evaluate.statistics import (bootstrap_mmd2, bootstrap_p, cmmd, distance_metrics, kid, mcnemar_exact_p, mmd2,
                                             polynomial_kernel, resample_counts, sign_flip_p, student_t_p,
                                             student_t_quantile, t_interval, welch_t_test, wilson_interval)

SETTINGS = {"bootstrap_samples": 1000, "kid_subsets": 20, "kid_subset_size": 100, "seed": 0}


def _gaussian(n: int, seed: int, shift: float = 0.0, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, dim))


def _torchmetrics_kid(real: np.ndarray, fake: np.ndarray, subsets: int, subset_size: int) -> tuple[float, float]:
    """torchmetrics' KID on ready-made features: a custom `feature` module is called on update's input as is
    (`normalize` and the uint8 conversion apply only to its own Inception), so an identity passes (N, D) float64."""
    import torch
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    metric = KernelInceptionDistance(feature=Identity(), subsets=subsets, subset_size=subset_size)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    mean, std = metric.compute()
    return float(mean), float(std)


@pytest.mark.usefixtures("one_thread")
def test_kid_equals_torchmetrics_when_every_subset_is_the_whole_set():
    real, fake = _gaussian(40, 1), _gaussian(40, 2, shift=0.3)
    reference, _ = _torchmetrics_kid(real, fake, subsets=3, subset_size=40)
    assert reference > 0.01  # a real distance, so the relative comparison means something
    assert kid(fake, real, subsets=3, subset_size=40, seed=0) == pytest.approx(reference, rel=1e-6)


@pytest.mark.usefixtures("one_thread")
def test_kid_on_subsets_agrees_with_torchmetrics_within_monte_carlo_error():
    # With subsets smaller than the sets both draw different random subsets, so only the means can agree: each is
    # the average of `subsets` independent subset MMD²s, with standard error std / sqrt(subsets). This still checks
    # the subset draw (without replacement, both sets independently): drawing with replacement would count
    # duplicated pairs, whose cubic kernel values on the diagonal are far larger than the off-diagonal ones.
    real, fake = _gaussian(120, 3, dim=8), _gaussian(80, 4, shift=0.3, dim=8)
    subsets, size = 400, 30
    import torch

    torch.manual_seed(0)
    reference, std = _torchmetrics_kid(real, fake, subsets=subsets, subset_size=size)
    ours = kid(fake, real, subsets=subsets, subset_size=size, seed=0)
    assert abs(ours - reference) < 4 * np.sqrt(2) * std / np.sqrt(subsets)


def test_kid_refuses_subsets_larger_than_a_set():
    with pytest.raises(ValueError, match="subset_size"):
        kid(_gaussian(10, 0), _gaussian(20, 1), subsets=2, subset_size=11, seed=0)


def test_mmd2_by_hand():
    k_xx = np.array([[9.0, 1.0, 2.0], [1.0, 9.0, 3.0], [2.0, 3.0, 9.0]])
    k_yy = np.array([[5.0, 4.0], [4.0, 5.0]])
    k_xy = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    # unbiased: off-diagonal means 12/6 = 2 and 8/2 = 4, cross mean 21/6 = 3.5 -> 2 + 4 - 7
    assert mmd2(k_xx, k_yy, k_xy, unbiased=True) == pytest.approx(-1.0, abs=1e-12)
    # biased: all-entry means 39/9 and 18/4 -> 39/9 + 4.5 - 7
    assert mmd2(k_xx, k_yy, k_xy, unbiased=False) == pytest.approx(39 / 9 - 2.5, abs=1e-12)


def test_biased_distances_of_identical_sets_are_exactly_zero():
    x = _gaussian(50, 5)
    k = polynomial_kernel(x, x)
    assert mmd2(k, k, polynomial_kernel(x, x.copy()), unbiased=False) == 0.0
    assert cmmd(x, x.copy()) == 0.0
    # the unbiased form leaves out the diagonal, so it is negative here: the two forms really differ
    assert mmd2(k, k, k, unbiased=True) < 0.0


def test_index_count_bootstrap_equals_the_explicit_resample():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(9, 5)), rng.normal(0.4, 1.0, size=(7, 5))
    ix = np.array([0, 0, 0, 3, 3, 5, 6, 8, 8])  # duplicates on purpose: they are what the two forms treat apart
    iy = np.array([1, 1, 2, 4, 4, 4, 6])
    counts_x = np.bincount(ix, minlength=9)[None, :].astype(float)
    counts_y = np.bincount(iy, minlength=7)[None, :].astype(float)
    kernels = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    rx, ry = x[ix], y[iy]
    cross = polynomial_kernel(rx, ry).mean()

    def distinct_mean(k: np.ndarray, idx: np.ndarray) -> float:
        return k[idx[:, None] != idx[None, :]].mean()

    slow_unbiased = distinct_mean(polynomial_kernel(rx, rx), ix) + distinct_mean(polynomial_kernel(ry, ry), iy)
    slow_biased = polynomial_kernel(rx, rx).mean() + polynomial_kernel(ry, ry).mean()
    fast_unbiased = bootstrap_mmd2(*kernels, counts_x, counts_y, unbiased=True)
    fast_biased = bootstrap_mmd2(*kernels, counts_x, counts_y, unbiased=False)
    assert fast_unbiased[0] == pytest.approx(slow_unbiased - 2 * cross, abs=1e-10)
    assert fast_biased[0] == pytest.approx(slow_biased - 2 * cross, abs=1e-10)
    assert abs(fast_unbiased[0] - fast_biased[0]) > 1e-3


def test_resample_counts_are_bootstrap_draws():
    counts = resample_counts(np.random.default_rng(0), 50, 400)
    assert counts.shape == (400, 50) and np.all(counts.sum(1) == 50)
    # each sample is drawn Binomial(50, 1/50) times: mean 1, variance 0.98
    assert counts.mean() == pytest.approx(1.0) and counts.var() == pytest.approx(0.98, rel=0.05)
    assert np.array_equal(counts, resample_counts(np.random.default_rng(0), 50, 400))


def test_same_distribution_is_near_zero_and_a_shift_is_clearly_far():
    real, same, shifted = _gaussian(200, 10), _gaussian(200, 11), _gaussian(200, 12, shift=0.5)
    m = distance_metrics(same, shifted, real, **SETTINGS)
    assert m["kid_base_ci_low"] < 0.0 < m["kid_base_ci_high"]
    assert abs(m["kid_base"]) < 0.1 * m["kid_finetuned"]
    assert m["kid_finetuned_ci_low"] > m["kid_base_ci_high"]
    assert m["cmmd_finetuned_ci_low"] > m["cmmd_base_ci_high"]
    assert m["cmmd_base"] < 0.2 * m["cmmd_finetuned"]
    assert m["kid_diff_ci_low"] > 0.0 and m["cmmd_diff_ci_low"] > 0.0
    assert m["kid_diff_p"] < 0.05 and m["cmmd_diff_p"] < 0.05


def test_distance_metrics_keys_diffs_and_clamped_subset(caplog):
    base, real = _gaussian(30, 20), _gaussian(45, 21)
    tuned = base + np.random.default_rng(22).normal(0.0, 0.3, size=base.shape)
    caplog.set_level(logging.INFO, logger="stylestudy.evaluate.statistics")
    m = distance_metrics(base, tuned, real, **{**SETTINGS, "kid_subset_size": 1000})
    expected = {f"{metric}_{model}{suffix}" for metric in ("kid", "cmmd", "style_similarity")
                for model in ("base", "finetuned", "diff") for suffix in ("", "_ci_low", "_ci_high", "_n")}
    p_values = {f"{metric}_diff_p" for metric in ("kid", "cmmd", "style_similarity")}
    assert set(m) == expected | p_values | {"n_real_sketches", "kid_subset_size"}
    assert m["kid_subset_size"] == 30 and m["n_real_sketches"] == 45 and m["kid_diff_n"] == 30
    assert "clamped to 30" in caplog.text
    for metric in ("kid", "cmmd", "style_similarity"):
        assert m[f"{metric}_diff"] == m[f"{metric}_finetuned"] - m[f"{metric}_base"]
        for model in ("base", "finetuned", "diff"):
            assert m[f"{metric}_{model}_ci_low"] <= m[f"{metric}_{model}_ci_high"]
    assert m == distance_metrics(base, tuned, real, **{**SETTINGS, "kid_subset_size": 1000})


def test_identical_models_have_a_diff_of_exactly_zero():
    base, real = _gaussian(25, 30), _gaussian(35, 31)
    m = distance_metrics(base, base.copy(), real, **SETTINGS)
    for metric in ("kid", "cmmd", "style_similarity"):
        assert (m[f"{metric}_diff"], m[f"{metric}_diff_ci_low"], m[f"{metric}_diff_ci_high"]) == (0.0, 0.0, 0.0)
        assert m[f"{metric}_base_ci_low"] < m[f"{metric}_base_ci_high"]


def test_style_similarity_is_the_cosine_to_the_real_centroid():
    real = np.array([[1.0, 0.0], [0.0, 2.0]])  # unit rows (1, 0), (0, 1): centroid direction (1, 1) / sqrt 2
    gen = np.array([[3.0, 3.0], [0.0, 5.0], [1.0, 1.0], [-1.0, 0.0]])
    m = distance_metrics(gen, gen, real, **{**SETTINGS, "kid_subset_size": 2})
    assert m["style_similarity_base"] == pytest.approx(100 * (1 + 1 / np.sqrt(2) + 1 - 1 / np.sqrt(2)) / 4)


def test_sign_flip_exact_cases():
    assert sign_flip_p([1.0, 2.0, 3.0], n_permutations=8, seed=0) == 0.25  # |sum| >= 6 only for +++ and ---
    assert sign_flip_p([1.0, -1.0], n_permutations=100, seed=0) == 1.0
    assert sign_flip_p([0.0, 0.0, 0.0], n_permutations=100, seed=0) == 1.0
    # Exact rationals give 4 of 16 patterns; a bare >= on floats counts none, not even the observed pattern
    # (its matrix-product sum and d.sum() differ in the last bit).
    assert sign_flip_p([-0.8, -0.4, 0.0, -0.1], n_permutations=100, seed=0) == 0.25


def test_sign_flip_monte_carlo():
    d = np.random.default_rng(40).normal(0.5, 1.0, size=60)
    p = sign_flip_p(d, n_permutations=2000, seed=1)
    assert 1 / 2001 <= p < 0.01
    assert p == sign_flip_p(d, n_permutations=2000, seed=1)
    noise = np.random.default_rng(41).normal(0.0, 1.0, size=60)
    p_noise = sign_flip_p(noise, n_permutations=2000, seed=1)
    assert p_noise > 0.05 and p_noise == sign_flip_p(noise, n_permutations=2000, seed=1)
    assert p_noise != sign_flip_p(noise, n_permutations=2000, seed=2)  # the seed drives the draws


def test_wilson_interval_by_hand():
    # Wilson: centre = (p + z²/2n) / (1 + z²/n), half = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²), z² = 3.8415.
    # 0/10: centre = 0.19207 / 1.38415 = 0.13877 = half -> (0, 0.27753)
    # 5/10: centre 0.5, half = 1.41600 * sqrt(0.025 + 0.0096036) = 0.26341 -> (0.23659, 0.76341)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-3)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-3)
    assert wilson_interval(10, 10) == pytest.approx((1 - 0.27753, 1.0), abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact_p(1, 6) == pytest.approx(2 * (1 + 7) / 128)
    assert mcnemar_exact_p(6, 1) == pytest.approx(0.125)
    assert mcnemar_exact_p(4, 4) == 1.0
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)


# ------------------------------------------------------------------------ replicates: Student's t over runs

def test_student_t_against_closed_forms_and_sympy():
    """df = 1 is Cauchy (quantile tan(pi (q - 1/2))), df = 2 has tail 1 - |t| / sqrt(2 + t²), the table's
    t_{0.975, 2} = 4.302653, the normal limit 1.959964; a non-integer df against sympy's own Student t."""
    import math

    import sympy
    import sympy.stats

    assert student_t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert student_t_quantile(0.975, 2) == pytest.approx(4.302652729911275, rel=1e-9)
    assert student_t_quantile(0.975, 1e7) == pytest.approx(1.959963984540054, rel=1e-6)
    for t in (0.3, 1.0, 2.5, 9.0):
        assert student_t_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10)
        assert student_t_p(-t, 2) == student_t_p(t, 2)
    variable = sympy.stats.StudentT("T", sympy.Rational(37, 10))
    assert student_t_p(2.5, 3.7) == pytest.approx(float(2 * (1 - sympy.stats.cdf(variable)(sympy.Float(2.5)))),
                                                  rel=1e-9)


def test_t_interval_by_hand():
    """[1, 2, 3]: mean 2, s = 1, half-width t_{0.975, 2} / sqrt(3); one run has no interval."""
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / 3**0.5
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-9)
    assert np.isnan(t_interval([5.0])[1:]).all()


def test_welch_t_by_hand_and_its_size_under_the_null():
    """[0, 2] vs [3, 5]: t = -3 / sqrt(2), df = 2 (equal n and variances: 2 (n - 1)), p from the df = 2 closed form;
    unequal sizes and spreads: df by Welch-Satterthwaite; under equal means about 5% of p values fall below 0.05."""
    t, df, p = welch_t_test([0.0, 2.0], [3.0, 5.0])
    assert (t, df) == pytest.approx((-3 / 2**0.5, 2.0))
    assert p == pytest.approx(1 - 3 / 2**0.5 / (2 + 4.5) ** 0.5, rel=1e-10)
    t, df, _ = welch_t_test([1.0, 2.0, 4.0], [10.0, 10.5, 11.0, 11.5, 12.0])
    va, vb = np.var([1.0, 2.0, 4.0], ddof=1) / 3, np.var([10.0, 10.5, 11.0, 11.5, 12.0], ddof=1) / 5
    assert df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 4))
    rng = np.random.default_rng(0)
    rejections = [welch_t_test(rng.normal(0, 1, 3), rng.normal(0, 3, 4))[2] < 0.05 for _ in range(2000)]
    assert 0.03 < np.mean(rejections) < 0.07  # Welch's test holds its size with unequal variances (approximately)
    assert welch_t_test([1.0, 1.0], [1.0, 1.0])[2] == 1.0 and welch_t_test([1.0, 1.0], [2.0, 2.0])[2] == 0.0
    with pytest.raises(ValueError, match="at least 2 runs"):
        welch_t_test([1.0], [2.0, 3.0])


def test_bootstrap_p_is_twice_the_smaller_tail_and_agrees_with_the_interval():
    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(0.8)  # 2 x (1 + 1) / (4 + 1)
    assert bootstrap_p(np.array([1.0, 2.0, np.nan])) == pytest.approx(2 / 3)  # nan (no pairs) left out; 2 x 1/3
    assert bootstrap_p(np.zeros(5)) == 1.0  # identical models: every resample is 0
    shifted = np.random.default_rng(0).normal(5.0, 1.0, 2000)  # 95% interval well above 0
    assert bootstrap_p(shifted) == pytest.approx(2 / 2001) and np.percentile(shifted, 2.5) > 0
