"""Prompt text, per-image seeds and the bootstrap CI."""
import numpy as np
import pytest

from stylestudy.evaluate.samples import bootstrap_ci, image_seed, mean_with_ci, styled
from stages.generate import plan


def test_styled_puts_the_pre_prompt_in_front_only_when_asked():
    assert styled("zebra running", "A black and white sketch of", True) == "A black and white sketch of zebra running"
    assert styled("zebra running", "A black and white sketch of", False) == "zebra running"


def test_every_image_has_its_own_seed_and_both_models_share_them():
    p = {"prompts": ["a", "b", "c"], "images_per_prompt": 4, "style_prompt": "S", "style_to_generator": True,
         "scheduler": "pndm", "num_inference_steps": 2, "guidance_scale": 7.5, "resolution": 32}
    base, tuned = plan("base", p, seed=100), plan("finetuned", p, seed=100)
    seeds = [row["seed"] for row in base]
    assert seeds == list(range(100, 112))
    assert seeds == [row["seed"] for row in tuned]
    assert image_seed(100, 2, 1, 4) == base[9]["seed"] and base[9]["prompt_index"] == 2 and base[9]["image_index"] == 1
    assert len({row["file_name"] for row in base}) == 12


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_more_data():
    rng = np.random.default_rng(0)
    small, large = rng.normal(30, 2, 10).tolist(), rng.normal(30, 2, 1000).tolist()
    low_s, high_s = bootstrap_ci(small, 2000, seed=1)
    low_l, high_l = bootstrap_ci(large, 2000, seed=1)
    assert low_s < np.mean(small) < high_s and low_l < np.mean(large) < high_l
    assert high_l - low_l < (high_s - low_s) / 3
    # the standard error of a mean of 1000 draws with sd 2 is 0.063: a 95% interval is about 0.25 wide
    assert high_l - low_l == pytest.approx(4 * 1.96 * 2 / np.sqrt(1000) / 2, rel=0.2)
    assert bootstrap_ci(small, 500, seed=3) == bootstrap_ci(small, 500, seed=3)


def test_mean_with_ci_is_flat():
    metrics = mean_with_ci([1.0, 2.0, 3.0], 100, seed=0, name="clip_score_base")
    assert set(metrics) == {"clip_score_base", "clip_score_base_ci_low", "clip_score_base_ci_high", "clip_score_base_n"}
    assert metrics["clip_score_base"] == 2.0 and metrics["clip_score_base_n"] == 3
