"""The report's static figures: loss chart, CLIP score per prompt, distances to real sketches, image grids.

Charts are drawn with matplotlib's object API (`Figure` + `FigureCanvasAgg`, never pyplot), so no global backend,
figure registry or rcParams are touched and nothing leaks between calls; every style setting is passed explicitly.
matplotlib is imported inside the chart functions because importing it costs over half a second and `stages.report`
must stay fast to import. PNGs carry no software or date metadata, so the same inputs give the same bytes.
Image grids are built with PIL, which places pixels exactly.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

MODEL_COLORS = {"base": "#1f77b4", "finetuned": "#ff7f0e"}  # blue/orange: the pair colour-blind readers tell apart
MODEL_LABELS = {"base": "base", "finetuned": "fine-tuned", "vd": "Versatile Diffusion"}
BASELINE_COLORS = {"vd": "#7f7f7f"}  # a baseline (never fine-tuned) in neutral grey, beside the pair's two hues
VALIDATION_COLOR = "#222222"  # validation loss is also the fine-tuned model: black, not a third hue
TREND_COLOR = "#a64b00"  # the running mean of training loss: a darker shade of its orange
DPI = 100
TITLE_PT, LABEL_PT, TICK_PT, NOTE_PT = 14, 12, 11, 10
DISTANCE_PANELS = {
    "kid": ("KID (lower = closer to real sketches)", "KID"),
    "cmmd": ("CMMD x1000 (lower = closer)", "CMMD x1000"),
    "style_similarity": ("Style similarity, 100 x cos to real-sketch centroid (higher = closer)", "100 x cosine"),
}
PAD, GAP = 12, 8  # grid margins and the gutter between cells, pixels
FRAME = "#c0c0c0"  # a light outline, because white sketches on a white sheet would have no visible edge
TITLE_PX, LABEL_PX, CAPTION_PX = 24, 20, 16  # font sizes of grid text, pixels
MAX_CAPTION_LINES = 4


def _figure(width: float, height: float) -> Any:
    """A figure bound to its own Agg canvas (constrained layout keeps labels and legends inside it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Any, path: Path) -> None:
    """Write the PNG without the Software tag (the only metadata Agg adds), so bytes depend only on the inputs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, metadata={"Software": None})


def _style(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=TITLE_PT)
    ax.set_xlabel(xlabel, fontsize=LABEL_PT)
    ax.set_ylabel(ylabel, fontsize=LABEL_PT)
    ax.tick_params(labelsize=TICK_PT)
    ax.grid(True, color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)


def _errors(value: float, low: float, high: float) -> tuple[float, float]:
    """Error-bar lengths below and above; a percentile CI need not contain a biased estimate, and may be NaN."""
    below, above = value - low, high - value
    return (0.0 if math.isnan(below) else max(below, 0.0)), (0.0 if math.isnan(above) else max(above, 0.0))


def _plot_training_loss(ax: Any, loss: list[tuple[int, float]]) -> None:
    """The per-step loss as a thin line and, over enough steps, its running mean."""
    steps, values = zip(*loss)
    # A lone point draws no line, so it gets a marker to stay visible.
    ax.plot(steps, values, color=MODEL_COLORS["finetuned"], linewidth=0.9, marker="o" if len(loss) == 1 else None,
            label="training loss (per step)")
    if len(loss) >= 50:  # per-step diffusion loss is noisy: a running mean shows the trend
        window = max(len(loss) // 25, 5)
        mean = [sum(values[i - window + 1:i + 1]) / window for i in range(window - 1, len(values))]
        ax.plot(steps[window - 1:], mean, color=TREND_COLOR, linewidth=2.0,
                label=f"training loss, mean of {window} steps")


def loss_chart(loss: list[tuple[int, float]], val_loss: list[tuple[int, float]], path: Path) -> None:
    """Training loss per optimizer step (thin line) and validation loss (markers) on the same axes."""
    from matplotlib.ticker import MaxNLocator

    if not loss and not val_loss:
        raise ValueError("loss_chart needs at least one training or validation loss point")
    figure = _figure(9, 4.5)
    ax = figure.add_subplot()
    if loss:
        _plot_training_loss(ax, loss)
    if val_loss:
        steps, values = zip(*val_loss)
        ax.plot(steps, values, color=VALIDATION_COLOR, linewidth=1.5, marker="o", markersize=6, label="validation loss")
    _style(ax, "Fine-tuning loss", "optimizer step", "loss (MSE)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    first, last = min(s for s, _ in loss + val_loss), max(s for s, _ in loss + val_loss)
    if last - first < 2:  # else the axis spans a fraction of a step and the integer ticks vanish
        ax.set_xlim(first - 1, last + 1)
    ax.legend(fontsize=TICK_PT, loc="upper right")
    _save(figure, path)


def _scores_by_prompt(rows: list[dict]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """{prompt: {model: (score, ci_low, ci_high)}} in the rows' order; values may be CSV strings."""
    table: dict[str, dict[str, tuple[float, float, float]]] = {}
    for row in rows:
        scores = tuple(float(row[key]) for key in ("clip_score", "ci_low", "ci_high"))
        table.setdefault(row["prompt"], {})[row["model"]] = scores  # type: ignore[assignment]
    return table


