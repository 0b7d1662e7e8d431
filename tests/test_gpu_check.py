"""bench/gpu_check.sh: without a GPU it stops at once with one line; its dry run (every step at tiny size on the CPU)
writes every step's JSON with the keys a reader of a GPU run needs, and the summary, so the script cannot rot before a
GPU comes."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
STEPS = ["01_full_profile", "02_finetune_speed", "03_generate_speed", "04_sd3", "05_ddp", "06_determinism",
         "07_compiled"]
STAGES = {"fetch@sd", "fetch@data", "split", "encode", "finetune", "generate@base", "generate@finetuned",
          "embed_real", "clip_eval", "blip_check", "report"}


def test_without_a_gpu_and_without_dry_run_it_stops_at_once_with_one_line(tmp_path) -> None:
    result = subprocess.run([str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert (result.stdout + result.stderr).strip().count("\n") == 0
    assert "no CUDA GPU here" in result.stdout and "--dry-run" in result.stdout


@pytest.mark.slow
def test_the_dry_run_writes_every_step_and_the_summary(tmp_path) -> None:
    out = tmp_path / "check"
    result = subprocess.run([str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    environment = json.loads((out / "00_environment.json").read_text())
    assert environment["dry_run"] and {"device", "driver", "libraries", "environment_setup"} <= environment.keys()
    assert {"torch", "diffusers", "bitsandbytes"} <= environment["libraries"].keys()
    steps = {name: json.loads((out / f"{name}.json").read_text()) for name in STEPS}
    for name, step in steps.items():
        assert step["dry_run"] and {"step", "name", "status", "seconds"} <= step.keys(), name
        assert ("command" in step) != (step["status"] == "skipped") or "parts" in step, name
    for name in ("01_full_profile", "02_finetune_speed", "03_generate_speed", "05_ddp", "06_determinism"):
        assert steps[name]["status"] == "ok", f"{name}: {steps[name].get('log_tail', '')[-2000:]}"
    stages = steps["01_full_profile"]["figures"]["stages"]
    assert STAGES <= stages.keys() and all(s["seconds"] > 0 for s in stages.values())
    assert "profile=full" in steps["01_full_profile"]["figures"]["overrides"]
    assert {"a", "b", "c", "d"} <= steps["02_finetune_speed"]["figures"]["configurations"].keys()
    assert {"psnr_ours_db", "evaluation"} <= steps["03_generate_speed"]["figures"].keys()
    assert {"identical", "max_abs_difference"} <= steps["06_determinism"]["figures"].keys()
    assert steps["06_determinism"]["figures"]["identical"]  # on the CPU the same run gives the same weights
    sd3_script = (REPO / "bench/sd3_memory.py").is_file()
    assert steps["04_sd3"]["status"] == ("ok" if sd3_script else "skipped")
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (dry run") and all(name[3:] in summary for name in STEPS)
