"""Sharing a finished run, reviewing a change between branches and a queued sweep, through the real DVC commands.

One fresh copy runs the smoke pipeline once (`dvc exp run -S profile=smoke`, what `make demo` runs) and commits what a
shared run needs in git: params.yaml, dvc.lock and the metrics JSON. The remotes are folders on disk: a DVC remote
(`dvc remote add -d shared <dir>`, committed in .dvc/config so that every clone pushes and pulls there) and a bare git
repository as `origin`. The other tests reuse that run and DVC's run-cache: they change a generation setting only
(`generate.guidance_scale`), so fetching and fine-tuning are never run again, and the value CHANGED is shared by the
experiment, the branch and the sweep so that its generation runs once in the module.

Stages and outputs are read from the copy (`dvc stage list`, dvc.lock), never listed here: the tests hold whatever the
pipeline is.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import GIT_IDENTITY, composed, fresh_copy, sh

SMOKE = ("-S", "profile=smoke")
SETTING = "generate.guidance_scale"  # generation only: every experiment below restores the fine-tune
CHANGED = 5.0
SWEEP = (CHANGED, 6.0)
EXPERIMENT = "guidance-5"
BRANCH = "lower-guidance"
pytestmark = pytest.mark.slow


def dvc_json(cwd: Path, *args: str):
    """A dvc command's `--json` answer, parsed from its stdout alone (warnings go to stderr)."""
    result = subprocess.run([str(Path(sys.executable).parent / "dvc"), *args, "--json"], cwd=cwd,
                            env=os.environ | GIT_IDENTITY, capture_output=True, text=True)
    assert result.returncode == 0, f"dvc {' '.join(args)} --json failed:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def outputs(root: Path) -> list[str]:
    """Every output of every stage, as dvc.lock records them."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return [out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]


def in_git(root: Path, paths: list[str]) -> set[str]:
    """The paths among `paths` that git tracks (outputs with `cache: false`: the metrics)."""
    return {path for path in paths if sh(root, "git", "ls-files", "--", path).strip()}


def tree_hashes(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a folder by its path inside it; {} when there is nothing."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def output_hashes(root: Path) -> dict[str, dict[str, str]]:
    return {out: tree_hashes(root / out) for out in outputs(root)}


def ran(log: str, stages: list[str]) -> set[str]:
    return {stage for stage in stages if f"Running stage '{stage}'" in log}


def flat(params: dict, prefix: str = "") -> dict:
    """Nested params as `dvc params diff` names them: `generate.guidance_scale`."""
    items = {}
    for key, value in params.items():
        items |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return items


def experiments(root: Path) -> dict[str, dict]:
    """`dvc exp show` of HEAD's experiments by name: flat params, metrics by file, the queue executor's state."""
    found = {}
    for commit in dvc_json(root, "exp", "show"):
        for exp in commit.get("experiments") or []:
            data = exp["revs"][0]["data"]
            found[exp["name"]] = {"params": flat(data["params"]["params.yaml"]["data"]),
                                  "metrics": {file: m["data"] for file, m in data["metrics"].items()},
                                  "state": (exp.get("executor") or {}).get("state")}
    return found


def clone(origin: Path, target: Path) -> Path:
    sh(target.parent, "git", "clone", "-q", str(origin), str(target))
    return target


def back_to_main(project: SimpleNamespace) -> None:
    """The committed smoke run in the workspace again: git's files, then DVC's outputs from the cache."""
    project.run("git", "checkout", "-q", "-f", "main")
    project.run("dvc", "checkout")
    assert dvc_json(project.root, "status") == {}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> SimpleNamespace:
    """A fresh copy with a DVC remote and a git `origin` on disk, after one committed smoke run."""
    remotes = tmp_path_factory.mktemp("remotes")
    root = fresh_copy(tmp_path_factory.mktemp("project"))
    run = partial(sh, root)
    run("dvc", "remote", "add", "-d", "shared", str(remotes / "dvc"))
    run("git", "commit", "-q", "-am", "DVC remote on disk")
    log = run("dvc", "exp", "run", *SMOKE)
    run("git", "add", "-A")
    run("git", "commit", "-q", "-m", "smoke run: params.yaml, dvc.lock, metrics")
    origin = remotes / "origin.git"
    sh(remotes, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    run("git", "remote", "add", "origin", str(origin))
    run("git", "push", "-q", "origin", "main")
    stages = run("dvc", "stage", "list", "--name-only").split()
    assert ran(log, stages) == set(stages), log
    return SimpleNamespace(root=root, run=run, origin=origin, stages=stages)


def test_push_then_pull_into_an_empty_cache_gives_every_output_back_bit_for_bit(project):
    root, run = project.root, project.run
    unpushed = dvc_json(root, "status", "-c")
    assert unpushed and set(unpushed.values()) == {"new"}
    run("dvc", "push", "--run-cache")
    assert dvc_json(root, "status", "-c") == {}

    outs = outputs(root)
    committed = in_git(root, outs)
    assert committed and all(path.endswith(".json") for path in committed)  # the metrics: in git, not pushed
    before = output_hashes(root)
    run_cache = tree_hashes(root / ".dvc/cache/runs")
    assert run_cache and all(before.values())
    shutil.rmtree(root / ".dvc/cache")
    for out in outs:
        shutil.rmtree(root / out) if (root / out).is_dir() else (root / out).unlink()

    run("dvc", "pull", "--run-cache")
    status = dvc_json(root, "status")
    missing = {path for entries in status.values() for entry in entries if isinstance(entry, dict)
               for path, state in entry.get("changed outs", {}).items() if state == "deleted"}
    assert missing == committed  # `dvc pull` brings every cached output; the metrics come from git
    run("git", "checkout", "--", *committed)
    assert output_hashes(root) == before
    assert tree_hashes(root / ".dvc/cache/runs") == run_cache  # so a clone restores stages instead of running them
    assert dvc_json(root, "status") == {}
    assert run("dvc", "status", "-c").strip() == "Cache and remote 'shared' are in sync."
    assert dvc_json(root, "status", "-c") == {}


def test_a_colleague_gets_the_fine_tuned_model_by_artifact_version_or_git_revision(project, tmp_path):
    artifacts = yaml.safe_load((project.root / "dvc.yaml").read_text())["artifacts"]
    name, artifact = next((name, a) for name, a in artifacts.items() if a["type"] == "model")
    model = tree_hashes(project.root / artifact["path"])
    assert model
    project.run("dvc", "push")
    project.run("git", "tag", "-a", f"{name}@v1.0.0", "-m", "the smoke fine-tune", "main")  # a GTO version tag
    project.run("git", "push", "-q", "origin", f"{name}@v1.0.0")

    sh(tmp_path, "dvc", "artifacts", "get", str(project.origin), name, "--rev", "v1.0.0", "-o", "by-version")
    sh(tmp_path, "dvc", "get", str(project.origin), artifact["path"], "--rev", "main", "-o", "by-revision")
    assert tree_hashes(tmp_path / "by-version") == model
    assert tree_hashes(tmp_path / "by-revision") == model


def test_a_named_experiment_travels_through_a_bare_git_remote(project, tmp_path):
    main_metrics = json.loads((project.root / "reports/clip_eval.json").read_text())
    log = project.run("dvc", "exp", "run", "-n", EXPERIMENT, *SMOKE, "-S", f"{SETTING}={CHANGED}")
    assert "finetune" not in ran(log, project.stages)
    made = output_hashes(project.root)
    here = experiments(project.root)[EXPERIMENT]
    assert "Pushed experiment" in project.run("dvc", "exp", "push", "origin", EXPERIMENT)
    back_to_main(project)

    colleague = clone(project.origin, tmp_path / "colleague")
    assert EXPERIMENT not in experiments(colleague)
    sh(colleague, "dvc", "exp", "pull", "origin", EXPERIMENT)
    there = experiments(colleague)[EXPERIMENT]
    assert there["params"][SETTING] == CHANGED and there["metrics"] == here["metrics"]
    assert there["metrics"]["reports/clip_eval.json"]["clip_score_base"] != main_metrics["clip_score_base"]

    assert not (colleague / "models/finetuned").exists()
    sh(colleague, "dvc", "exp", "apply", EXPERIMENT)
    assert "Everything is up to date." in sh(colleague, "dvc", "pull")  # `dvc exp pull` fetched its outputs too
    assert output_hashes(colleague) == made
    sh(tmp_path, "dvc", "get", str(project.origin), "reports/samples/finetuned", "--rev", EXPERIMENT, "-o", "samples")
    assert tree_hashes(tmp_path / "samples") == made["reports/samples/finetuned"]


def test_two_branches_differ_by_exactly_their_setting_and_the_metrics_it_moved(project, tmp_path):
    run = project.run
    run("git", "checkout", "-q", "-b", BRANCH, "main")
    try:
        log = run("dvc", "exp", "run", *SMOKE, "-S", f"{SETTING}={CHANGED}")
        assert "finetune" not in ran(log, project.stages)
        run("git", "add", "conf", "params.yaml", "dvc.lock", "reports")  # what the README says to commit
        run("git", "commit", "-q", "-m", f"{SETTING}={CHANGED}")
        assert run("git", "status", "--porcelain", "--untracked-files=all") == ""  # and nothing was left out
        run("dvc", "push")
        run("git", "push", "-q", "origin", BRANCH)
    finally:
        back_to_main(project)

    # A reviewer's clone, nothing pulled: params and metrics are in git, the plots' images on the DVC remote.
    reviewer, theirs = clone(project.origin, tmp_path / "reviewer"), f"origin/{BRANCH}"
    old = composed("profile=smoke")["generate"]["guidance_scale"]
    assert dvc_json(reviewer, "params", "diff", "main", theirs) == {
        "params.yaml": {SETTING: {"old": old, "new": CHANGED, "diff": CHANGED - old}}}

    expected = {}
    for file in sorted(in_git(reviewer, outputs(reviewer))):
        a, b = (json.loads(sh(reviewer, "git", "show", f"{rev}:{file}")) for rev in ("main", theirs))
        moved = {key: (a.get(key), b.get(key)) for key in a | b if a.get(key) != b.get(key)}
        expected |= {file: moved} if moved else {}
    shown = dvc_json(reviewer, "metrics", "diff", "main", theirs)
    assert {file: {key: (v["old"], v["new"]) for key, v in keys.items()} for file, keys in shown.items()} == expected
    assert "reports/clip_eval.json" in expected and "reports/finetune/metrics.json" not in expected

    plots = dvc_json(reviewer, "plots", "diff", "main", theirs)["data"]
    changed = set()
    for name, entries in plots.items():
        assert sorted(rev for entry in entries for rev in entry["revisions"]) == sorted(["main", theirs]), name
        if entries[0]["type"] == "vega":  # a training curve: one chart, both revisions' points in its data
            rows = entries[0]["content"]["data"]["values"]
            points = [[{k: v for k, v in row.items() if k != "rev"} for row in rows if row["rev"] == rev]
                      for rev in ("main", theirs)]
            assert points[0], name
            changed |= {name} if points[0] != points[1] else set()
        elif len({Path(image["url"]).read_bytes() for image in entries}) > 1:
            changed.add(name)
    assert {"loss", "grad_norm"} <= set(plots)
    assert changed and not any(name.startswith("reports/finetune/") or plots[name][0]["type"] == "vega"
                               for name in changed)  # training did not move
    assert not (reviewer / ".dvc/cache").exists()


def test_a_two_item_sweep_runs_from_the_queue_with_the_fine_tune_restored(project):
    run = project.run
    assert run("git", "branch", "--show-current").strip() == "main"
    names = {value: f"sweep-guidance-{value:g}" for value in SWEEP}
    for value, name in names.items():
        run("dvc", "exp", "run", "--queue", "-n", name, *SMOKE, "-S", f"{SETTING}={value}")
    run("dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + 600
    try:
        while re.search(r"\b(Queued|Running)\b", status := run("dvc", "queue", "status")):
            assert time.monotonic() < deadline, f"the sweep did not finish in 10 minutes:\n{status}"
            time.sleep(2)
    finally:
        run("dvc", "queue", "stop")  # the worker goes once its task ends, even after a failed wait
    for name in names.values():
        assert re.search(rf"^\S+\s+{name}\s+.*\bSuccess\s*$", status, re.M), status

    shown = experiments(project.root)
    smoke, study = composed("profile=smoke"), composed()
    assert smoke["finetune"]["epochs"] != study["finetune"]["epochs"]
    for value, name in names.items():
        exp = shown[name]
        assert exp["state"] == "success" and exp["params"][SETTING] == value
        assert exp["params"]["finetune.epochs"] == smoke["finetune"]["epochs"]  # each queued run kept the profile
        assert "clip_score_finetuned" in exp["metrics"]["reports/clip_eval.json"]
        log = run("dvc", "queue", "logs", name)
        assert "Stage 'finetune' didn't change, skipping" in log or "Stage 'finetune' is cached" in log, log
        assert not {stage for stage in ran(log, project.stages) if stage.startswith(("fetch", "finetune"))}, log
    a, b = (shown[name] for name in names.values())
    assert {key for key in a["params"] | b["params"] if a["params"].get(key) != b["params"].get(key)} == {SETTING}
    assert a["metrics"]["reports/clip_eval.json"] != b["metrics"]["reports/clip_eval.json"]
    new = ran(run("dvc", "queue", "logs", names[SWEEP[-1]]), project.stages)  # a value no other test runs
    assert any(stage.startswith("generate") for stage in new), new
