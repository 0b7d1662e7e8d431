"""The fast tier's end-to-end check: one smoke DAG through the real DVC commands on a fresh copy (the session's
`smoke_run`, which test_pipeline.py's experiments then reuse in the full tier), with DVC started from a PATH whose
`python` is the system's, as a user does who never activated the environment.

Its metrics must equal the committed reference (tests/reference/smoke_metrics.json: the smoke DAG's metrics,
regenerated from a run when the smoke setting was made to show its fine-tune, the positive control of docs/study.md): to RELATIVE_TOLERANCE, which covers
another CPU's float rounding; on one machine two runs agree bit for bit (test_pipeline.py checks that).
"""
import json
import subprocess
from pathlib import Path

import pytest
from conftest import FAKE_TOKEN

REFERENCE = Path(__file__).parent / "reference" / "smoke_metrics.json"
RELATIVE_TOLERANCE = 1e-6
ALL_STAGES = ("fetch@sd", "fetch@clip", "fetch@blip", "fetch@guide", "fetch@data", "split", "encode", "finetune",
              "export", "generate@base", "generate@finetuned", "embed_real", "clip_eval", "blip_check", "report")


def ran(log: str) -> set[str]:
    return {stage for stage in ALL_STAGES if f"Running stage '{stage}'" in log}


def test_the_smoke_metrics_are_the_committed_reference(smoke_run):
    reference = json.loads(REFERENCE.read_text())
    assert smoke_run.metrics.keys() == reference.keys()
    for name, values in reference.items():
        assert smoke_run.metrics[name].keys() == values.keys(), name
        for key, value in values.items():
            assert smoke_run.metrics[name][key] == pytest.approx(value, rel=RELATIVE_TOLERANCE, abs=1e-12), \
                f"{name}: {key}"


def test_compiled_python_leaves_the_pipeline_up_to_date(smoke_run):
    """Importing the package (or running the tests) writes __pycache__ beside the modules that dvc.yaml lists as
    folder dependencies: .dvcignore keeps them out of the folders' hashes, so no stage re-runs. Without it, they
    would."""
    up_to_date = "Data and pipelines are up to date"
    smoke_run.run("python3", "-m", "compileall", "-q", "stylestudy", "stages")
    assert up_to_date in smoke_run.run("dvc", "status")
    ignore = smoke_run.root / ".dvcignore"
    kept = ignore.read_text()
    try:
        ignore.write_text("")
        assert "modified:" in smoke_run.run("dvc", "status") and "stylestudy/" in smoke_run.run("dvc", "status")
    finally:
        ignore.write_text(kept)
    assert up_to_date in smoke_run.run("dvc", "status")


def test_smoke_run_goes_through_all_stages_with_the_environments_python(smoke_run, user_env):
    assert subprocess.run(["python", "-c", "import dvc"], capture_output=True, env=user_env).returncode != 0
    assert ran(smoke_run.log) == set(ALL_STAGES)
    assert (smoke_run.root / "models/finetuned/unet/diffusion_pytorch_model.safetensors").is_file()
    info = json.loads((smoke_run.root / "models/finetuned/training_info.json").read_text())
    assert info["n_captions_truncated"] == 0 and info["params"]["epochs"] == 2
    assert len(list((smoke_run.root / "reports/samples/finetuned").glob("[0-9]*.png"))) == 10  # the study's prompts
    assert len(list((smoke_run.root / "reports/samples/finetuned").glob("test_*.png"))) == 8  # held-out captions
    report = (smoke_run.root / "reports/report.md").read_text()
    assert report.index("## Results") < report.index("## Settings") and "mean nothing about a real model's style" in report
    assert "![loss](figures/loss.png)" in report and "| 36.48 |" in report


def test_second_repro_runs_nothing(smoke_run):
    assert "Running stage" not in smoke_run.run("dvc", "repro")


def test_reported_clip_score_is_recomputed_independently(smoke_run):
    import open_clip
    import torch
    from PIL import Image

    clip = smoke_run.root / "models/pretrained/clip"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip}")
    model.eval()
    reported = json.loads((smoke_run.root / "reports/clip_eval.json").read_text())
    for name in ("base", "finetuned"):
        manifest = (smoke_run.root / f"reports/samples/{name}/manifest.jsonl").read_text().splitlines()
        rows = [row for row in map(json.loads, manifest) if row["set"] == "study"]
        scores = []
        with torch.no_grad():
            for row in rows:
                sample = smoke_run.root / f"reports/samples/{name}" / row["file_name"]
                image = preprocess(Image.open(sample)).unsqueeze(0)
                text = tokenizer([f"{row['style_prompt']} {row['prompt']}"])
                similarity = torch.cosine_similarity(model.encode_image(image), model.encode_text(text))
                scores.append(100 * similarity.item())
        assert sum(scores) / len(scores) == pytest.approx(reported[f"clip_score_{name}"], abs=1e-4)


def test_the_hub_token_is_written_nowhere(smoke_run):
    """Every stage ran with HF_TOKEN set: no output, log, manifest, params, metrics or cache file holds it."""
    needle = FAKE_TOKEN.encode()
    assert needle not in smoke_run.log.encode()
    for path in smoke_run.root.rglob("*"):
        if path.is_file() and ".git" not in path.relative_to(smoke_run.root).parts:
            assert needle not in path.read_bytes(), path


# The distances to the held-out real sketches, with the sign of fine-tuned - base that means "closer".
CLOSER = {"style_similarity": 1, "kid": -1, "cmmd": -1}


def test_positive_control_the_evaluation_sees_the_fine_tune_move_toward_the_sketches(smoke_run):
    """The smoke fine-tune is made to change the model (docs/study.md "Controls"): every distance's difference points
    toward the real held-out sketches with a 95% interval that excludes zero, and the report's first line says so.
    Fails if the evaluation swaps base and fine-tuned (signs flip), compares a model with itself or the wrong image
    sets (no difference left), or pairs the bootstrap draws of the two models apart (intervals widen past zero)."""
    assert_the_evaluation_sees_the_fine_tune(smoke_run.root)
    # not a collapse (issue 32): the fine-tuned images are not significantly less varied than the real sketches (on
    # SD2's smoke run; SD3's and SD3.5's smoke full fine-tunes are, docs/sd3.md)
    metrics = smoke_run.metrics["reports/clip_eval.json"]
    results = (smoke_run.root / "reports/report.md").read_text().split("## Results\n\n", 1)[1]
    assert metrics["diversity_vendi_real_diff_ci_high"] > 0 and "collapsed" not in results.split("\n\n")[0]


def assert_the_evaluation_sees_the_fine_tune(root: Path, spaces: tuple[str, ...] = ("", "_csd")) -> None:
    """The positive control's checks on a run's outputs (test_pipeline.py's SD3 and SD3.5 runs use them too), in
    CLIP's space and in CSD's style space (issue 32)."""
    metrics = json.loads((root / "reports/clip_eval.json").read_text())
    for name, sign in {f"{name}{space}": sign for name, sign in CLOSER.items() for space in spaces}.items():
        low, high = sorted(sign * metrics[f"{name}_diff_ci_{end}"] for end in ("low", "high"))
        assert sign * metrics[f"{name}_diff"] > 0 and low > 0, (name, metrics[f"{name}_diff_ci_low"],
                                                                  metrics[f"{name}_diff_ci_high"])
        assert metrics[f"{name}_diff_p"] < 0.05, name
    results = (root / "reports/report.md").read_text().split("## Results\n\n", 1)[1]
    assert results.startswith("**The fine-tuned model's images are closer to the held-out sketches")
