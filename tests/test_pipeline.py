"""End to end through the real DVC commands, on a fresh copy of the repository, in the offline smoke setting."""
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"images_per_s", "peak_memory_mb", "train_seconds", "step"}
FAKE_TOKEN = "hf_" + uuid.uuid4().hex  # made at run time, so that no source file holds it
pytestmark = pytest.mark.slow


def sh(cwd: Path, *args: str) -> str:
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "HF_TOKEN": FAKE_TOKEN,
    }
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def fresh_copy(target: Path) -> Path:
    """The repository as a user clones it: tracked and untracked-but-not-ignored files, one commit."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    sh(target, "git", "init", "-q", "-b", "main")
    sh(target, "git", "add", "-A")
    sh(target, "git", "commit", "-q", "-m", "fresh copy")
    return target


def read_metrics(clone: Path) -> dict:
    files = ["reports/split.json", "reports/clip_eval.json", "reports/blip_check.json", "reports/finetune/metrics.json"]
    metrics = {}
    for name in files:
        metrics |= {f"{name}:{k}": v for k, v in json.loads((clone / name).read_text()).items() if k not in TIMING_KEYS}
    return metrics


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> SimpleNamespace:
    """A fresh copy after the first smoke experiment: its folder and what `dvc exp run` printed."""
    root = fresh_copy(tmp_path_factory.mktemp("clone"))
    return SimpleNamespace(root=root, log=sh(root, "dvc", "exp", "run", "-S", "profile=smoke"))


def test_smoke_run_goes_through_all_stages(clone):
    for stage in ("fetch@sd", "fetch@clip", "fetch@blip", "fetch@data", "split", "finetune", "generate@base",
                  "generate@finetuned", "clip_eval", "blip_check", "report"):
        assert f"Running stage '{stage}'" in clone.log
    assert (clone.root / "models/finetuned/unet/diffusion_pytorch_model.safetensors").is_file()
    info = json.loads((clone.root / "models/finetuned/training_info.json").read_text())
    assert info["n_captions_truncated"] == 0 and info["params"]["epochs"] == 2
    assert len(list((clone.root / "reports/samples/finetuned").glob("*.png"))) == 10
    assert "![training loss]" in (clone.root / "reports/report.md").read_text()


def test_second_repro_runs_nothing(clone):
    assert "Running stage" not in sh(clone.root, "dvc", "repro")


def test_reported_clip_score_is_recomputed_independently(clone):
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clone.root / 'models/pretrained/clip'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clone.root / 'models/pretrained/clip'}")
    model.eval()
    reported = json.loads((clone.root / "reports/clip_eval.json").read_text())
    for name in ("base", "finetuned"):
        rows = [json.loads(line) for line in (clone.root / f"reports/samples/{name}/manifest.jsonl").read_text().splitlines()]
        scores = []
        with torch.no_grad():
            for row in rows:
                image = preprocess(Image.open(clone.root / f"reports/samples/{name}" / row["file_name"])).unsqueeze(0)
                text = tokenizer([f"{row['style_prompt']} {row['prompt']}"])
                similarity = torch.cosine_similarity(model.encode_image(image), model.encode_text(text))
                scores.append(100 * similarity.item())
        assert sum(scores) / len(scores) == pytest.approx(reported[f"clip_score_{name}"], abs=1e-4)


def test_flipping_the_generator_pre_prompt_reruns_only_generation_and_after(clone):
    first = read_metrics(clone.root)
    log = sh(clone.root, "dvc", "exp", "run", "-S", "profile=smoke", "-S", "generate.style_to_generator=false")
    for stage in ("generate@base", "generate@finetuned", "clip_eval", "blip_check", "report"):
        assert f"Running stage '{stage}'" in log
    for stage in ("fetch@sd", "fetch@data", "split", "finetune"):
        assert f"Running stage '{stage}'" not in log
    assert read_metrics(clone.root) != first

    shown = json.loads(sh(clone.root, "dvc", "exp", "show", "--json"))
    experiments = [exp for commit in shown for exp in (commit.get("experiments") or [])]
    assert len(experiments) == 2
    for exp in experiments:
        metrics = exp["revs"][0]["data"]["metrics"]["reports/clip_eval.json"]["data"]
        assert "clip_score_finetuned" in metrics
    names = [exp["name"] for exp in experiments]
    diff = json.loads(sh(clone.root, "dvc", "metrics", "diff", names[0], names[1], "--json"))
    assert diff["reports/clip_eval.json"]["clip_score_base"]["diff"] != 0


def test_plots_render(clone):
    sh(clone.root, "dvc", "plots", "show", "-o", "plots_out")
    html = (clone.root / "plots_out/index.html").read_text()
    assert "Fine-tuning loss" in html and "CLIP score per prompt" in html


def test_same_smoke_run_twice_gives_identical_metrics(clone):
    before = read_metrics(clone.root)
    log = sh(clone.root, "dvc", "repro", "--force")
    assert "Running stage 'finetune'" in log
    assert read_metrics(clone.root) == before


def test_the_hub_token_is_written_nowhere(clone):
    """Every stage ran with HF_TOKEN set: no output, log, manifest, params, metrics or cache file holds it."""
    needle = FAKE_TOKEN.encode()
    assert needle not in clone.log.encode()
    for path in clone.root.rglob("*"):
        if path.is_file() and ".git" not in path.relative_to(clone.root).parts:
            assert needle not in path.read_bytes(), path
