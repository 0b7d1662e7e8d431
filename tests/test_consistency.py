"""dvc.yaml, the stage modules and params.yaml agree: one name in four places, every import a declared dependency."""
import ast
import re
from pathlib import Path

import pytest
import yaml

from stages.config import compose_params

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
    assert all(section in yaml.safe_load((REPO / "params.yaml").read_text()) for section in sections)


def test_every_stage_module_is_a_stage_or_a_shared_module():
    shared = {"config", "outputs", "data", "models", "evaluation", "sketches", "training", "builders", "latents"}
    modules = {p.stem for p in (REPO / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(STAGES) | shared


def test_committed_params_are_the_default_composition(tmp_path):
    compose_params(tmp_path / "params.yaml", REPO, [])
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == yaml.safe_load((REPO / "params.yaml").read_text())


def test_smoke_profile_composes_valid_params(tmp_path):
    from stages import blip_check, clip_eval, fetch, finetune, generate, report, split
    from stages.config import load_params, load_shared

    path = tmp_path / "params.yaml"
    compose_params(path, REPO, ["profile=smoke"])
    assert load_shared(path)["profile"] == "smoke"
    for module in (split, finetune, generate, clip_eval, blip_check, report):
        load_params(module.__name__.split(".")[-1], module.SCHEMA, path)
    for kind in fetch.KINDS:
        assert load_params("fetch", {kind: fetch.schema(kind)}, path)[kind]["source"] == fetch.OFFLINE_SOURCE[kind]
