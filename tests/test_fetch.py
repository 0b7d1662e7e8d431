"""fetch's Hub code path, run offline against a Hugging Face cache laid out as the Hub client leaves it."""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import composed

from stylestudy.models import builders, families, loading
from stylestudy.data import dataset
from stylestudy.core.outputs import MANIFEST
from stylestudy.data.sketches import make_synthetic_sketches

REPO = Path(__file__).resolve().parents[1]
STUDY = composed()
DATA_COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAKE_TOKEN = "hf_" + uuid.uuid4().hex  # made at run time, so that no source file holds it


def snapshot(cache: Path, repo_type: str, repo_id: str, commit: str) -> Path:
    """models--org--name/snapshots/<commit>/ with refs/main pointing at it."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    folder = repo / "snapshots" / commit
    folder.mkdir(parents=True)
    return folder


def write_parquet_dataset(folder: Path, n_images: int) -> list[dict]:
    """The layout of the Hub's parquet datasets: data/train-*.parquet with image {bytes, path} and text."""
    sketches = folder.parent / "sketches"
    make_synthetic_sketches(sketches, n_images, 48, seed=3)
    rows = dataset.read_metadata(sketches)
    images = [{"bytes": (sketches / r["file_name"]).read_bytes(), "path": r["file_name"]} for r in rows]
    table = pa.table({"image": images, "text": [r["text"] for r in rows]})
    (folder / "data").mkdir()
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    return rows


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hub")
    sd, clip, blip = (STUDY["fetch"][k] for k in ("sd", "clip", "blip"))
    builders.save_tiny_sd(snapshot(cache, "model", sd["repo_id"], sd["revision"]), seed=0)
    builders.save_tiny_clip(snapshot(cache, "model", clip["repo_id"], clip["revision"]), seed=0)
    builders.save_tiny_blip(snapshot(cache, "model", blip["repo_id"], blip["revision"]), seed=0)
    write_parquet_dataset(snapshot(cache, "dataset", STUDY["fetch"]["data"]["repo_id"], DATA_COMMIT), 12)
    return cache


def fetch(workdir: Path, kind: str, cache: Path, params: dict = STUDY) -> subprocess.CompletedProcess:
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
                        "HF_TOKEN": FAKE_TOKEN, "SKETCH_ALLOW_CPU": "1"}
    return subprocess.run([sys.executable, "-m", "stages.fetch", kind, "out"], cwd=workdir, env=env,
                          capture_output=True, text=True)


@pytest.mark.parametrize("kind, check", [
    ("sd", families.check_pipeline_folder), ("clip", loading.check_clip_folder), ("blip", loading.check_blip_folder),
])
def test_study_models_come_from_the_hub_cache(tmp_path, hub_cache, kind, check):
    result = fetch(tmp_path, kind, hub_cache)
    assert result.returncode == 0, result.stderr
    check(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["resolved_commit"] == STUDY["fetch"][kind]["revision"]
    assert manifest["repo_id"] == STUDY["fetch"][kind]["repo_id"]
    assert all(not name.endswith(".bin") for name in manifest["files"])
    written = [path.read_bytes() for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert all(FAKE_TOKEN.encode() not in content for content in written) and FAKE_TOKEN not in result.stderr


def test_study_dataset_comes_from_the_hub_cache_as_an_imagefolder(tmp_path, hub_cache):
    result = fetch(tmp_path, "data", hub_cache)
    assert result.returncode == 0, result.stderr
    rows = dataset.read_metadata(tmp_path / "out")
    assert len(rows) == 12 and all(dataset.check_example(tmp_path / "out", row) is None for row in rows)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["revision"] == "main" and manifest["resolved_commit"] == DATA_COMMIT


def test_the_sd_pipeline_from_the_hub_loads_and_generates(tmp_path, hub_cache):
    assert fetch(tmp_path, "sd", hub_cache).returncode == 0
    pipe = families.load_pipeline(tmp_path / "out")
    image = pipe("a sketch", num_inference_steps=1, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_missing_from_the_cache_is_one_line_and_exit_2(tmp_path):
    result = fetch(tmp_path, "sd", tmp_path / "empty-cache")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot get model stabilityai/stable-diffusion-2-base@" in errors[0]
    assert errors[0].endswith("to run offline, use `make demo` (the smoke setting) or set fetch.sd.source=local with "
                              "fetch.sd.path=<folder>")
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_fails_at_once_without_retry_noise(tmp_path):
    """No network here: the reachability check fails, and the cache is tried instead of five retries."""
    params = yaml.safe_load(yaml.safe_dump(STUDY))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
                        "HF_ENDPOINT": "http://127.0.0.1:9", "SKETCH_ALLOW_CPU": "1"}
    env.pop("HF_HUB_OFFLINE")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "stages.fetch", "clip", "out"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and time.monotonic() - started < 20
    assert "Retrying" not in result.stderr and "the Hub cannot be used: 127.0.0.1" in result.stderr


def test_the_study_stops_up_front_on_a_machine_without_a_gpu(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(STUDY))
    env = os.environ | {"PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("SKETCH_ALLOW_CPU", None)
    result = subprocess.run([sys.executable, "-m", "stages.fetch", "sd", "out"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the study profile needs a CUDA GPU: without one its fine-tune alone would take about")
    assert "days" in line and "SKETCH_ALLOW_CPU=1 to go on anyway" in line


def test_local_source_that_does_not_exist_is_one_line(tmp_path):
    params = yaml.safe_load(yaml.safe_dump(STUDY))
    params["fetch"]["clip"] |= {"source": "local", "path": "/nowhere/clip"}
    result = fetch(tmp_path, "clip", tmp_path, params)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: fetch.clip.path: /nowhere/clip does not exist; point it at a local clip folder")


def test_a_failed_fetch_leaves_no_output(tmp_path):
    params = yaml.safe_load(yaml.safe_dump(STUDY))
    clip_folder = tmp_path / "clip"
    builders.save_tiny_clip(clip_folder, seed=0)
    params["fetch"]["sd"] |= {"source": "local", "path": str(clip_folder)}  # a CLIP folder given as the pipeline
    result = fetch(tmp_path, "sd", tmp_path, params)
    assert result.returncode == 2 and "error:" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
