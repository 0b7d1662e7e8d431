"""Diversity of a set of images (stylestudy/evaluate/diversity.py): the Vendi score against its definition on cases
with a known answer, the pairwise distance against a brute-force loop, and the comparisons a collapsed fine-tune
must fail and an unchanged one must pass exactly."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from stylestudy.evaluate import diversity

RNG = np.random.default_rng(0)


def test_vendi_is_one_for_copies_and_n_for_orthogonal_vectors() -> None:
    assert diversity.vendi_score(np.tile(RNG.normal(size=(1, 8)), (5, 1))) == pytest.approx(1.0)
    assert diversity.vendi_score(np.eye(6) * 3.0) == pytest.approx(6.0)  # unit length: the scale does not count


def test_vendi_of_two_vectors_is_the_closed_form() -> None:
    """K = [[1, c], [c, 1]]: K / 2 has eigenvalues (1 ± c) / 2."""
    angle = 0.7
    x = np.array([[1.0, 0.0], [math.cos(angle), math.sin(angle)]])
    c = math.cos(angle)
    eigenvalues = [(1 + c) / 2, (1 - c) / 2]
    assert diversity.vendi_score(x) == pytest.approx(math.exp(-sum(e * math.log(e) for e in eigenvalues)))


def test_a_weighted_resample_is_the_set_with_its_draws_repeated() -> None:
    x = RNG.normal(size=(5, 4))
    counts = np.array([2.0, 0.0, 1.0, 1.0, 1.0])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    weighted = diversity.vendi_from_kernel(unit @ unit.T, counts / counts.sum())
    assert weighted == pytest.approx(diversity.vendi_score(np.repeat(x, counts.astype(int), axis=0)))


def test_mean_pairwise_distance_is_the_mean_over_distinct_pairs() -> None:
    x = RNG.normal(size=(6, 3))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.mean([1 - unit[i] @ unit[j] for i, j in itertools.combinations(range(6), 2)])
    assert diversity.mean_pairwise_distance(x) == pytest.approx(expected)


def test_an_unchanged_model_differs_by_exactly_zero() -> None:
    base = RNG.normal(size=(12, 8))
    metrics = diversity.diversity_metrics(base, base.copy(), RNG.normal(size=(20, 8)), bootstrap_samples=200, seed=1)
    for measure in diversity.MEASURES:
        name = f"diversity_{measure}_diff"
        assert (metrics[name], metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"]) == (0.0, 0.0, 0.0)
        assert metrics[f"{name}_p"] == 1.0


def test_a_collapsed_model_is_less_varied_than_the_base_and_the_real_images() -> None:
    base, real = RNG.normal(size=(12, 8)), RNG.normal(size=(20, 8))
    collapsed = np.tile(RNG.normal(size=(2, 8)), (6, 1)) + 0.05 * RNG.normal(size=(12, 8))
    metrics = diversity.diversity_metrics(base, collapsed, real, bootstrap_samples=200, seed=1)
    for measure in diversity.MEASURES:
        assert metrics[f"diversity_{measure}_diff_ci_high"] < 0
        assert metrics[f"diversity_{measure}_real_diff_ci_high"] < 0
    # the real set was subsampled to the generated set's size: both sides at n=12
    assert metrics["diversity_vendi_real_n"] == metrics["diversity_vendi_real_diff_n"] == 12
    varied = diversity.diversity_metrics(base, RNG.normal(size=(12, 8)), real, bootstrap_samples=200, seed=1)
    assert varied["diversity_vendi_diff_ci_low"] < 0 < varied["diversity_vendi_diff_ci_high"]


def test_the_verdict_names_a_user_s_images_by_what_they_are() -> None:
    """Issue 32: with someone else's dataset the report speaks of real images, not of sketches; a collapse is said."""
    from stylestudy.data.dataset import images_noun
    from stylestudy.report import results

    assert images_noun({"source": "hub", "repo_id": "zoheb/sketch-scene"}) == "sketches"
    assert images_noun({"source": "synthetic"}) == "sketches"
    assert images_noun({"source": "local", "path": "/data/shapes"}) == images_noun({}) == "real images"
    base, real = RNG.normal(size=(12, 8)), RNG.normal(size=(20, 8))
    collapsed = np.tile(RNG.normal(size=(1, 8)), (12, 1)) + 0.01 * RNG.normal(size=(12, 8))
    metrics = diversity.diversity_metrics(base, collapsed, real, bootstrap_samples=200, seed=1)
    said = results.diversity_verdict(metrics, "real images")
    assert said.startswith("**But it collapsed") and "held-out real images" in said and "sketch" not in said
    assert "sketch" not in results.distance_verdict({}, "real images")
