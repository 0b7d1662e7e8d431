"""dvc.yaml, the stage modules and params.yaml agree: one name in four places, every import a declared dependency."""
import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from stylestudy.core.config import SCHEMAS, compose_params

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
PACKAGE = "stylestudy"
ROOT_INIT = f"{PACKAGE}/__init__.py"


def definition(name: str) -> dict:
    stage = STAGES[name]
    return stage.get("do", stage)


def imported_modules(path: Path) -> set[str]:
    """The stylestudy modules a file imports, as files relative to the repository, transitively, with the
    __init__.py of every package on the way (Python runs those too)."""
    seen: set[str] = set()
    todo = [path]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE)):
                continue
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for name in names:
                module = REPO / (name.replace(".", "/") + ".py")
                package = REPO / name.replace(".", "/") / "__init__.py"
                for found in (module, package):
                    relative = str(found.relative_to(REPO))
                    if found.is_file() and relative not in seen:
                        seen.add(relative)
                        todo.append(found)
    return seen


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_command_runs_its_own_module(name):
    assert definition(name)["cmd"].startswith(f"python -m stages.{name} ")
    assert (REPO / "stages" / f"{name}.py").is_file()


@pytest.mark.parametrize("name", list(STAGES))
def test_every_module_a_stage_imports_is_covered_by_its_deps(name):
    deps = [d for d in definition(name)["deps"] if d.startswith((f"{PACKAGE}/", "stages/"))]
    covered = lambda module: any(module == d or module.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
    needed = imported_modules(REPO / "stages" / f"{name}.py") - {ROOT_INIT}
    assert f"stages/{name}.py" in deps
    assert sorted(m for m in needed if not covered(m)) == []
    # and no dependency on code it never runs: every declared folder or file holds something it imports
    assert [d for d in deps if d != f"stages/{name}.py" and not any(covered(m) and m.startswith(d) for m in needed)] \
        == []


def test_the_package_root_holds_no_code():
    """Every stage imports stylestudy/__init__.py, which no stage lists: it must stay a docstring only."""
    tree = ast.parse((REPO / ROOT_INIT).read_text())
    assert all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in tree.body)


def test_stages_holds_the_dvc_stages_only():
    modules = {p.stem for p in (REPO / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(STAGES)


def test_generated_python_files_are_ignored_by_dvc():
    """Python writes __pycache__ beside the modules it imports: a folder dependency must not change with it."""
    ignored = (REPO / ".dvcignore").read_text().split()
    assert "__pycache__/" in ignored and "*.pyc" in ignored


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_reads_the_params_sections_it_declares(name):
    source = (REPO / "stages" / f"{name}.py").read_text()
    declared = [p if isinstance(p, str) else next(iter(p)) for p in definition(name)["params"]]
    if "${item.also}" in declared:  # fetch: the section each item reads beside its own
        declared.remove("${item.also}")
        declared += [item["also"] for item in STAGES[name]["foreach"].values()]
    if declared == ["params.yaml"]:  # the report shows every setting, so it depends on all of them
        assert "PARAMS_FILE.read_text()" in source
        declared = []
    sections = {re.sub(r"\..*", "", p) for p in declared}
    read = set(re.findall(r'load_params\("(\w+)"', source)) | ({"shared"} if "load_shared()" in source else set())
    if name == "report":
        read -= {"report"}
    assert sections == read
    assert all(section in SCHEMAS for section in sections)


def committed_params() -> str:
    """params.yaml as git's index holds it: `dvc exp run` (e.g. `make demo`) rewrites only the working copy."""
    shown = subprocess.run(["git", "show", ":params.yaml"], cwd=REPO, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (REPO / "params.yaml").read_text()


def test_committed_params_are_the_default_composition(tmp_path):
    compose_params(tmp_path / "params.yaml", REPO, [])
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == yaml.safe_load(committed_params()), (
        "params.yaml differs from the composition of conf/: compose it (stylestudy.core.config.compose_params) and git add it")


def test_smoke_profile_composes_valid_params(tmp_path):
    from stages import fetch
    from stylestudy.core.config import load_params, load_shared

    path = tmp_path / "params.yaml"
    compose_params(path, REPO, ["profile=smoke"])
    assert load_shared(path)["profile"] == "smoke"  # validates the whole file
    assert {kind: p["source"] for kind, p in load_params("fetch", path).items()} == fetch.OFFLINE_SOURCE
