"""Hermetic test settings: no hub, no analytics, caches in a temporary folder. Set before any library is imported."""
import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

_HOME = Path(tempfile.mkdtemp(prefix="sketch-tests-"))
# The suite runs on the CPU even on a GPU machine, in this process and every one it starts: the expected numbers
# (tests/reference/, resumed runs bit for bit, the same metrics twice) hold on a CPU, and CUDA kernels are not
# deterministic by default. What holds on a GPU is bench/gpu_check.sh's to measure (its determinism step).
os.environ.update({
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HOME": str(_HOME / "hf"),
    "DVC_SITE_CACHE_DIR": str(_HOME / "dvc-site"),
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
})

REPO = Path(__file__).resolve().parents[1]


def composed(*overrides: str) -> dict:
    """params.yaml as `dvc exp run -S ...` composes it from conf/: never the working copy, which the last
    `dvc exp run` (e.g. `make demo`) rewrote."""
    from stylestudy.core.config import compose_params

    path = Path(tempfile.mkdtemp(dir=_HOME)) / "params.yaml"
    compose_params(path, REPO, list(overrides))
    return yaml.safe_load(path.read_text())


def params_with(tmp_path: Path, *overrides: str) -> Path:
    """A params.yaml under `tmp_path` composed with `overrides`, for load_params to validate."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(composed(*overrides)))
    return path


def params_refusal(tmp_path: Path, section: str, *overrides: str) -> str:
    """The message with which load_params refuses `section` of params composed with `overrides`: one line."""
    from stylestudy.core.config import UserError, load_params

    with pytest.raises(UserError) as refused:
        load_params(section, params_with(tmp_path, *overrides))
    assert "\n" not in str(refused.value)
    return str(refused.value)


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: tiny models gain nothing from more, and on a loaded machine extra threads
    only spin (up to 10x slower); one thread also gives the same numbers whatever the core count."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ tiny models
# Each family's tiny pipeline from the builder fetch uses (source tiny, seed 0), once a session; tests only read it
# (a test that changes one copies it first).

def built(tmp_path_factory, name: str, save) -> Path:
    """A fresh folder `name` that `save(folder)` (a builder of stylestudy/models/builders*.py) writes a model into."""
    folder = tmp_path_factory.mktemp(name) / name
    save(folder)
    return folder


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory) -> Path:
    from stylestudy.models import builders

    return built(tmp_path_factory, "sd", lambda folder: builders.save_random_sd(folder, 0, "tiny"))


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory) -> Path:
    from stylestudy.models import builders_sd3

    return built(tmp_path_factory, "sd3", lambda folder: builders_sd3.save_random_sd3(folder, 0, "tiny"))


@pytest.fixture(scope="session")
def sd35_dir(tmp_path_factory) -> Path:
    from stylestudy.models import builders_sd3

    return built(tmp_path_factory, "sd35", lambda folder: builders_sd3.save_random_sd3(folder, 0, "tiny-sd35"))


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory) -> Path:
    """The tiny SDXL with its VAE unshaped (nothing reads its images; shaping takes most of the build's time)."""
    from stylestudy.models import builders_sdxl

    return built(tmp_path_factory, "sdxl",
                 lambda folder: builders_sdxl.save_random_sdxl(folder, 0, "tiny", shaped=False))


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory) -> Path:
    """The tiny FLUX with its VAE and transformer unshaped (as sdxl_dir)."""
    from stylestudy.models import builders_flux

    return built(tmp_path_factory, "flux",
                 lambda folder: builders_flux.save_random_flux(folder, 0, "tiny", shaped=False))


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    from stylestudy.models import builders

    return built(tmp_path_factory, "clip", lambda folder: builders.save_tiny_clip(folder, 0))


@pytest.fixture(scope="session")
def blip_dir(tmp_path_factory) -> Path:
    from stylestudy.models import builders

    return built(tmp_path_factory, "blip", lambda folder: builders.save_tiny_blip(folder, 0))


# Written by the pipeline, never part of a clone: a copy made after `make demo` must look like a fresh clone.
GENERATED = ("dvc.lock", "params.yaml", "reports/", "dvc_plots/")
KEPT_IN_GIT = ("reports/comparison.png",)  # `make compare`'s chart, a plot of dvc.yaml that no stage writes
# Written by `make setup`, never committed: a clone that ran it has them, as it has the environment the copy shares.
SET_UP = (".dvc/plots_page.html",)
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}


