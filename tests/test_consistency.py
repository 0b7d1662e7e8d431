"""dvc.yaml, the stage modules and params.yaml agree: one name in four places, every import a declared dependency."""
import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.config import SCHEMAS, compose_params

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def definition(name: str) -> dict:
    stage = STAGES[name]
    return stage.get("do", stage)


def local_imports(module: str) -> set[str]:
    """The stages.* modules a module imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        tree = ast.parse((REPO / "stages" / f"{todo.pop()}.py").read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                names = [node.module.split(".")[1]]
            for name in set(names) - seen:
                seen.add(name)
                todo.append(name)
    return seen


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_command_runs_its_own_module(name):
    assert definition(name)["cmd"].startswith(f"python -m stages.{name} ")
    assert (REPO / "stages" / f"{name}.py").is_file()


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_depends_on_exactly_the_code_it_imports(name):
    declared = {d for d in definition(name)["deps"] if d.startswith("stages/")}
    expected = {f"stages/{m}.py" for m in local_imports(name) | {name}}
    assert declared == expected


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_reads_the_params_sections_it_declares(name):
    source = (REPO / "stages" / f"{name}.py").read_text()
    declared = [p if isinstance(p, str) else next(iter(p)) for p in definition(name)["params"]]
    if declared == ["params.yaml"]:  # the report shows every setting, so it depends on all of them
        assert "PARAMS_FILE.read_text()" in source
        declared = []
    sections = {re.sub(r"\..*", "", p) for p in declared}
    read = set(re.findall(r'load_params\("(\w+)"', source)) | ({"shared"} if "load_shared()" in source else set())
    if name == "report":
        read -= {"report"}
    assert sections == read
    assert all(section in SCHEMAS for section in sections)


def test_every_stage_module_is_a_stage_or_a_shared_module():
    shared = {"config", "outputs", "data", "models", "evaluation", "sketches", "training", "builders", "latents",
              "hub", "imagefolder", "components", "lora", "losses", "modelcard", "validation", "embeddings",
              "statistics", "figures", "results", "launch"}
    modules = {p.stem for p in (REPO / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(STAGES) | shared


def committed_params() -> str:
    """params.yaml as git's index holds it: `dvc exp run` (e.g. `make demo`) rewrites only the working copy."""
    shown = subprocess.run(["git", "show", ":params.yaml"], cwd=REPO, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()


def test_committed_params_are_the_default_composition(tmp_path):
    compose_params(tmp_path / "params.yaml", REPO, [])
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == yaml.safe_load(committed_params()), (
        "params.yaml differs from the composition of conf/: compose it (stages.config.compose_params) and git add it")


def test_smoke_profile_composes_valid_params(tmp_path):
    from stages import fetch
    from stages.config import load_params, load_shared

    path = tmp_path / "params.yaml"
    compose_params(path, REPO, ["profile=smoke"])
    assert load_shared(path)["profile"] == "smoke"  # validates the whole file
    assert {kind: p["source"] for kind, p in load_params("fetch", path).items()} == fetch.OFFLINE_SOURCE
