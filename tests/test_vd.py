"""Versatile Diffusion, the optional baseline generator: the tiny one converts from the Hub's layout with its attention
swapped, generate renders the planned images with it, fetch.vd.enabled false leaves empty markers that evaluation
skips, and a baseline that ran adds its own keys without moving the pair's."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import built, composed

from stages import blip_check, clip_eval, fetch, generate
from stylestudy.core.config import SCHEMAS, UserError, validate
from stylestudy.core.outputs import MANIFEST
from stylestudy.data import dataset
from stylestudy.evaluate import statistics
from stylestudy.evaluate.samples import read_samples
from stylestudy.models import builders_vd, families
from stylestudy.models.families import vd
from stylestudy.report import results

REPO = Path(__file__).resolve().parents[1]
SMOKE = composed("profile=smoke")
SEED = SMOKE["shared"]["seed"]
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built(tmp_path_factory, "hub", lambda folder: builders_vd.save_hub_layout(folder, SEED))


@pytest.fixture(scope="module")
def vd_dir(tmp_path_factory: pytest.TempPathFactory, hub_layout: Path) -> Path:
    folder = tmp_path_factory.mktemp("vd") / "vd"
    vd.convert(hub_layout, folder)
    return folder


def small(p: dict) -> dict:
    """generate's smoke params, two prompts of one image, two steps: a few seconds on a CPU."""
    return p | {"prompts": p["prompts"][:2], "images_per_prompt": 1, "num_inference_steps": 2, "test_captions": 0,
                "batch_size": 2}


def state(module: torch.nn.Module, part: str) -> dict[str, torch.Tensor]:
    """The weights of `module` whose names hold `part` ("attentions." for the cross-attention blocks)."""
    return {k: v for k, v in module.state_dict().items() if part in k}


def test_the_canonical_folder_attends_to_text_and_has_no_text_unet(hub_layout, vd_dir):
    from diffusers import UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    index = json.loads((vd_dir / "model_index.json").read_text())
    assert index["_class_name"] == vd.GENERATOR.pipeline_class and index["text_unet"] == [None, None]
    hub_image = UNet2DConditionModel.from_pretrained(hub_layout / "image_unet")
    hub_text = UNetFlatConditionModel.from_pretrained(hub_layout / "text_unet")
    ours = vd.GENERATOR.load_pipeline(vd_dir).image_unet
    # The attention blocks come from the text UNet (text context), the rest (resnets) from the image UNet.
    text_attention, ours_attention = state(hub_text, "attentions."), state(ours, "attentions.")
    assert ours_attention and ours_attention.keys() == text_attention.keys()
    assert all(torch.equal(ours_attention[k], text_attention[k]) for k in text_attention)
    image_attention = state(hub_image, "attentions.")
    assert not any(torch.equal(ours_attention[k], image_attention[k]) for k in image_attention if "to_q" in k)
    resnets = state(hub_image, "resnets.")
    assert all(torch.equal(state(ours, "resnets.")[k], resnets[k]) for k in resnets)


def test_diffusers_alone_cannot_load_the_hub_layout(hub_layout):
    """The break convert works around (diffusers 0.42.1): when this passes no more, the work-around can go."""
    from diffusers import VersatileDiffusionTextToImagePipeline

    with pytest.raises(ValueError, match="versatile_diffusion is not one of the libraries"):
        VersatileDiffusionTextToImagePipeline.from_pretrained(hub_layout, use_safetensors=True)


def test_a_folder_of_another_kind_is_refused_in_one_line(tmp_path, vd_dir):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="_class_name is 'StableDiffusionPipeline'"):
        vd.convert(tmp_path, tmp_path / "out")
    assert families.generator_for(vd_dir, families.FAMILIES["sd2"]) is vd.GENERATOR


def test_generate_renders_the_plan_and_decodes_as_the_pipeline_does(tmp_path, vd_dir, one_thread):
    p = small(SMOKE["generate"])
    rows = generate.run("vd", vd_dir, tmp_path / "no-split", tmp_path / "out", p, SEED)
    planned = generate.plan("vd", p, SEED)
    assert [(r["file_name"], r["seed"], r["text_given"]) for r in rows] == [
        (r["file_name"], r["seed"], r["text_given"]) for r in planned]
    assert dataset.read_jsonl(tmp_path / "out" / "manifest.jsonl") == rows
    pipe = generate.load_pipeline(vd_dir, p)
    for row in rows:
        own = pipe(row["text_given"], height=p["resolution"], width=p["resolution"],
                   num_inference_steps=p["num_inference_steps"], guidance_scale=p["guidance_scale"],
                   generator=torch.Generator().manual_seed(row["seed"]), output_type="np").images[0]
        saved = np.asarray(dataset.load_rgb(tmp_path / "out" / row["file_name"]), dtype=np.float64) / 255
        assert np.abs(saved - own).max() <= 1 / 255 + 1e-6  # PNG rounding only


def test_settings_of_another_family_run_as_vd_can_and_are_recorded(tmp_path, vd_dir):
    p = small(SMOKE["generate"]) | {"scheduler": "flow_euler", "memory": "sequential", "prompts": ["a tree"]}
    rows = generate.run("vd", vd_dir, tmp_path / "no-split", tmp_path / "out", p, SEED)
    assert {(r["scheduler"], r["memory"]) for r in rows} == {(vd.SHIPPED, "none")}
    assert type(generate.load_pipeline(vd_dir, vd.GENERATOR.runnable(p)).scheduler).__name__ == "DDIMScheduler"
    euler = generate.load_pipeline(vd_dir, vd.GENERATOR.runnable(p | {"scheduler": "euler"}))
    assert type(euler.scheduler).__name__ == "EulerDiscreteScheduler"
    plms = generate.load_pipeline(vd_dir, vd.GENERATOR.runnable(p | {"scheduler": "pndm"})).scheduler
    assert type(plms).__name__ == "PNDMScheduler" and plms.config.skip_prk_steps  # as SD2's folder has it


