"""Comparing experiments over training replicates: experiments that differ only in `finetune.seed` form one group;
each metric gets the mean over the group's runs with a Student-t interval over runs, beside the within-run (image
bootstrap) interval; two settings are compared by Welch's t over runs; the chart puts every group on style against
prompt fidelity with the Pareto front drawn.

An experiment row is what scripts/compare.py reads from `dvc exp show --json`: {"name", "params", "metrics"}, params
and metrics flat (dotted keys).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from stylestudy.evaluate.statistics import t_interval, welch_t_test

TRAINING_SEED = "finetune.seed"
MIN_REPLICATES = 3  # fewer runs per setting: the interval over runs is wide and the test has little power
Z_95 = 1.959963984540054  # a within-run 95% interval is about ±1.96 standard errors


@dataclass(frozen=True)
class Group:
    """Experiments with the same settings but for the training seed: the replicates of one setting."""

    names: tuple[str, ...]
    params: dict
    seeds: tuple
    metrics: tuple[dict, ...]

    def values(self, key: str) -> list[float]:
        return [float(m[key]) for m in self.metrics if m.get(key) is not None]


@dataclass(frozen=True)
class Summary:
    """One metric over a group's runs: mean and t-interval over runs, the mean within-run interval, the run count,
    and the between-run standard deviation over the within-run standard error (NaN where either is missing)."""

    mean: float
    low: float
    high: float
    within_low: float
    within_high: float
    n: int
    spread_ratio: float


@dataclass(frozen=True)
class Difference:
    """Setting b minus setting a on one metric, tested over runs by Welch's t (NaN below 2 runs in either)."""

    metric: str
    diff: float
    t: float
    df: float
    p: float
    n_a: int
    n_b: int

    @property
    def flagged(self) -> bool:
        return min(self.n_a, self.n_b) < MIN_REPLICATES


def group_replicates(rows: list[dict]) -> list[Group]:
    """Experiments grouped by every setting but the training seed, groups in the order of their first run. Runs with
    the same settings and seed are one run made again (or restored from the cache), not a replicate: the first
    listed stands for them."""
    groups: dict[str, dict[str, dict]] = {}
    for row in rows:
        settings = {k: v for k, v in row["params"].items() if k != TRAINING_SEED}
        seed = json.dumps(row["params"].get(TRAINING_SEED))
        groups.setdefault(json.dumps(settings, sort_keys=True), {}).setdefault(seed, row)
    return [Group(tuple(r["name"] for r in members), {k: v for k, v in members[0]["params"].items()
                                                       if k != TRAINING_SEED},
                  tuple(r["params"].get(TRAINING_SEED) for r in members), tuple(r["metrics"] for r in members))
            for members in (list(by_seed.values()) for by_seed in groups.values())]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarise(group: Group, key: str) -> Summary | None:
    """The metric over the group's runs; None when no run has it."""
    values = group.values(key)
    if not values:
        return None
    mean, low, high = t_interval(values)
    within_low = _mean([float(m[f"{key}_ci_low"]) for m in group.metrics if m.get(f"{key}_ci_low") is not None])
    within_high = _mean([float(m[f"{key}_ci_high"]) for m in group.metrics if m.get(f"{key}_ci_high") is not None])
    between_sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    within_se = (within_high - within_low) / (2 * Z_95)
    ratio = between_sd / within_se if within_se > 0 else math.nan
    return Summary(mean, low, high, within_low, within_high, len(values), ratio)


def difference(a: Group, b: Group, key: str) -> Difference | None:
    """b - a on the metric over runs; None when either group lacks it."""
    va, vb = a.values(key), b.values(key)
    if not va or not vb:
        return None
    t, df, p = welch_t_test(vb, va) if min(len(va), len(vb)) >= 2 else (math.nan, math.nan, math.nan)
    return Difference(key, _mean(vb) - _mean(va), t, df, p, len(va), len(vb))


