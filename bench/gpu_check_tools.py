"""What bench/gpu_check.py's steps share: running a command under a time box with its output's tail, sampling the
device's memory while it runs, a step's JSON record, and a fresh one-commit copy of the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class MemorySampler:
    """The device's memory in use (nvidia-smi, every 0.5 s) while a command runs: the peak under each label."""

    def __init__(self) -> None:
        self.label, self.peaks, self.stop = "start", {}, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.wait(0.5):
            used = gpu_memory_mib()
            if used is not None:
                self.peaks[self.label] = max(self.peaks.get(self.label, 0), used)


def gpu_memory_mib() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True)
    return sum(int(x) for x in result.stdout.split()) if result.returncode == 0 else None


def run(command: list[str], cwd: Path, timeout: float, env: dict | None = None,
        on_line=None) -> tuple[int | str, float, str]:
    """(return code or "timeout", seconds, the output's tail), the command killed with its children at `timeout`."""
    started, lines = time.perf_counter(), []
    proc = subprocess.Popen(command, cwd=cwd, env=os.environ | (env or {}), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timer = threading.Timer(max(timeout, 1), lambda: os.killpg(proc.pid, 9))
    timer.start()
    for line in proc.stdout:
        lines.append(line)
        if on_line:
            on_line(line)
    proc.wait()
    timed_out = not timer.is_alive() and proc.returncode < 0
    timer.cancel()
    return ("timeout" if timed_out else proc.returncode), time.perf_counter() - started, "".join(lines[-40:])


def stage_times(marks: dict[str, float], ended: float, completed: bool) -> tuple[dict, set[str]]:
    """Each stage's seconds from the times `dvc repro` announced them, and the stages that ran to their end: every
    one followed by another, the last one too when the command completed."""
    names, starts = list(marks), list(marks.values())
    ends = starts[1:] + [ended]
    stages = {name: {"seconds": end - start, "finished": completed or i < len(names) - 1}
              for i, (name, start, end) in enumerate(zip(names, starts, ends))}
    return stages, {name for name, stage in stages.items() if stage["finished"]}


def step_record(command: list[str], code: int | str, seconds: float, tail: str, figures: dict | None = None) -> dict:
    status = "ok" if code == 0 else ("timeout" if code == "timeout" else "failed")
    return {"status": status, "command": " ".join(command), "seconds": seconds, "returncode": code,
            "figures": figures or {}, "log_tail": tail if status != "ok" else tail[-1500:]}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def fresh_copy(target: Path) -> Path:
    """The working tree as a new one-commit git repository (uncommitted work included, what the pipeline and the
    environment wrote left out): DVC needs git, and the copy carried to a GPU machine may have no .git."""
    top = {".git", ".venv", "gpu-wheels", "node_modules", "models", "reports", "scratch", "dvc_plots", "dvc.lock"}

    def ignore(folder: str, names: list[str]) -> list[str]:
        skip = {"top": top, "data": set(names) - {"own"}, ".dvc": {"cache", "tmp"}}.get(
            "top" if Path(folder) == REPO else Path(folder).name if Path(folder).parent == REPO else "", set())
        return [n for n in names if n in skip or n == "__pycache__"]

    shutil.copytree(REPO, target, ignore=ignore)
    env = {"GIT_AUTHOR_NAME": "gpu-check", "GIT_AUTHOR_EMAIL": "gpu-check@example.com",
           "GIT_COMMITTER_NAME": "gpu-check", "GIT_COMMITTER_EMAIL": "gpu-check@example.com"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "gpu check"]):
        subprocess.run(command, cwd=target, env=os.environ | env, check=True, capture_output=True)
    return target
