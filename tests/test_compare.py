"""scripts/compare.py on a hand-written `dvc exp show --json` (the shape dvc 3.67 prints): choice and format; the
replicate groups, their tests and the chart (stylestudy/report/comparison.py) on synthetic runs."""
import importlib.util
import math

import pytest
from conftest import REPO
from PIL import Image

from stylestudy.evaluate.statistics import welch_t_test
from stylestudy.report import comparison

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


# ---------------------------------------------------------------------- replicates over training seeds, the chart

def replicate(name: str, lr: float, seed: int, style: float, clip: float, half: float = 1.0) -> dict:
    """One run as `dvc exp show --json` lists it, with the two charted metrics and their within-run intervals."""
    metrics = {}
    for key, value in (("style_similarity_finetuned", style), ("test_clip_score_finetuned", clip)):
        metrics |= {key: value, f"{key}_ci_low": value - half, f"{key}_ci_high": value + half, f"{key}_n": 8}
    return experiment(name, {"finetune": {"learning_rate": lr, "seed": seed}, "shared": {"seed": 42}}, metrics)


# Setting A: three seeds; B: three seeds, more style and less fidelity; C: one run, beaten by A on both axes.
REPLICATES = [{"rev": "a" * 40, "name": "main", "experiments": [
    replicate("a1", 1e-4, 1, 50.0, 20.0), replicate("b1", 3e-4, 1, 53.0, 18.0),
    replicate("a2", 1e-4, 2, 51.0, 21.0), replicate("b2", 3e-4, 2, 54.0, 18.5),
    replicate("a3", 1e-4, 3, 52.0, 22.0), replicate("b3", 3e-4, 3, 55.0, 17.5),
    replicate("c1", 1e-3, 1, 49.0, 19.0), replicate("a1-again", 1e-4, 1, 50.0, 20.0),
]}]


def test_runs_that_differ_only_in_the_training_seed_are_one_group():
    groups = comparison.group_replicates(compare.experiments(REPLICATES))
    assert [g.names for g in groups] == [("a1", "a2", "a3"), ("b1", "b2", "b3"), ("c1",)]
    assert groups[0].seeds == (1, 2, 3) and "finetune.seed" not in groups[0].params  # a1-again: not a replicate
    assert comparison.differing_settings(groups) == ["finetune.learning_rate"]
    assert comparison.label(groups[1], ["finetune.learning_rate"]) == "learning_rate=0.0003"


def test_a_summary_has_the_t_interval_over_runs_beside_the_within_run_interval():
    """A's style: runs 50, 51, 52: mean 51, s = 1, t_{0.975, 2} / sqrt(3) either side; within-run [50, 52] on
    average (each ±1, so standard error 1 / 1.96 and between/within sd ratio 1.96)."""
    a = comparison.group_replicates(compare.experiments(REPLICATES))[0]
    s = comparison.summarise(a, "style_similarity_finetuned")
    half = 4.302652729911275 / 3**0.5
    assert (s.mean, s.low, s.high, s.within_low, s.within_high, s.n) == pytest.approx((51, 51 - half, 51 + half, 50,
                                                                                      52, 3))
    assert s.spread_ratio == pytest.approx(comparison.Z_95)
    assert comparison.summarise(a, "kid_finetuned") is None


def test_a_difference_is_b_minus_a_by_welch_over_runs_and_flagged_below_three_runs():
    a, b, c = comparison.group_replicates(compare.experiments(REPLICATES))
    d = comparison.difference(a, b, "style_similarity_finetuned")
    # B - A = 3 over runs of sd 1 each: t = 3 / sqrt(1/3 + 1/3), df = 4 (equal sizes and spreads)
    assert (d.diff, d.t, d.df, d.n_a, d.n_b, d.flagged) == pytest.approx((3.0, 3 / (2 / 3) ** 0.5, 4.0, 3, 3, False))
    assert d.p == pytest.approx(welch_t_test([53.0, 54.0, 55.0], [50.0, 51.0, 52.0])[2]) and d.p < 0.05
    lone = comparison.difference(a, c, "style_similarity_finetuned")
    assert lone.flagged and math.isnan(lone.p) and lone.diff == pytest.approx(-2.0)


def test_the_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(50.0, 20.0), (53.0, 18.0), (49.0, 19.0), (53.0, 18.0 - 1e-9), (48.0, 21.0)]
    assert comparison.pareto_front(points) == [4, 0, 1]


def test_compare_prints_replicates_and_a_test_and_draws_the_chart(monkeypatch, capsys, tmp_path):
    """Through the `dvc exp show --json` shape: the text form, the Markdown form and the PNG."""
    monkeypatch.setattr(compare, "show", lambda: REPLICATES)
    chart = tmp_path / "comparison.png"
    compare.main(["--chart", str(chart)])
    text = capsys.readouterr().out
    assert "learning_rate=0.0001: 3 run(s), training seeds 1, 2, 3 (a1, a2, a3)" in text
    assert "  style_similarity_finetuned: 51 [48.52, 53.48] over runs; within-run [50, 52]; runs=3" in text
    assert "  style_similarity_finetuned: 3, Welch t=3.67, df=4, p=0.02131" in text
    assert "  style_similarity_finetuned: -2, no test (1 run) (runs 3 vs 1: fewer than 3)" in text
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size == (900, 600)
    compare.main(["--markdown", "--chart", str(chart)])
    report = capsys.readouterr().out
    assert "](comparison.png)" in report and "## Over training seeds" in report
    assert "| style_similarity_finetuned | 3, Welch t=3.67, df=4, p=0.02131 |" in report


def test_no_chart_without_its_metrics(shown, capsys, tmp_path):
    compare.main(["--chart", str(tmp_path / "comparison.png")])
    assert "no chart" in capsys.readouterr().err and not (tmp_path / "comparison.png").exists()
    assert "## Over training seeds" not in compare.markdown(compare.experiments(SHOWN))


def test_a_difference_between_settings_without_spread_says_so_instead_of_a_t():
    """Every run of both settings gave one value (smoke's style_share: 1 everywhere): no t, no df, p from the means."""
    same = comparison.Difference("style_share_finetuned", 0.0, *welch_t_test([1.0] * 3, [1.0] * 3), 3, 3)
    moved = comparison.Difference("style_share_finetuned", 0.5, *welch_t_test([1.5] * 3, [1.0] * 3), 3, 3)
    assert compare.difference_cell(same) == "0, every run of each setting the same, p=1"
    assert compare.difference_cell(moved) == "0.5, every run of each setting the same, p=0"


def test_the_placeholder_chart_says_no_experiment_was_compared(tmp_path) -> None:
    """A clone's committed chart is this one (issue 32): it names no runs, so nobody reads another's as their own."""
    comparison.placeholder_chart(tmp_path / "a.png")
    comparison.placeholder_chart(tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert Image.open(tmp_path / "a.png").size == Image.open(REPO / "reports/comparison.png").size
