"""report: the study's slides as a file: settings, metrics tables, training curve, before/after grids, captions.

Reads params.yaml (all of it: the settings that ran), SAMPLES_DIR, the metrics and detail tables of split, finetune,
clip_eval and blip_check (REPORTS_DIR) and params `report`. Writes OUT_MD (Markdown) and FIGURES_DIR (PNG grids, one
per prompt, base row above fine-tuned row, and the training loss curve).

Run: python -m stages.report SAMPLES_DIR REPORTS_DIR OUT_MD FIGURES_DIR (params.yaml is validated whole first)
Example: python -m stages.report reports/samples reports reports/report.md reports/figures
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from stages.config import PARAMS_FILE, cli, load_params, parse_args, require_path
from stages.evaluation import MODELS, read_samples
from stages.outputs import atomic_dir, atomic_file, read_csv

log = logging.getLogger(__name__)

CELL = 128  # grid cells are at least this many pixels, so tiny smoke images stay visible
LABEL_WIDTH = 80


def prompt_grid(rows_by_model: dict[str, list[dict]], prompt_index: int) -> Image.Image:
    """One row per model (base above fine-tuned), one column per image of the prompt."""
    cells = {m: [Image.open(r["path"]).convert("RGB") for r in rows if r["prompt_index"] == prompt_index]
             for m, rows in rows_by_model.items()}
    size = max(CELL, cells[MODELS[0]][0].width)
    columns = len(cells[MODELS[0]])
    grid = Image.new("RGB", (LABEL_WIDTH + columns * size, len(MODELS) * size), "white")
    draw = ImageDraw.Draw(grid)
    for row, model in enumerate(MODELS):
        draw.text((4, row * size + size // 2), model, fill="black")
        for column, image in enumerate(cells[model]):
            grid.paste(image.resize((size, size), Image.NEAREST), (LABEL_WIDTH + column * size, row * size))
    return grid


def loss_curve(points: list[tuple[int, float]], width: int = 480, height: int = 240) -> Image.Image:
    """A plain line chart of loss against step."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    margin = 30
    steps, losses = [s for s, _ in points], [v for _, v in points]
    low, high = min(losses), max(losses)
    span_x, span_y = max(max(steps) - min(steps), 1), max(high - low, 1e-12)
    xy = [(margin + (s - min(steps)) / span_x * (width - 2 * margin),
           height - margin - (v - low) / span_y * (height - 2 * margin)) for s, v in points]
    draw.rectangle((margin, margin, width - margin, height - margin), outline="gray")
    draw.line(xy if len(xy) > 1 else xy * 2, fill="black", width=2)
    draw.text((margin, 8), f"training loss ({low:.4f} .. {high:.4f}) over {max(steps)} steps", fill="black")
    return image


def read_loss(reports: Path) -> list[tuple[int, float]]:
    path = reports / "finetune" / "plots" / "metrics" / "loss.tsv"
    with require_path(path, "run the finetune stage first").open() as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle, delimiter="\t")]


def cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def metrics_table(metrics: dict) -> str:
    return table(["metric", "value"], [[k, v] for k, v in metrics.items()])


def per_prompt_table(long_rows: list[dict]) -> str:
    """CLIP score per prompt, one column per model."""
    score = {(r["prompt"], r["model"]): float(r["clip_score"]) for r in long_rows}
    prompts = list(dict.fromkeys(r["prompt"] for r in long_rows))
    return table(["prompt", *MODELS], [[p, *(score[p, m] for m in MODELS)] for p in prompts])


def write_figures(rows_by_model: dict, reports: Path, figures: Path, n_prompts: int) -> None:
    with atomic_dir(figures) as tmp:
        for i in range(n_prompts):
            prompt_grid(rows_by_model, i).save(tmp / f"grid_{i:02d}.png")
        loss_curve(read_loss(reports)).save(tmp / "loss.png")


def markdown(params: dict, reports: Path, rows_by_model: dict, figures_rel: str, p: dict) -> str:
    """The report text."""
    load = lambda name: json.loads(require_path(reports / name, f"run the stage that writes {name}").read_text())  # noqa: E731
    prompts = list(dict.fromkeys(r["prompt"] for r in rows_by_model[MODELS[0]]))
    captions = read_csv(require_path(reports / "blip_check" / "captions.csv", "run blip_check first"))
    parts = [
        f"# Style fine-tune of Stable Diffusion, \"{params['generate']['style_prompt']} ...\": report "
        f"({params['shared']['profile']} profile)",
        "## Settings that ran\n\n```yaml\n" + yaml.safe_dump(params, sort_keys=False) + "```",
        "## Data split\n\n" + metrics_table(load("split.json")),
        f"## Training\n\n![training loss]({figures_rel}/loss.png)\n\n" + metrics_table(load("finetune/metrics.json")),
        "## CLIP score (100 x cosine similarity)\n\n" + metrics_table(load("clip_eval.json")),
        "Per prompt:\n\n" + per_prompt_table(read_csv(reports / "clip_eval" / "per_prompt.csv")),
        "## BLIP captions naming the style\n\n" + metrics_table(load("blip_check.json")),
        "## Before / after, per prompt (top row base, bottom row fine-tuned)",
    ]
    parts += [f"### {prompt}\n\n![{prompt}]({figures_rel}/grid_{i:02d}.png)" for i, prompt in enumerate(prompts)]
    parts.append("## Sample captions")
    for model in MODELS:
        sample = [row for row in captions if row["model"] == model][: p["captions_per_model"]]
        parts.append(f"**{model}**\n\n" + "\n".join(f"- {row['prompt']}: *{row['caption']}*" for row in sample))
    return "\n\n".join(parts) + "\n"


def run(samples: Path, reports: Path, out_md: Path, figures: Path, p: dict) -> None:
    """Write the figures and the Markdown report."""
    params = yaml.safe_load(PARAMS_FILE.read_text())
    rows_by_model = read_samples(samples)
    n_prompts = len({r["prompt_index"] for r in rows_by_model[MODELS[0]]})
    write_figures(rows_by_model, reports, figures, n_prompts)
    text = markdown(params, reports, rows_by_model, os.path.relpath(figures, out_md.parent), p)
    with atomic_file(out_md) as tmp:
        tmp.write_text(text)
    log.info("report written to %s", out_md)


@cli
def main() -> None:
    args = parse_args(__doc__, {
        "samples": "the folder holding base/ and finetuned/ samples (reports/samples)",
        "reports": "the folder holding the other stages' metrics and tables (reports)",
        "out_md": "the Markdown report to write (reports/report.md)",
        "figures": "the folder for the report's figures (reports/figures)",
    })
    run(args.samples, args.reports, args.out_md, args.figures, load_params("report"))


if __name__ == "__main__":
    main()
