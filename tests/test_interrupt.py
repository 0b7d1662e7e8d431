"""A stage killed mid-way leaves no output that looks finished, and `dvc repro` of it afterwards completes
(finetune: resumes from its checkpoint).

On a fresh copy of the repository in the smoke setting, `dvc repro <stage>` and the stage under it are killed
together with SIGKILL, as a crash or an out-of-memory kill would, once the stage has written part of its output.
"""
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import fresh_copy, sh

from stylestudy.core.config import compose_params

pytestmark = pytest.mark.slow
# Slower than smoke, so that there is time to kill each stage between its first file and its last; finetune shorter.
SLOWER = {"fetch": {"data": {"n_images": 1500, "image_size": 512}},
          "generate": {"images_per_prompt": 4, "num_inference_steps": 8}, "finetune": {"max_train_steps": 30}}


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_stage():
    # Tiny models gain nothing from a second thread, and on a busy machine two threads that wait for each other are
    # many times slower: the stages that dvc starts inherit this.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A fresh copy with the smoke params (made slower as above) and the pretrained pipeline already fetched."""
    root = fresh_copy(tmp_path_factory.mktemp("interrupt"))
    compose_params(root / "params.yaml", root, ["profile=smoke"])
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["fetch"]["data"] |= SLOWER["fetch"]["data"]
    params["generate"] |= SLOWER["generate"]
    params["finetune"] |= SLOWER["finetune"]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(root, "dvc", "repro", "fetch@sd")
    return root


def kill_when(root: Path, stage: str, ready: Callable[[], bool]) -> None:
    """Start `dvc repro stage` and SIGKILL it and its children once `ready()` holds."""
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["dvc", "repro", stage], cwd=root, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"dvc repro {stage} ended before it could be killed"
        assert time.monotonic() < deadline, f"dvc repro {stage}: no partial output within 5 minutes"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: dvc and the stage it runs
    proc.wait()


def partial_files(out: Path) -> int:
    """Images in the stage's temporary folder (outputs.atomic_dir's sibling of `out`)."""
    return sum(1 for _ in out.parent.glob(f".{out.name}.tmp-*/*.png"))


@pytest.mark.parametrize("stage, out, started, total", [
    ("fetch@data", "data/raw", 100, 1500),
    ("generate@base", "reports/samples/base", 5, 28),  # 20 study images + 8 held-out; killed after batch 1 of 6
])
def test_killed_stage_leaves_no_finished_output_and_reruns(repo, stage, out, started, total):
    out = repo / out
    kill_when(repo, stage, lambda: partial_files(out) >= started)
    assert not out.exists()
    assert f"{stage}:" in sh(repo, "dvc", "status", stage)

    assert f"Running stage '{stage}'" in sh(repo, "dvc", "repro", stage)
    assert len(list(out.glob("*.png"))) == total
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "the killed run's temporary folder is left"
    assert "up to date" in sh(repo, "dvc", "status", stage)


def test_killed_finetune_resumes_under_dvc(repo):
    scratch, out = repo / "scratch/finetune", repo / "models/finetuned"
    kill_when(repo, "finetune", lambda: any(scratch.glob("step-*")))  # smoke: a checkpoint every 10 of 30 steps
    assert not out.exists()
    assert "finetune:" in sh(repo, "dvc", "status", "finetune")

    printed = sh(repo, "dvc", "repro", "finetune")
    assert re.search(r"resuming from checkpoint scratch/finetune/step-\d+ at step (10|20) ", printed), printed[-3000:]
    assert "Running stage 'encode'" not in printed and "cache latents" not in printed  # memory-mapped, not re-encoded
    assert (out / "unet/diffusion_pytorch_model.safetensors").is_file()
    assert not scratch.exists()
    assert "up to date" in sh(repo, "dvc", "status", "finetune")