def clip_per_prompt_chart(rows: list[dict], path: Path) -> None:
    """Horizontal grouped bars of CLIP score per prompt, base and fine-tuned (and a baseline that ran), with 95% CI
    error bars."""
    table = _scores_by_prompt(rows)
    if not table:
        raise ValueError("clip_per_prompt_chart needs at least one row")
    labels = [textwrap.fill(prompt, 40) for prompt in table]
    lines = max(label.count("\n") + 1 for label in labels)
    figure = _figure(10, 1.6 + len(table) * max(0.8, 0.2 * lines + 0.45))
    ax = figure.add_subplot()
    left, right = 0.0, 0.0  # the axis holds 0 and every interval: cosines can be negative
    colors = MODEL_COLORS | {m: c for m, c in BASELINE_COLORS.items() if any(m in scores for scores in table.values())}
    offsets, height = ((-0.2, 0.2), 0.38) if len(colors) == 2 else ((-0.27, 0.0, 0.27), 0.26)
    for offset, (model, color) in zip(offsets, colors.items()):
        label = MODEL_LABELS[model]  # on the model's first bar only, so the legend lists it once
        for y, scores in enumerate(table.values()):
            if model not in scores:
                continue
            value, low, high = scores[model]
            below, above = _errors(value, low, high)
            ax.barh(y + offset, value, height=height, color=color, xerr=[[below], [above]],
                    error_kw={"ecolor": "black", "capsize": 3, "linewidth": 1}, label=label)
            ax.text(max(value, 0) + above, y + offset, f" {value:.1f}", va="center", fontsize=NOTE_PT)
            left, right, label = min(left, value - below), max(right, max(value, 0) + above), None
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # inverted: first prompt on top, base above fine-tuned in each group
    span = (right - left) or 1.0
    ax.set_xlim(left - 0.05 * span if left < 0 else 0, right + 0.1 * span)
    if left < 0:
        ax.axvline(0, color="black", linewidth=0.8)
    _style(ax, "CLIP score per prompt", "CLIP score (100 x cosine similarity), mean and 95% CI", "")
    ax.grid(False, axis="y")
    ax.legend(fontsize=TICK_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(figure, path)


def _difference_label(metrics: dict, metric: str) -> str:
    """The paired fine-tuned minus base difference and its CI, when distance_metrics() wrote them."""
    diff = f"{metric}_diff"
    if not {diff, f"{diff}_ci_low", f"{diff}_ci_high"} <= metrics.keys():
        return ""
    low, high = metrics[f"{diff}_ci_low"], metrics[f"{diff}_ci_high"]
    return f"fine-tuned − base: {metrics[diff]:+.3g}\n95% CI [{low:+.3g}, {high:+.3g}]"


def _distance_panel(ax: Any, metrics: dict, metric: str) -> None:
    """Two bars, base and fine-tuned (three with a baseline that ran), with CI error bars and n in the tick labels."""
    title, ylabel = DISTANCE_PANELS[metric]
    ticks = []
    colors = MODEL_COLORS | {m: c for m, c in BASELINE_COLORS.items() if f"{metric}_{m}" in metrics}
    for x, (model, color) in enumerate(colors.items()):
        key = f"{metric}_{model}"
        value = float(metrics[key])
        # A metric without its CI keys is drawn without error bars.
        low, high = (float(metrics.get(f"{key}_ci_{end}", value)) for end in ("low", "high"))
        below, above = _errors(value, low, high)
        ax.bar(x, value, width=0.6, color=color, yerr=[[below], [above]],
               error_kw={"ecolor": "black", "capsize": 4, "linewidth": 1})
        ax.annotate(f"{value:.3g}", (x, value + above if value >= 0 else value - below), ha="center",
                    va="bottom" if value >= 0 else "top", fontsize=NOTE_PT, xytext=(0, 2), textcoords="offset points")
        n = f"\nn={metrics[f'{key}_n']}" if f"{key}_n" in metrics else ""
        ticks.append(textwrap.fill(MODEL_LABELS[model], 12) + n)  # "Versatile Diffusion" on two lines
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlim(-0.6, len(ticks) - 0.4)
    ax.margins(y=0.12)
    # Break before the parenthesis first, so each panel reads name, then direction.
    title = "\n".join(textwrap.fill(part, 28) for part in title.replace(" (", "\n(").split("\n"))
    _style(ax, title, _difference_label(metrics, metric), ylabel)
    ax.grid(False, axis="x")
    ax.axhline(0, color="black", linewidth=0.8)


def distance_chart(metrics: dict, path: Path) -> None:
    """One panel per distance metric present (KID, CMMD, style similarity): both models with 95% CIs."""
    present = [m for m in DISTANCE_PANELS if all(f"{m}_{model}" in metrics for model in MODEL_COLORS)]
    if not present:
        wanted = ", ".join(f"{m}_base/_finetuned" for m in DISTANCE_PANELS)
        raise ValueError(f"distance_chart: metrics hold none of {wanted}")
    width = 1.2 + 3.4 * len(present)
    figure = _figure(width, 5.2)
    for ax, metric in zip(figure.subplots(1, len(present), squeeze=False)[0], present):
        _distance_panel(ax, metrics, metric)
    # About 8 characters of 14 pt text per inch: a single panel needs the title on two lines.
    title = textwrap.fill("Generated images vs real sketches (mean and 95% CI)", int(width * 8))
    figure.suptitle(title, fontsize=TITLE_PT)
    _save(figure, path)


def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Pillow >= 10.1): no font files to ship or find."""
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[str], xy: tuple[int, int], font: ImageFont.FreeTypeFont) -> None:
    for i, line in enumerate(lines):
        draw.text((xy[0], xy[1] + i * _line_height(font)), line, fill="black", font=font)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """`image` as a cell x cell RGB square: NEAREST when only enlarging (tiny images stay crisp), else LANCZOS."""
    # Transparent sketches (RGBA, or palette with transparency) go onto white: a plain convert would show black.
    if "A" in image.getbands() or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    image = image.convert("RGB")
    if image.size == (cell, cell):
        return image
    enlarging = image.width <= cell and image.height <= cell
    return image.resize((cell, cell), Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS)


def _paste_framed(sheet: Image.Image, image: Image.Image, xy: tuple[int, int], cell: int) -> None:
    """Paste `image` fitted to a cell at `xy`, outlined just outside the cell."""
    sheet.paste(_fit(image, cell), xy)
    ImageDraw.Draw(sheet).rectangle((xy[0] - 1, xy[1] - 1, xy[0] + cell, xy[1] + cell), outline=FRAME)


def prompt_grid(images: dict[str, list[Image.Image]], title: str, cell: int = 256) -> Image.Image:
    """One row per model (the dict's order) labelled on the left, one column per image, the prompt wrapped above."""
    columns = max((len(row) for row in images.values()), default=0)
    if not columns:
        raise ValueError("prompt_grid needs at least one image")
    title_font, label_font = _font(TITLE_PX), _font(LABEL_PX)
    labels = [MODEL_LABELS.get(model, model) for model in images]
    left = PAD + math.ceil(max(label_font.getlength(label) for label in labels)) + PAD
    width = left + columns * cell + (columns - 1) * GAP + PAD
    lines = _wrap(title, title_font, width - 2 * PAD)
    top = PAD + len(lines) * _line_height(title_font) + PAD
    grid = Image.new("RGB", (width, top + len(images) * (cell + GAP) - GAP + PAD), "white")
    draw = ImageDraw.Draw(grid)
    _draw_lines(draw, lines, (PAD, PAD), title_font)
    for row, (label, row_images) in enumerate(zip(labels, images.values())):
        y = top + row * (cell + GAP)
        draw.text((PAD, y + cell // 2), label, fill="black", font=label_font, anchor="lm")
        for column, image in enumerate(row_images):
            _paste_framed(grid, image, (left + column * (cell + GAP), y), cell)
    return grid


def training_examples(images: list[Image.Image], captions: list[str], cell: int = 256) -> Image.Image:
    """A row of real training sketches, each with its caption wrapped below, under a title."""
    if not images or len(images) != len(captions):
        raise ValueError(f"training_examples needs as many captions as images, at least one ({len(images)} images, "
                         f"{len(captions)} captions)")
    title_font, caption_font = _font(TITLE_PX), _font(CAPTION_PX)
    width = PAD + len(images) * (cell + PAD)
    title = _wrap("Training images (the target style)", title_font, width - 2 * PAD)
    wrapped = [_wrap(caption, caption_font, cell) for caption in captions]
    for lines in wrapped:  # a long caption is cut, not allowed to stretch the whole row
        if len(lines) > MAX_CAPTION_LINES:
            lines[MAX_CAPTION_LINES - 1:] = [lines[MAX_CAPTION_LINES - 1] + " ..."]
    top = PAD + len(title) * _line_height(title_font) + PAD
    caption_height = max(len(lines) for lines in wrapped) * _line_height(caption_font)
    sheet = Image.new("RGB", (width, top + cell + GAP + caption_height + PAD), "white")
    draw = ImageDraw.Draw(sheet)
    _draw_lines(draw, title, (PAD, PAD), title_font)
    for i, (image, lines) in enumerate(zip(images, wrapped)):
        x = PAD + i * (cell + PAD)
        _paste_framed(sheet, image, (x, top), cell)
        _draw_lines(draw, lines, (x, top + cell + GAP), caption_font)
    return sheet
