"""Time the smoke DAG as a user runs it, one `dvc repro` on a fresh clone, stage by stage; then the re-run after a
training-only change (what an experiment with another learning rate costs: encode and embed_real are reused).
With --against REV, the same for another commit (a branch, a tag, HEAD~1) in the same run, side by side; with
--models sd2,sd3, each model family's smoke DAG (`-S model=...`) side by side.

Run: python bench/smoke_dag.py [--against REV] [--models sd2,sd3]   (or `make bench`). Needs the project's virtual environment on PATH.
A stage's figure runs from DVC's "Running stage" line to the next one: its process, and DVC hashing its outputs.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stylestudy.core.config import compose_params  # noqa: E402

TARGET_SECONDS = 90  # the whole smoke DAG on the reference machine (2 CPU cores)


@dataclass
class Timing:
    stages: dict[str, float]  # seconds, in the order they ran
    total: float  # the whole `dvc repro`, DVC's start-up included
    rerun: float  # after a training-only change
    rerun_stages: list[str]


def timed_repro(clone: Path) -> tuple[float, dict[str, float]]:
    """Seconds of `dvc repro`, and of each stage it ran (read off the time each "Running stage" line came)."""
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    printed: list[str] = []
    with subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        for line in proc.stdout:
            printed.append(line)
            if found := re.search(r"Running stage '([^']+)'", line):
                marks.append((found.group(1), time.perf_counter()))
    total = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"dvc repro failed in {clone}:\n{''.join(printed)[-3000:]}")
    ends = [at for _, at in marks[1:]] + [started + total]
    return total, {name: end - at for (name, at), end in zip(marks, ends)}


def measure(rev: str, workdir: Path, model: str = "sd2") -> Timing:
    """The DAG of commit `rev` on a fresh clone, composed for the smoke profile and `model`, and its training-only
    re-run."""
    clone = workdir / f"{rev.replace('/', '_')}-{model}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], cwd=clone, check=True)
    overrides = ["profile=smoke"] + ([] if model == "sd2" else [f"model={model}"])
    compose_params(clone / "params.yaml", clone, overrides)
    total, stages = timed_repro(clone)
    compose_params(clone / "params.yaml", clone, overrides + ["finetune.learning_rate=3e-4"])
    rerun, rerun_stages = timed_repro(clone)
    return Timing(stages, total, rerun, list(rerun_stages))


def torch_import_seconds() -> float:
    """How fast the machine is right now: most of a stage's time is importing torch and the libraries above it."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True)
    return time.perf_counter() - started


def print_table(timings: dict[str, Timing], torch_seconds: float) -> None:
    names = list(dict.fromkeys(name for timing in timings.values() for name in timing.stages))
    revs = list(timings)
    print(f"smoke DAG on {os.cpu_count()} CPU cores, Python {platform.python_version()}, {platform.machine()}; "
          f"seconds, one `dvc repro` on a fresh clone; `import torch` alone took {torch_seconds:.1f} s")
    header = "".join(f"{rev[:12]:>14}" for rev in revs) + ("   ratio" if len(revs) == 2 else "")
    print(f"{'stage':<22}{header}")

    def row(label: str, values: list[float | None]) -> None:
        cells = "".join(f"{v:>14.1f}" if v is not None else f"{'-':>14}" for v in values)
        ratio = f"{values[0] / values[1]:>8.2f}" if len(values) == 2 and all(values) else ""
        print(f"{label:<22}{cells}{ratio}")

    for name in names:
        row(name, [timings[rev].stages.get(name) for rev in revs])
    row("total", [timings[rev].total for rev in revs])
    row("training-only re-run", [timings[rev].rerun for rev in revs])
    for rev in revs:
        timing = timings[rev]
        verdict = "within" if timing.total < TARGET_SECONDS else "over"
        print(f"{rev}: {verdict} the {TARGET_SECONDS} s target; re-run = {timing.rerun / timing.total:.2f} x the DAG, "
              f"stages run: {', '.join(timing.rerun_stages)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV", help="another commit to time in the same run, after HEAD")
    parser.add_argument("--models", default="sd2", help="model families to time, comma-separated (sd2,sd3)")
    args = parser.parse_args()
    revs = ["HEAD"] + ([args.against] if args.against else [])
    models = args.models.split(",")
    torch_seconds = torch_import_seconds()
    with tempfile.TemporaryDirectory(prefix="smoke-bench-") as tmp:
        timings = {(rev if len(models) == 1 else f"{rev} {model}"): measure(rev, Path(tmp), model)
                   for rev in revs for model in models}
    print_table(timings, torch_seconds)


if __name__ == "__main__":
    main()