def differing_settings(groups: list[Group]) -> list[str]:
    """The settings (training seed aside) whose values are not the same in every group."""
    keys = sorted({k for g in groups for k in g.params})
    return [k for k in keys if len({json.dumps(g.params.get(k)) for g in groups}) > 1]


def label(group: Group, keys: list[str], limit: int = 3) -> str:
    """The group's values of the settings that differ (the last part of each key), else its first experiment."""
    parts = [f"{k.split('.')[-1]}={group.params.get(k)}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"+{len(keys) - limit} more")
    return ", ".join(parts) if parts else group.names[0]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (both higher is better), sorted by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


def chart_point(group: Group, key: str) -> tuple[float, float, float, str] | None:
    """Mean and 95% bounds for the chart: over runs with 2 or more, else the single run's within-run interval."""
    summary = summarise(group, key)
    if summary is None:
        return None
    if summary.n >= 2:
        return summary.mean, summary.low, summary.high, "runs"
    return summary.mean, summary.within_low, summary.within_high, "images"


def comparison_chart(groups: list[Group], path: Path, x_key: str = "style_similarity_finetuned",
                     y_key: str = "test_clip_score_finetuned") -> bool:
    """Style (x, higher: closer to the held-out real sketches) against prompt fidelity (y, held-out CLIP score): one
    point per group with 95% error bars, its runs as faint dots, the Pareto front as a dashed line. False (and no
    file) when no group has both metrics."""
    from stylestudy.report.figures import _figure, _save, _style

    keys = differing_settings(groups)
    drawn = [(g, chart_point(g, x_key), chart_point(g, y_key)) for g in groups]
    drawn = [(g, x, y) for g, x, y in drawn if x is not None and y is not None]
    if not drawn:
        return False
    figure = _figure(9, 6)
    ax = figure.add_subplot()
    for index, (group, x, y) in enumerate(drawn):
        color = f"C{index % 10}"
        runs = [(float(m[x_key]), float(m[y_key])) for m in group.metrics
                if m.get(x_key) is not None and m.get(y_key) is not None]
        ax.scatter(*zip(*runs), color=color, alpha=0.35, s=18, zorder=2)
        ax.errorbar(x[0], y[0], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]], fmt="o",
                    color=color, markersize=8, capsize=4, zorder=3,
                    label=f"{label(group, keys)} ({len(group.names)} run{'s' if len(group.names) > 1 else ''})")
        ax.annotate(label(group, keys), (x[0], y[0]), xytext=(6, 6), textcoords="offset points", fontsize=9,
                    color=color)
    front = pareto_front([(x[0], y[0]) for _, x, y in drawn])
    ax.plot([drawn[i][1][0] for i in front], [drawn[i][2][0] for i in front], linestyle="--", color="#555555",
            linewidth=1.2, marker="o", markersize=16, markerfacecolor="none", zorder=1,  # ringed: a front of one shows
            label="Pareto front (no other setting higher on both)")
    _style(ax, "Which setting wins: style against prompt fidelity (fine-tuned models)",
           f"style: {x_key} (higher = closer to held-out real sketches)", f"prompt fidelity: {y_key}")
    ax.margins(x=0.15, y=0.1)  # room for the labels beside the outermost points
    ax.legend(fontsize=9, loc="best")
    note = "error bars: 95% t-interval over training seeds (≥2 runs), else the run's image-bootstrap interval"
    figure.supxlabel(note, fontsize=9, color="#555555")
    _save(figure, path)
    return True


def placeholder_chart(path: Path) -> None:
    """The chart a clone starts with: it says that no experiment of this workspace has been compared yet, and how to
    draw the real one (a chart of somebody else's runs would read as the user's own)."""
    from stylestudy.report.figures import _figure, _save

    figure = _figure(9, 6)
    ax = figure.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.6, "No experiments of this workspace compared yet", ha="center", va="center", fontsize=16)
    ax.text(0.5, 0.42, "Run experiments (dvc exp run ..., docs/sweeps.md), then `make compare`:\nthis chart then "
            "shows style against prompt fidelity, one point per setting.", ha="center", va="center", fontsize=11,
            color="#555555")
    _save(figure, path)
