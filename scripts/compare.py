"""Experiments at a glance: one row per experiment, the settings that differ between them, the headline metrics.

`dvc exp show` lists every parameter that differs from the baseline commit (all the smoke profile's overrides, when
the baseline is the study) and every metric with its interval and count. The text table keeps what a comparison
needs; `--markdown` writes a report instead: the differing settings, then each metric as mean [ci_low, ci_high],
n=N and its p value, one column per experiment.

Run: python scripts/compare.py [--markdown] [EXPERIMENT ...]   (or `make compare`, `make compare-md`)
Without names: every finished experiment; with --markdown, the two study experiments when both have finished.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stylestudy.report.results import flatten  # noqa: E402  (run as a script: the repository root is not on the path)

HEADLINE = ("clip_score_base", "clip_score_finetuned", "clip_score_diff", "style_share_base", "style_share_finetuned",
            "loss")
STUDY = ("exp1-style-to-both", "exp2-style-to-clip-only")
ARMS = ("base", "finetuned", "diff")
# The rows of the Markdown metrics table, in this order, each where at least one experiment has it.
MARKDOWN_METRICS = (*(f"{family}_{arm}" for family in ("clip_score", "test_clip_score", "kid", "cmmd",
                                                         "style_similarity", "style_share", "test_style_share")
                      for arm in ARMS), "loss", "val_loss")


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


def markdown(rows: list[dict]) -> str:
    """A title, the settings that differ (one column per experiment), the metrics by experiment."""
    names = [row["name"] for row in rows]
    out = [f"# Experiments: {' vs '.join(names)}", "", "## Settings that differ", ""]
    keys = differing(rows)
    out += markdown_table(["param", *names], [[k, *(cell(row["params"].get(k)) for row in rows)] for k in keys]) \
        if keys else [f"No setting differs between {'these experiments' if len(rows) > 1 else 'one experiment'}."]
    out += ["", "## Metrics", "", "Each cell: mean [ci_low, ci_high], n = sample count, p = p value.", ""]
    present = [k for k in MARKDOWN_METRICS if any(row["metrics"].get(k) is not None for row in rows)]
    out += markdown_table(["metric", *names], [[k, *(metric_cell(row["metrics"], k) for row in rows)]
                                               for k in present]) if present else ["No metric to compare yet."]
    return "\n".join(out) + "\n"


def show() -> list[dict]:
    shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"error: dvc exp show failed: {shown.stderr.strip().splitlines()[-1:]}")
    return json.loads(shown.stdout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="a Markdown report instead of the text table")
    parser.add_argument("experiment", nargs="*", help="only these experiments, in this order")
    args = parser.parse_args(argv)
    rows = experiments(show())
    if not rows:
        sys.exit("no finished experiments yet: run `make demo` or `dvc exp run ...` first")
    rows = select(rows, args.experiment, args.markdown)
    if args.markdown:
        print(markdown(rows), end="")
        return
    lines = table(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())


if __name__ == "__main__":
    main()
