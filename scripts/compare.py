"""Experiments at a glance: one row per experiment, the settings that differ between them, the headline metrics.

`dvc exp show` lists every parameter that differs from the baseline commit (all the smoke profile's overrides, when
the baseline is the study) and every metric with its interval and count. The text table keeps what a comparison
needs; `--markdown` writes a report instead: the differing settings, then each metric as mean [ci_low, ci_high],
n=N and its p value, one column per experiment.

Replicates: experiments that differ only in `finetune.seed` are runs of one setting (docs/sweeps.md). Where a setting
has two runs or more, both forms add, per metric, the mean over runs with its 95% Student-t interval over runs beside
the mean within-run (image bootstrap) interval and the number of runs, and every other setting against the first
by Welch's t over runs, flagged below 3 runs (stylestudy/report/comparison.py). `--chart PATH` draws every setting
on style against held-out CLIP score with the Pareto front (the Markdown embeds it by file name: write both to one
folder, as `make compare-md` does).

Run: python scripts/compare.py [--markdown] [--chart PNG] [EXPERIMENT ...]   (or `make compare`, `make compare-md`)
Without names: every finished experiment; with --markdown, the two study experiments when both have finished.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

# Run as a script, the repository root is not on the path: hence the imports after this line (E402).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stylestudy.report import comparison  # noqa: E402
from stylestudy.report.results import flatten  # noqa: E402

HEADLINE = ("clip_score_base", "clip_score_finetuned", "clip_score_diff", "style_share_base", "style_share_finetuned",
            "loss")
STUDY = ("exp1-style-to-both", "exp2-style-to-clip-only")
ARMS = ("base", "finetuned", "diff")
# The rows of the Markdown metrics table, in this order, each where at least one experiment has it.
MARKDOWN_METRICS = (*(f"{family}_{arm}" for family in ("clip_score", "test_clip_score", "kid", "cmmd",
                                                         "style_similarity", "style_share", "test_style_share")
                      for arm in ARMS), "loss", "val_loss")
# What the text form shows over replicates: the fine-tuned model's values and the paired fine-tuned - base changes.
REPLICATE_METRICS = ("clip_score_finetuned", "test_clip_score_finetuned", "style_similarity_finetuned", "kid_finetuned",
                     "cmmd_finetuned", "style_share_finetuned", "clip_score_diff", "style_similarity_diff", "kid_diff",
                     "loss")


def experiments(shown: list[dict]) -> list[dict]:
    """Name, flat params and flat metrics of every experiment that finished, newest first as DVC lists them."""
    rows = []
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            rev = experiment["revs"][0]
            data = rev.get("data") or {}
            if rev.get("error") or not data.get("metrics"):
                continue
            params = flatten({k: v.get("data", {}) for k, v in data.get("params", {}).items()}.get("params.yaml", {}))
            metrics = {}
            for file in data["metrics"].values():
                metrics |= file.get("data", {})
            rows.append({"name": experiment.get("name") or rev["rev"][:7], "params": params, "metrics": metrics})
    return rows


def select(rows: list[dict], names: list[str], markdown: bool) -> list[dict]:
    """The experiments named, in that order; else the study pair (for --markdown, when both finished), else all."""
    by_name = {row["name"]: row for row in rows}
    if not names and markdown and all(name in by_name for name in STUDY):
        names = list(STUDY)
    for name in names:
        if name not in by_name:
            print(f"error: no experiment named {name} (dvc exp show lists: {', '.join(by_name) or 'none'})",
                  file=sys.stderr)
            sys.exit(2)
    return [by_name[name] for name in names] if names else rows


def cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else ("-" if value is None else str(value))


def differing(rows: list[dict]) -> list[str]:
    """The params whose values are not the same in every experiment."""
    keys = sorted({k for row in rows for k in row["params"]})
    return [k for k in keys if len({json.dumps(row["params"].get(k)) for row in rows}) > 1]


def table(rows: list[dict]) -> list[list[str]]:
    """Header and one line per experiment: name, the params whose values differ, the headline metrics."""
    keys = differing(rows)
    lines = [["experiment", *keys, *HEADLINE]]
    for row in rows:
        lines.append([row["name"], *(cell(row["params"].get(k)) for k in keys),
                      *(cell(row["metrics"].get(k)) for k in HEADLINE)])
    return lines


def metric_cell(metrics: dict, key: str) -> str:
    """"mean [ci_low, ci_high], n=N, p=P" with the companions the experiment has; "-" when it lacks the metric."""
    if metrics.get(key) is None:
        return "-"
    text = cell(metrics[key])
    low, high, n, p = (metrics.get(f"{key}_{part}") for part in ("ci_low", "ci_high", "n", "p"))
    if low is not None and high is not None:
        text += f" [{cell(low)}, {cell(high)}]"
    if n is not None:
        text += f", n={cell(n)}"
    if p is not None:
        text += f", p={cell(p)}"
    return text


def markdown_table(header: list[str], lines: list[list[str]]) -> list[str]:
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731  a "|" inside a cell would end it
    rows = [header, ["---"] * len(header), *lines]
    return ["| " + " | ".join(map(escape, row)) + " |" for row in rows]


def markdown(rows: list[dict], chart: Path | None = None) -> str:
    """A title, the settings that differ (one column per experiment), the chart, the metrics by experiment, and over
    training seeds where settings have replicates."""
    names = [row["name"] for row in rows]
    out = [f"# Experiments: {' vs '.join(names)}", "", "## Settings that differ", ""]
    keys = differing(rows)
    out += markdown_table(["param", *names], [[k, *(cell(row["params"].get(k)) for row in rows)] for k in keys]) \
        if keys else [f"No setting differs between {'these experiments' if len(rows) > 1 else 'one experiment'}."]
    if chart is not None:
        out += ["", f"![Style against prompt fidelity, one point per setting, Pareto front dashed]({chart.name})"]
    out += ["", "## Metrics", "", "Each cell: mean [ci_low, ci_high], n = sample count, p = p value.", ""]
    present = [k for k in MARKDOWN_METRICS if any(row["metrics"].get(k) is not None for row in rows)]
    out += markdown_table(["metric", *names], [[k, *(metric_cell(row["metrics"], k) for row in rows)]
                                               for k in present]) if present else ["No metric to compare yet."]
    out += replicate_markdown(comparison.group_replicates(rows))
    return "\n".join(out) + "\n"


def replicated(groups: list[comparison.Group]) -> bool:
    return any(len(group.names) > 1 for group in groups)


def summary_cell(summary: comparison.Summary | None) -> str:
    """"mean [low, high] over runs; within-run [low, high]; runs=N" (one run: its value and within-run interval)."""
    if summary is None:
        return "-"
    within = f"within-run [{cell(summary.within_low)}, {cell(summary.within_high)}]" \
        if not math.isnan(summary.within_low) else "no within-run interval"
    if summary.n < 2:
        return f"{cell(summary.mean)}; {within}; runs=1"
    return (f"{cell(summary.mean)} [{cell(summary.low)}, {cell(summary.high)}] over runs; {within}; runs={summary.n}"
            + ("" if math.isnan(summary.spread_ratio) else f"; between/within sd {summary.spread_ratio:.2g}"))


def difference_cell(diff: comparison.Difference | None) -> str:
    if diff is None:
        return "-"
    if math.isnan(diff.p):
        test = "no test (1 run)"
    elif math.isnan(diff.df):  # no spread in either setting's runs: Welch's t is 0 or infinite
        test = f"every run of each setting the same, p={cell(diff.p)}"
    else:
        test = f"Welch t={diff.t:.3g}, df={diff.df:.3g}, p={cell(diff.p)}"
    text = f"{cell(diff.diff)}, {test}"
    return text + (f" (runs {diff.n_a} vs {diff.n_b}: fewer than {comparison.MIN_REPLICATES})" if diff.flagged else "")


def replicate_lines(groups: list[comparison.Group], metrics: tuple[str, ...]) -> list[list[str]]:
    """[metric, one summary cell per group] for each metric some group has."""
    lines = [[key, *(summary_cell(comparison.summarise(g, key)) for g in groups)] for key in metrics]
    return [line for line in lines if any(value != "-" for value in line[1:])]


def difference_lines(groups: list[comparison.Group], metrics: tuple[str, ...]) -> list[list[str]]:
    """[metric, each later group minus the first] for each metric both have."""
    lines = [[key, *(difference_cell(comparison.difference(groups[0], g, key)) for g in groups[1:])] for key in metrics]
    return [line for line in lines if any(value != "-" for value in line[1:])]


def replicate_markdown(groups: list[comparison.Group]) -> list[str]:
    """The replicate and difference sections, when some setting has two runs or more."""
    if not replicated(groups):
        return []
    keys = comparison.differing_settings(groups)
    labels = [f"{comparison.label(g, keys)} ({', '.join(g.names)})" for g in groups]
    out = ["", "## Over training seeds", "", "Each cell: mean over runs [95% Student-t interval over runs]; the mean "
           "within-run 95% interval (bootstrap over images); runs; between-run sd / within-run standard error.", ""]
    out += markdown_table(["metric", *labels], replicate_lines(groups, MARKDOWN_METRICS))
    if len(groups) > 1:
        out += ["", f"## Differences from {labels[0]}", "", "Each cell: difference of the means over runs (this "
                f"setting minus the first), Welch's t test over runs; flagged below {comparison.MIN_REPLICATES} runs.",
                ""]
        out += markdown_table(["metric", *labels[1:]], difference_lines(groups, MARKDOWN_METRICS))
    return out


def replicate_text(groups: list[comparison.Group]) -> list[str]:
    """The replicate summaries and differences as plain lines."""
    if not replicated(groups):
        return []
    keys = comparison.differing_settings(groups)
    out = []
    for group in groups:
        out += ["", f"{comparison.label(group, keys)}: {len(group.names)} run(s), training seeds "
                f"{', '.join(map(str, group.seeds))} ({', '.join(group.names)})"]
        out += [f"  {key}: {text}" for key, text in replicate_lines([group], REPLICATE_METRICS)]
    for group in groups[1:]:
        out += ["", f"{comparison.label(group, keys)} minus {comparison.label(groups[0], keys)}:"]
        out += [f"  {key}: {text}" for key, text in difference_lines([groups[0], group], REPLICATE_METRICS)]
    return out


def show() -> list[dict]:
    shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"error: dvc exp show failed: {shown.stderr.strip().splitlines()[-1:]}")
    return json.loads(shown.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="a Markdown report instead of the text table")
    parser.add_argument("--chart", type=Path, help="also draw style against prompt fidelity to this PNG")
    parser.add_argument("experiment", nargs="*", help="only these experiments, in this order")
    args = parser.parse_args(argv)
    rows = experiments(show())
    if not rows:
        sys.exit("no finished experiments yet: run `make demo` or `dvc exp run ...` first")
    rows = select(rows, args.experiment, args.markdown)
    chart = args.chart if args.chart and comparison.comparison_chart(comparison.group_replicates(rows),
                                                                     args.chart) else None
    if args.chart and chart is None:
        print(f"no chart: no experiment has both metrics it draws; {args.chart} not written", file=sys.stderr)
    if args.markdown:
        print(markdown(rows, chart), end="")
        return
    lines = table(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())
    for line in replicate_text(comparison.group_replicates(rows)):
        print(line)
    if chart is not None:
        print(f"\nchart: {chart}")


if __name__ == "__main__":
    main()