def test_switched_off_fetch_and_generate_write_empty_markers_that_evaluation_skips(tmp_path):
    assert SMOKE["fetch"]["vd"]["enabled"] is False and composed()["fetch"]["vd"]["enabled"] is False
    fetch.run("vd", SMOKE["fetch"]["vd"], SEED, tmp_path / "vd")
    assert [p.name for p in (tmp_path / "vd").iterdir()] == [MANIFEST]
    assert json.loads((tmp_path / "vd" / MANIFEST).read_text())["enabled"] is False
    samples = tmp_path / "samples"
    assert generate.run("vd", tmp_path / "vd", tmp_path / "no-split", samples / "vd", SMOKE["generate"], SEED) == []
    assert [p.name for p in (samples / "vd").iterdir()] == ["manifest.jsonl"]
    row = {"set": "study", "prompt_index": 0, "image_index": 0, "seed": 42, "file_name": "00_00.png"}
    for model in ("base", "finetuned"):
        dataset.write_jsonl(samples / model / "manifest.jsonl", [row | {"model": model}])
    assert list(read_samples(samples)) == ["base", "finetuned"]
    dataset.write_jsonl(samples / "vd" / "manifest.jsonl", [row | {"model": "vd"}])
    assert list(read_samples(samples)) == ["base", "finetuned", "vd"]
    dataset.write_jsonl(samples / "vd" / "manifest.jsonl", [row | {"model": "vd", "seed": 7}])
    with pytest.raises(UserError, match="base and vd samples differ"):
        read_samples(samples)


def test_enabled_must_be_a_boolean():
    with pytest.raises(UserError, match="fetch.vd.enabled"):
        validate(SMOKE["fetch"]["vd"] | {"enabled": "yes"}, SCHEMAS["fetch"]["vd"], "fetch.vd")


def test_a_baseline_adds_its_keys_and_leaves_the_pair_s_unchanged():
    rng = np.random.default_rng(0)
    scores = {m: rng.normal(30, 2, 6).tolist() for m in ("base", "finetuned", "vd")}
    per_image = [{"model": m, "clip_score": s, "prompt": "p"} for m, values in scores.items() for s in values]
    p = SMOKE["clip_eval"]
    pair = clip_eval.paired_summary(per_image[:12], p, SEED, "test_")
    assert clip_eval.paired_summary(per_image, p, SEED, "test_") == pair
    with_vd = clip_eval.baseline_summary(per_image, p, SEED, "test_")
    assert set(with_vd) == {"test_clip_score_vd", "test_clip_score_vd_ci_low", "test_clip_score_vd_ci_high",
                            "test_clip_score_vd_n"}
    assert with_vd["test_clip_score_vd"] == pytest.approx(np.mean(scores["vd"]))
    assert clip_eval.baseline_summary(per_image[:12], p, SEED, "") == {}
    flags = {"base": [True, False, False], "finetuned": [True, True, False], "vd": [False, False, True]}
    table = [{"model": m, "names_style": f} for m, values in flags.items() for f in values]
    shares = blip_check.share_summary(table, "")
    assert shares["style_share_vd"] == pytest.approx(1 / 3) and shares["style_share_vd_n"] == 3
    assert {k: v for k, v in shares.items() if "_vd" not in k} == blip_check.share_summary(table[:6], "")


def test_a_baseline_s_distances_are_those_the_pair_gets_for_the_same_images():
    rng = np.random.default_rng(1)
    base, finetuned, real = rng.normal(size=(8, 16)), rng.normal(size=(8, 16)), rng.normal(size=(9, 16))
    settings = {"bootstrap_samples": 200, "kid_subsets": 10, "kid_subset_size": 5, "seed": SEED}
    pair = statistics.distance_metrics(base, finetuned, real, **settings)
    alone = statistics.single_distance_metrics(finetuned, real, "vd", **settings)
    assert alone.keys() == {k.replace("finetuned", "vd") for k in pair if "_finetuned" in k}
    assert all(alone[k.replace("finetuned", "vd")] == pytest.approx(v) for k, v in pair.items() if "_finetuned" in k)


def test_the_headline_table_gains_a_column_only_when_the_baseline_ran():
    metrics = {"clip_score_base": 30.0, "clip_score_finetuned": 31.0, "clip_score_diff": 1.0, "clip_score_diff_p": 0.5}
    plain = results.headline_table(metrics, None)
    assert "Versatile Diffusion" not in plain
    with_vd = results.headline_table(metrics | {"clip_score_vd": 29.5, "clip_score_vd_n": 10}, None)
    header, _, row = with_vd.splitlines()[:3]
    assert header.split(" | ")[4] == "Versatile Diffusion (not fine-tuned)" and row.split(" | ")[4] == "29.5, n=10"


def test_fetch_vd_from_the_hub_cache_takes_what_the_pipeline_needs(tmp_path, hub_layout):
    repo = tmp_path / "cache" / f"models--{SMOKE['fetch']['vd']['repo_id'].replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(hub_layout, repo / "snapshots" / COMMIT)
    params = composed("fetch.vd.enabled=true")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache"),
                        "SKETCH_ALLOW_CPU": "1"}
    result = subprocess.run([sys.executable, "-m", "stages.fetch", "vd", "out"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["enabled"] is True and manifest["resolved_commit"] == COMMIT and manifest["revision"] == "main"
    assert families.generator_for(tmp_path / "out", families.FAMILIES["sd2"]) is vd.GENERATOR
