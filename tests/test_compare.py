"""scripts/compare.py on a hand-written `dvc exp show --json` (the shape dvc 3.67 prints): choice and format."""
import importlib.util

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("compare", REPO / "scripts/compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def experiment(name: str, params: dict, metrics: dict) -> dict:
    data = {"params": {"params.yaml": {"data": params}}, "metrics": {"reports/clip_eval.json": {"data": metrics}}}
    return {"name": name, "revs": [{"rev": "f" * 40, "name": name, "data": data, "error": None}]}


CLIP = {"clip_score_diff": 1.234567, "clip_score_diff_ci_low": 0.5, "clip_score_diff_ci_high": 2.0,
        "clip_score_diff_n": 16, "clip_score_diff_p": 0.0123456, "clip_score_base": 30.0}
SHOWN = [
    {"rev": "workspace", "data": {}, "error": None, "experiments": None},
    {"rev": "a" * 40, "name": "main", "experiments": [
        experiment("exp2-style-to-clip-only", {"generate": {"style_to_generator": "clip", "steps": 30}, "seed": 0},
                   CLIP | {"kid_diff": 0.01}),
        experiment("smoke-run", {"generate": {"style_to_generator": "both", "steps": 2}, "seed": 0}, {"loss": 0.1}),
        experiment("exp1-style-to-both", {"generate": {"style_to_generator": "both", "steps": 30}, "seed": 0},
                   CLIP | {"loss": 0.25, "step": 7}),
        {"name": "queued", "revs": [{"rev": "b" * 40, "name": "queued", "data": None, "error": None}]},
    ]},
]


@pytest.fixture
def shown(monkeypatch):
    monkeypatch.setattr(compare, "show", lambda: SHOWN)


def names(rows: list[dict]) -> list[str]:
    return [row["name"] for row in rows]


def test_only_finished_experiments_are_listed():
    assert names(compare.experiments(SHOWN)) == ["exp2-style-to-clip-only", "smoke-run", "exp1-style-to-both"]


def test_names_choose_the_experiments_in_the_order_given():
    rows = compare.experiments(SHOWN)
    assert names(compare.select(rows, ["smoke-run", "exp2-style-to-clip-only"], True)) == [
        "smoke-run", "exp2-style-to-clip-only"]


def test_markdown_defaults_to_the_study_pair_and_text_to_all():
    rows = compare.experiments(SHOWN)
    assert names(compare.select(rows, [], True)) == list(compare.STUDY)
    assert names(compare.select(rows, [], False)) == names(rows)
    without_exp2 = [row for row in rows if row["name"] != "exp2-style-to-clip-only"]
    assert names(compare.select(without_exp2, [], True)) == ["smoke-run", "exp1-style-to-both"]


def test_an_unknown_name_is_one_line_and_exit_2(shown, capsys):
    with pytest.raises(SystemExit) as exit:
        compare.main(["--markdown", "exp1-style-to-both", "nope"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: no experiment named nope (dvc exp show lists: exp2-style-to-clip-only, smoke-run, exp1-style-to-both)"]


def test_a_cell_holds_the_interval_count_and_p_value():
    assert compare.metric_cell(CLIP, "clip_score_diff") == "1.235 [0.5, 2], n=16, p=0.01235"
    assert compare.metric_cell(CLIP, "clip_score_base") == "30"
    assert compare.metric_cell(CLIP, "kid_diff") == "-"


def test_markdown_shows_only_differing_params_and_the_chosen_metric_families(shown, capsys):
    compare.main(["--markdown"])
    report = capsys.readouterr().out
    assert report.startswith("# Experiments: exp1-style-to-both vs exp2-style-to-clip-only\n")
    assert "| generate.style_to_generator | both | clip |" in report
    assert "generate.steps" not in report and "seed" not in report
    assert "| clip_score_diff | 1.235 [0.5, 2], n=16, p=0.01235 | 1.235 [0.5, 2], n=16, p=0.01235 |" in report
    assert "| kid_diff | - | 0.01 |" in report and "| loss | 0.25 | - |" in report
    assert "step |" not in report and "clip_score_diff_ci_low" not in report
    metrics = [line.split(" | ")[0][2:] for line in report.split("## Metrics")[1].splitlines() if line.startswith("| ")]
    assert metrics == ["metric", "---", "clip_score_base", "clip_score_diff", "kid_diff", "loss"]


def test_the_text_table_stays_the_default(shown, capsys):
    compare.main([])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["experiment", "generate.steps", "generate.style_to_generator", *compare.HEADLINE]
    assert [line.split()[0] for line in lines[1:]] == ["exp2-style-to-clip-only", "smoke-run", "exp1-style-to-both"]
