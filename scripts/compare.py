"""Experiments at a glance: one row per experiment, the settings that differ between them, the headline metrics.

`dvc exp show` lists every parameter that differs from the baseline commit (all the smoke profile's overrides, when
the baseline is the study) and every metric with its interval and count. This keeps what a comparison needs; the
intervals stay in `dvc exp show` and `dvc metrics diff`.

Run: python scripts/compare.py   (or `make compare`)
"""
from __future__ import annotations

import json
import subprocess
import sys

HEADLINE = ("clip_score_base", "clip_score_finetuned", "clip_score_diff", "style_share_base", "style_share_finetuned",
            "loss")


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


def table(rows: list[dict]) -> list[list[str]]:
    """Header and one line per experiment: name, the params whose values differ, the headline metrics."""
    keys = sorted({k for row in rows for k in row["params"]})
    differing = [k for k in keys if len({json.dumps(row["params"].get(k)) for row in rows}) > 1]
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))  # noqa: E731
    lines = [["experiment", *differing, *HEADLINE]]
    for row in rows:
        lines.append([row["name"], *(cell(row["params"].get(k)) for k in differing),
                      *(cell(row["metrics"].get(k)) for k in HEADLINE)])
    return lines


def main() -> None:
    shown = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if shown.returncode != 0:
        sys.exit(f"error: dvc exp show failed: {shown.stderr.strip().splitlines()[-1:]}")
    rows = experiments(json.loads(shown.stdout))
    if not rows:
        sys.exit("no finished experiments yet: run `make demo` or `dvc exp run ...` first")
    lines = table(rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths)).rstrip())


if __name__ == "__main__":
    main()
