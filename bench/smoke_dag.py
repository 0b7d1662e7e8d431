"""Time the smoke DAG stage by stage on a fresh clone of this repository, then the re-run after a training-only
change (what an experiment with another learning rate costs: the encode and embed_real stages are reused), and print
the figures.

Run: python bench/smoke_dag.py   (or `make bench`). Needs the project's virtual environment on PATH.
Each stage runs through `dvc repro --single-item`, so a figure includes DVC's own start-up (printed separately).
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.config import compose_params  # noqa: E402


def run(cwd: Path, *args: str) -> tuple[float, str]:
    """Seconds a command took, and what it printed."""
    started = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return time.perf_counter() - started, result.stdout + result.stderr


def training_only_change(clone: Path) -> tuple[float, list[str]]:
    """Re-run the DAG after changing the learning rate: seconds and the stages that ran."""
    compose_params(clone / "params.yaml", clone, ["profile=smoke", "finetune.learning_rate=3e-4"])
    seconds, printed = run(clone, "dvc", "repro")
    return seconds, re.findall(r"Running stage '([^']+)'", printed)


def smoke_clone(target: Path) -> Path:
    """A clone of the committed repository with params.yaml composed for the smoke profile."""
    subprocess.run(["git", "clone", "-q", str(REPO), str(target)], check=True)
    compose_params(target / "params.yaml", target, ["profile=smoke"])
    return target


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="smoke-bench-") as tmp:
        clone = smoke_clone(Path(tmp) / "repo")
        stages = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=clone, capture_output=True, text=True,
                                check=True).stdout.split()
        dvc_overhead = run(clone, "dvc", "status")[0]
        figures = [(stage, run(clone, "dvc", "repro", "--single-item", stage)[0]) for stage in stages]
        rerun, rerun_stages = training_only_change(clone)
    total = sum(seconds for _, seconds in figures)
    print(f"smoke DAG on {os.cpu_count()} CPU cores, Python {platform.python_version()}, {platform.machine()}")
    print(f"{'stage':<22}{'seconds':>9}")
    for stage, seconds in figures:
        print(f"{stage:<22}{seconds:>9.1f}")
    print(f"{'total':<22}{total:>9.1f}")
    print(f"(each figure includes DVC start-up: `dvc status` alone takes {dvc_overhead:.1f} s)")
    print(f"re-run after a training-only change (finetune.learning_rate): {rerun:.1f} s = {rerun / total:.2f} x the "
          f"whole DAG; stages run: {', '.join(rerun_stages)}")


if __name__ == "__main__":
    main()