def sh(cwd: Path, *args: str, env: dict | None = None, check: bool = True) -> str:
    """Run a command, `dvc` as the project environment's, with `env` over os.environ; its stdout and stderr."""
    import subprocess
    import sys

    if args[0] == "dvc":
        args = (str(Path(sys.executable).parent / "dvc"), *args[1:])
    result = subprocess.run(args, cwd=cwd, env=os.environ | GIT_IDENTITY | (env or {}), capture_output=True,
                            text=True)
    assert result.returncode == 0 or not check, (
        f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout + result.stderr


def fresh_copy(target: Path) -> Path:
    """The repository as a user clones it and sets it up, one commit: tracked and untracked-but-not-ignored files
    (uncommitted work included) and what `make setup` writes in it, without what the pipeline writes; params.yaml
    composed from conf/ as committed."""
    import shutil
    import subprocess

    from stylestudy.core.config import compose_params

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file() and (name in KEPT_IN_GIT or not name.startswith(GENERATED)):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    for name in SET_UP:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, target / name)
    compose_params(target / "params.yaml", target, [])
    sh(target, "git", "init", "-q", "-b", "main")
    sh(target, "git", "add", "-A")
    sh(target, "git", "commit", "-q", "-m", "fresh copy")
    return target


# ------------------------------------------------------------------------------------------------ the smoke run

FAKE_TOKEN = "hf_" + uuid.uuid4().hex  # made at run time, so that no source file holds it
SMOKE = ("dvc", "exp", "run", "-S", "profile=smoke")
METRICS_FILES = ("reports/split.json", "reports/clip_eval.json", "reports/blip_check.json",
                 "reports/finetune/metrics.json")
TIMING_KEYS = {"step"}  # dvclive's step counter; timings are in reports/finetune/timing.json, not in the metrics


def read_metrics(root: Path) -> dict:
    """Every metric of a run, as {file: {key: value}}."""
    import json

    return {name: {k: v for k, v in json.loads((root / name).read_text()).items() if k not in TIMING_KEYS}
            for name in METRICS_FILES}


@pytest.fixture(scope="session")
def user_env(tmp_path_factory) -> dict:
    """A PATH whose `python` is the system interpreter (not the project's), a Hub token in the environment."""
    bin_dir = tmp_path_factory.mktemp("system-bin")
    (bin_dir / "python").symlink_to("/usr/bin/python3")
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_TOKEN": FAKE_TOKEN}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, user_env) -> SimpleNamespace:
    """One `dvc exp run -S profile=smoke` on a fresh copy, shared by every end-to-end test of the session (the fast
    tier's test_dag.py reads it; test_pipeline.py then runs more experiments in it): its folder, what DVC printed, a
    runner, and its metrics right after the run."""
    root = fresh_copy(tmp_path_factory.mktemp("clone"))
    run = lambda *args, check=True: sh(root, *args, env=user_env, check=check)  # noqa: E731
    log = run(*SMOKE)
    return SimpleNamespace(root=root, log=log, run=run, metrics=read_metrics(root))


@pytest.fixture(scope="session")
def tiny_csd(tmp_path_factory) -> Path:
    """The smoke setting's CSD style embedder, as fetch@csd builds it."""
    from stages import fetch

    out = tmp_path_factory.mktemp("csd") / "csd"
    fetch.run("csd", {"source": "tiny", "repo_id": "", "revision": "", "path": ""}, 0, out)
    return out


# ------------------------------------------------------------------------------------------------ half precision

def emulate_cuda_fp16(accelerator):
    """An accelerator as fp16 mixed precision makes it on CUDA, on the CPU: fp16 autocast and a loss scaler (accelerate
    gives neither on a CPU)."""
    import torch

    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu"), True
    return accelerator


@contextlib.contextmanager
def fresh_accelerator_state() -> Iterator[None]:
    """No accelerate state inside, none left after: accelerate keeps one mixed precision a process and refuses an
    Accelerator with another, so a test that builds its own starts from none and leaves none to the next."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state()


@pytest.fixture(params=["fp16", "bf16"])
def half_precision(request, monkeypatch):
    """Each stage's CUDA branch on the CPU, in fp16 then bf16: the inference dtype (CLIP loaded with half=True in fp16,
    BLIP and the generating pipeline in the half type), the frozen VAE and text encoder of encode and finetune in it,
    and the fine-tune's mixed precision with fp16 autocast and a loss scaler as on a GPU. A dtype mismatch then fails
    here, not on the first GPU."""
    import torch

    from stylestudy.models import loading
    from stylestudy.train import build

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[request.param]
    monkeypatch.setattr(loading, "default_dtype", lambda device: dtype)
    monkeypatch.setattr(loading, "frozen_dtype", lambda precision, device: dtype if precision != "no" else torch.float32)
    monkeypatch.setattr(loading, "precision_that_runs", lambda requested: requested)
    build_accelerator = build.build_accelerator
    if request.param == "fp16":
        monkeypatch.setattr(build, "build_accelerator", lambda p, seed: (
            emulate_cuda_fp16(build_accelerator(p, seed)) if p["mixed_precision"] == "fp16" else build_accelerator(p, seed)))
    with fresh_accelerator_state():  # the fine-tune's mixed precision is this fixture's
        yield dtype
