"""The held-out prompt set, the real-sketch embeddings, the per-set metrics and their significance, the report's
results: each against a case computed by hand, and the bad inputs of each (one line or a counted skip)."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import blip_check, clip_eval, embed_real, fetch, generate
from stylestudy.evaluate import embeddings, statistics
from stylestudy.report import results
from stylestudy.core.config import UserError
from stylestudy.data.dataset import write_jsonl

GENERATE = {"prompts": ["a", "b"], "images_per_prompt": 3, "style_prompt": "S", "style_to_generator": True,
            "scheduler": "pndm", "num_inference_steps": 2, "guidance_scale": 7.5, "resolution": 32}


def test_held_out_captions_get_their_own_seeds_after_the_study_s_and_the_same_for_both_models(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [{"file_name": f"{i}.png", "text": f"caption {i}"} for i in range(20)])
    held_out = generate.held_out_captions(tmp_path, 5, seed=7)
    assert held_out == generate.held_out_captions(tmp_path, 5, seed=7) and len(held_out) == 5
    assert held_out != generate.held_out_captions(tmp_path, 5, seed=8)  # drawn with the seed, not the first five
    base, tuned = generate.plan("base", GENERATE, 100, held_out), generate.plan("finetuned", GENERATE, 100, held_out)
    test_rows = [row for row in base if row["set"] == "test"]
    assert [row["seed"] for row in base] == list(range(100, 111)) == [row["seed"] for row in tuned]
    assert [row["prompt"] for row in test_rows] == [row["text"] for row in held_out]
    assert test_rows[0]["text_given"] == f"S {held_out[0]['text']}" and test_rows[0]["source_file"].endswith(".png")
    assert len({row["file_name"] for row in base}) == 11


def test_a_test_split_smaller_than_asked_gives_one_line_and_all_it_has(tmp_path, caplog):
    write_jsonl(tmp_path / "test.jsonl", [{"file_name": "0.png", "text": "only one"}])
    with caplog.at_level(logging.WARNING):
        assert len(generate.held_out_captions(tmp_path, 10, seed=0)) == 1
    assert "generate.test_captions is 10 but" in caplog.text and "holds 1 test captions" in caplog.text
    write_jsonl(tmp_path / "test.jsonl", [])
    assert generate.held_out_captions(tmp_path, 10, seed=0) == []
    assert "held-out set is skipped" in caplog.text
    assert generate.held_out_captions(tmp_path / "nowhere", 0, seed=0) == []  # off: the split is not even read


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "clip"
    fetch.run("clip", {"source": "tiny", "repo_id": "", "revision": "", "path": ""}, 0, out)
    return out


def sketch_folder(root: Path, n: int, broken: tuple[int, ...] = ()) -> tuple[Path, Path]:
    raw, split = root / "raw", root / "split"
    raw.mkdir(parents=True)
    split.mkdir()
    for i in range(n):
        path = raw / f"{i}.png"
        if i in broken:
            path.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            Image.new("RGB", (40 + i, 40), (i * 20, 255, 255)).save(path)
    write_jsonl(split / "test.jsonl", [{"file_name": f"{i}.png", "text": "x"} for i in range(n)])
    return raw, split


def test_real_sketches_are_embedded_once_with_an_undecodable_one_skipped_and_counted(tmp_path, tiny_clip, tiny_csd):
    raw, split = sketch_folder(tmp_path, 5, broken=(2,))
    info = embed_real.run(tiny_clip, tiny_csd, raw, split, tmp_path / "out", {"batch_size": 2})
    assert (info["n_test_rows"], info["n_embedded"], info["n_skipped"]) == (5, 4, 1)
    skipped = (tmp_path / "out/skipped.csv").read_text()
    assert "2.png" in skipped and "not decodable" in skipped
    vectors = embeddings.load_real(tmp_path / "out", embeddings.describe_clip(tiny_clip))
    assert vectors.shape == (4, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    import torch

    from stylestudy.models import loading

    model, preprocess, _ = loading.load_clip(tiny_clip)  # one image alone gives the row the batch gave
    alone = embeddings.embed_images(model, preprocess, [Image.open(raw / "3.png")], 1)
    assert torch.allclose(torch.from_numpy(alone[0]), torch.from_numpy(vectors[2]), atol=1e-5)


def test_an_image_with_several_captions_is_one_real_sketch(tmp_path, tiny_clip, tiny_csd):
    raw, split = sketch_folder(tmp_path, 3)
    rows = [{"file_name": "0.png", "text": f"caption {k}"} for k in range(5)] + [
        {"file_name": "./1.png", "text": "x"}, {"file_name": "1.png", "text": "y"}, {"file_name": "2.png", "text": "x"}]
    write_jsonl(split / "test.jsonl", rows)
    info = embed_real.run(tiny_clip, tiny_csd, raw, split, tmp_path / "out", {"batch_size": 2})
    assert (info["n_test_rows"], info["n_test_images"], info["n_embedded"]) == (8, 3, 3)


def test_no_test_images_is_a_recorded_skip_and_clip_eval_leaves_the_distances_out(tmp_path, tiny_clip, tiny_csd, caplog):
    raw, split = sketch_folder(tmp_path, 0)
    with caplog.at_level(logging.WARNING):
        info = embed_real.run(tiny_clip, tiny_csd, raw, split, tmp_path / "out", {"batch_size": 2})
        real = embeddings.load_real(tmp_path / "out", embeddings.describe_clip(tiny_clip))
        distances = clip_eval.distances({"base": np.ones((3, 32)), "finetuned": np.ones((3, 32))}, real, {}, 0)
        one = clip_eval.distances({"base": np.ones((3, 32)), "finetuned": np.ones((3, 32))}, np.ones((1, 32)), {}, 0)
    assert info["n_embedded"] == 0 and len(real) == 0 and distances == {"n_real_sketches": 0}
    assert one == {"n_real_sketches": 1}  # a single sketch: no unbiased MMD, a recorded skip rather than a traceback
    assert "holds no usable test images" in caplog.text and "kid, cmmd and style_similarity need 2" in caplog.text
    assert "fewer than the 2 they need" in " ".join(results.warnings({"shared": {"profile": "study"}}, one))


def test_embeddings_from_another_clip_are_refused_with_one_line(tmp_path, tiny_clip, tiny_csd):
    raw, split = sketch_folder(tmp_path, 2)
    embed_real.run(tiny_clip, tiny_csd, raw, split, tmp_path / "out", {"batch_size": 2})
    other = embeddings.describe_clip(tiny_clip) | {"weights_sha256": "0" * 64, "name": "ViT-B-32"}
    with pytest.raises(UserError, match="embedded with another CLIP .* not ViT-B-32.*dvc repro embed_real"):
        embeddings.load_real(tmp_path / "out", other)


def test_clip_metrics_of_each_set_carry_the_paired_difference_and_its_sign_flip_p():
    base, tuned = [10.0, 12.0, 11.0], [11.0, 14.0, 14.0]  # differences 1, 2, 3: 2 of 8 sign patterns reach |6|
    per_image = [{"model": "base", "clip_score": s} for s in base] + [{"model": "finetuned", "clip_score": s}
                                                                      for s in tuned]
    metrics = clip_eval.paired_summary(per_image, {"bootstrap_samples": 200, "permutation_samples": 1000}, 0, "test_")
    assert metrics["test_clip_score_diff"] == pytest.approx(2.0) and metrics["test_clip_score_diff_n"] == 3
    assert metrics["test_clip_score_diff_p"] == pytest.approx(0.25)
    assert metrics["test_clip_score_base"] == pytest.approx(11.0) and "clip_score_base" not in metrics


def test_style_shares_get_wilson_intervals_and_mcnemar_on_the_pairs():
    names_style = {"base": [True, False, False, False], "finetuned": [True, True, True, False]}
    table = [{"model": m, "names_style": flag} for m, flags in names_style.items() for flag in flags]
    metrics = blip_check.share_summary(table, "")
    assert (metrics["style_share_base"], metrics["style_share_finetuned"], metrics["style_share_diff"]) == (
        0.25, 0.75, 0.5)
    # Wilson, 1 of 4: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n) with z = 1.96 gives 0.0456 .. 0.6994
    assert metrics["style_share_base_ci_low"] == pytest.approx(0.0456, abs=1e-3)
    assert metrics["style_share_base_ci_high"] == pytest.approx(0.6994, abs=1e-3)
    # two pairs changed, both towards the style: exact McNemar p = 2 * P(X <= 0 | n=2, 1/2) = 0.5
    assert metrics["style_share_diff_p"] == pytest.approx(0.5) and metrics["style_share_diff_n"] == 4


def test_the_style_matcher_counts_plural_and_inflected_forms():
    matcher = blip_check.style_matcher(["drawing", "sketch", "black and white", "pencil", "line art"])
    for caption in ("two drawings of a dog", "a sketched house", "Sketches of trees", "a man sketching",
                    "pencilled lines", "line arts", "a black and white photo"):
        assert matcher.search(caption), caption
    for caption in ("a man withdrawing money", "a sketchbook on a table", "a photo of a dog"):
        assert not matcher.search(caption), caption


def test_the_distance_metrics_rise_when_the_generated_images_move_away_from_the_real_ones():
    rng = np.random.default_rng(0)
    toward, away = np.eye(8)[0] * 2, np.eye(8)[1] * 2  # real and near lean one way, far another
    real, near, far = rng.normal(size=(60, 8)) + toward, rng.normal(size=(40, 8)) + toward, rng.normal(size=(40, 8)) + away
    metrics = statistics.distance_metrics(near, far, real, bootstrap_samples=300, kid_subsets=20,
                                          kid_subset_size=1000, seed=0)
    assert metrics["kid_subset_size"] == 40  # lowered to the smaller set
    assert metrics["kid_diff_ci_low"] > 0 and metrics["cmmd_diff_ci_low"] > 0
    assert metrics["style_similarity_diff_ci_high"] < 0


def clip_and_blip(**overrides) -> dict:
    metrics = {"n_real_sketches": 8, "kid_base": 0.01, "kid_base_n": 18}
    for key in ("clip_score", "style_share"):
        for model in ("base", "finetuned", "diff"):
            metrics |= {f"{key}_{model}": 1.5, f"{key}_{model}_ci_low": 1.0, f"{key}_{model}_ci_high": 2.0,
                        f"{key}_{model}_n": 30}
        metrics[f"{key}_diff_p"] = 0.04
    return metrics | overrides


def test_the_headline_table_reads_mean_ci_n_and_puts_the_study_beside_its_experiment():
    params = {"generate": {"style_to_generator": True}, "clip_eval": {"style_to_clip": True},
              "shared": {"profile": "smoke"}}
    line, score = results.study_line(params)
    assert score == 36.48 and "experiment 1" in line
    text = results.headline_table(clip_and_blip(), score)
    assert "| CLIP score, the study's prompts | 100 x cos | 1.5 [1, 2], n=30 |" in text
    assert "| 0.04 | 36.48 |" in text and "held-out test captions" not in text  # families without keys: left out
    params["generate"]["style_to_generator"] = False
    assert results.study_line(params)[1] == 33.58
    params["clip_eval"]["style_to_clip"] = False
    assert results.study_line(params)[1] is None
    warned = " ".join(results.warnings(params, clip_and_blip()))
    assert "mean nothing about a real model's style" in warned and "rest on 8 images per set" in warned


def test_the_settings_table_lists_only_what_differs_from_the_study():
    study = {"shared": {"seed": 42, "profile": "study"}, "finetune": {"epochs": 30, "method": "full"}}
    ran = {"shared": {"seed": 42, "profile": "study"}, "finetune": {"epochs": 2, "method": "full"}}
    assert results.settings_table(ran, study) == ("| setting | this run | study default |\n|---|---|---|\n"
                                                  "| `finetune.epochs` | `2` | `30` |")
    assert results.settings_table(study, study) == "Every setting is the study's."


def test_clip_eval_writes_which_clip_scored(tmp_path, tiny_clip):
    described = embeddings.describe_clip(tiny_clip)
    assert described["name"] == "tiny (random weights, seed 0)" and described["embed_dim"] == 32
    manifest = json.loads((tiny_clip / "fetch_manifest.json").read_text())
    assert described["weights_sha256"] == manifest["files"]["open_clip_model.safetensors"]


def distance_diffs(style: tuple, kid: tuple, cmmd: tuple) -> dict:
    """Metrics with each distance's difference given as (value, ci_low, ci_high)."""
    metrics = {}
    for name, (value, low, high) in {"style_similarity": style, "kid": kid, "cmmd": cmmd}.items():
        metrics |= {f"{name}_diff": value, f"{name}_diff_ci_low": low, f"{name}_diff_ci_high": high,
                    f"{name}_diff_n": 18, f"{name}_diff_p": 0.01}
    return metrics


@pytest.mark.parametrize("style, kid, cmmd, opening", [
    ((2.0, 1.0, 3.0), (-0.1, -0.2, -0.05), (-5.0, -8.0, -1.0), "**The fine-tuned model's images are closer"),
    ((-2.0, -3.0, -1.0), (0.1, 0.05, 0.2), (5.0, 1.0, 8.0), "**The fine-tuned model's images are further"),
    ((2.0, 1.0, 3.0), (-0.1, -0.2, 0.05), (-5.0, -8.0, -1.0), "**The evaluation cannot tell"),  # KID's includes 0
    ((2.0, 1.0, 3.0), (0.1, 0.05, 0.2), (-5.0, -8.0, -1.0), "**The evaluation cannot tell"),  # KID points away
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), "**The evaluation cannot tell"),  # identical models
])
def test_the_report_opens_with_which_way_the_distances_moved(style, kid, cmmd, opening):
    line = results.distance_verdict(distance_diffs(style, kid, cmmd))
    assert line.startswith(opening) and "kid " in line and "p=0.01" in line
    assert results.distance_verdict({"n_real_sketches": 1}).startswith("No distance")
