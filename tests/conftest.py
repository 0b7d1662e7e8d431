"""Hermetic test settings: no hub, no analytics, caches in a temporary folder. Set before any library is imported."""
import os
import tempfile
from pathlib import Path

import pytest
import yaml

_HOME = Path(tempfile.mkdtemp(prefix="sketch-tests-"))
os.environ.update({
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


# Written by the pipeline, never part of a clone: a copy made after `make demo` must look like a fresh clone.
GENERATED = ("dvc.lock", "params.yaml", "reports/", "dvc_plots/")
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
        if (REPO / name).is_file() and not name.startswith(GENERATED):
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
