"""stylestudy/report/figures.py: every chart writes a readable PNG whose bytes depend only on its inputs; the image grids keep
every cell at full size, in its place, under a title band with real text."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stylestudy.report.figures import (MODEL_COLORS, TREND_COLOR, clip_per_prompt_chart, distance_chart, loss_chart, prompt_grid,
                            training_examples)

LOSS = [(step, 0.15 + 0.05 * math.exp(-step / 30) + 0.02 * math.sin(step)) for step in range(1, 121)]
VAL_LOSS = [(step, 0.16 + 0.03 * math.exp(-step / 30)) for step in range(0, 121, 20)]
COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


def clip_rows(n_prompts: int) -> list[dict]:
    """clip_eval's per-prompt rows as read back from CSV (strings), both models per prompt."""
    rows = []
    for i in range(n_prompts):
        prompt = f"prompt {i}: a drawing of " + "a very long scene description " * (i % 3)
        for model, score in (("base", 25 + i % 4), ("finetuned", 28 + i % 4)):
            rows.append({"prompt": prompt, "model": model, "clip_score": str(score), "ci_low": str(score - 1),
                         "ci_high": str(score + 1)})
    return rows


def distance_metrics(*metrics: str) -> dict:
    """distance_metrics()'s flat keys for `metrics`, with a KID CI that excludes its estimate (as bootstrap CIs can)."""
    out: dict = {"n_real_sketches": 40}
    for metric, (base, tuned) in {"kid": (0.04, 0.01), "cmmd": (2.1, 0.9), "style_similarity": (61.0, 78.0)}.items():
        if metric in metrics:
            for model, value in (("base", base), ("finetuned", tuned)):
                out |= {f"{metric}_{model}": value, f"{metric}_{model}_ci_low": value * 1.05,
                        f"{metric}_{model}_ci_high": value * 1.2, f"{metric}_{model}_n": 30}
    return out


def colour_count(image: Image.Image, hex_colour: str) -> int:
    """How many pixels are exactly `hex_colour` (bars are filled solid, so their insides are)."""
    rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return int(np.all(np.asarray(image.convert("RGB")) == rgb, axis=-1).sum())


def bars_drawn(image: Image.Image, min_pixels: int = 5000) -> bool:
    """Whether both models' bars are on the chart: far more of each colour than a legend patch holds."""
    return all(colour_count(image, colour) >= min_pixels for colour in MODEL_COLORS.values())


def open_png(path: Path, min_size: tuple[int, int] = (400, 300)) -> Image.Image:
    assert path.stat().st_size > 5000
    image = Image.open(path)
    assert image.format == "PNG"
    assert min_size[0] <= image.width <= 3000 and min_size[1] <= image.height <= 3000
    return image


CHARTS = {
    "loss": lambda path: loss_chart(LOSS, VAL_LOSS, path),
    "clip": lambda path: clip_per_prompt_chart(clip_rows(5), path),
    "distance": lambda path: distance_chart(distance_metrics("kid", "cmmd", "style_similarity"), path),
}


@pytest.mark.parametrize("name", CHARTS)
def test_chart_bytes_depend_only_on_inputs(tmp_path: Path, name: str) -> None:
    CHARTS[name](tmp_path / "a" / "chart.png")  # the folder is created
    CHARTS[name](tmp_path / "b.png")
    open_png(tmp_path / "b.png")
    assert (tmp_path / "a" / "chart.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert b"Software" not in (tmp_path / "b.png").read_bytes()


def test_loss_chart_shows_what_it_is_given(tmp_path: Path) -> None:
    loss_chart(LOSS, VAL_LOSS, tmp_path / "both.png")
    loss_chart(LOSS, [], tmp_path / "train.png")
    loss_chart([(1, 0.2)], [], tmp_path / "one.png")
    one = open_png(tmp_path / "one.png")
    # The lone point sits mid-axes; the legend (upper right) is cropped off, so its orange handle does not count.
    assert colour_count(one.crop((0, 0, one.width * 2 // 3, one.height)), MODEL_COLORS["finetuned"]) > 20
    assert (tmp_path / "both.png").read_bytes() != (tmp_path / "train.png").read_bytes()
    assert colour_count(open_png(tmp_path / "train.png"), TREND_COLOR) > 500  # the running mean over 120 steps
    assert colour_count(one, TREND_COLOR) == 0
    with pytest.raises(ValueError, match="at least one"):
        loss_chart([], [], tmp_path / "none.png")


@pytest.mark.parametrize("n_prompts", [5, 12])
def test_clip_per_prompt_chart_draws_both_models(tmp_path: Path, n_prompts: int) -> None:
    clip_per_prompt_chart(clip_rows(n_prompts), tmp_path / "clip.png")
    image = open_png(tmp_path / "clip.png")
    assert bars_drawn(image, min_pixels=1000 * n_prompts)
    assert image.height >= 60 * n_prompts  # the chart grows with the prompts instead of squeezing them


def test_distance_chart_leaves_out_missing_metrics(tmp_path: Path) -> None:
    distance_chart(distance_metrics("kid", "cmmd", "style_similarity"), tmp_path / "all.png")
    distance_chart(distance_metrics("style_similarity"), tmp_path / "style.png")
    full, style = open_png(tmp_path / "all.png"), open_png(tmp_path / "style.png", (300, 300))
    assert style.width < full.width / 2  # one panel of three
    assert bars_drawn(full) and bars_drawn(style)
    with pytest.raises(ValueError, match="style_similarity"):
        distance_chart({"n_real_sketches": 40, "kid_base": 0.1}, tmp_path / "none.png")


def solid(colour: tuple[int, int, int], size: int) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def cell_box(sheet: Image.Image, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """The bounding box (left, top, right, bottom) of `colour`, which must fill it exactly."""
    mask = np.all(np.asarray(sheet) == colour, axis=-1)
    rows, columns = np.nonzero(mask)
    box = (int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1)
    assert mask.sum() == (box[2] - box[0]) * (box[3] - box[1]), f"{colour} is not one solid block"
    return box


def dark_rows(region: Image.Image) -> np.ndarray:
    """Indices of the rows of `region` holding text-dark pixels."""
    return np.nonzero((np.asarray(region.convert("L")) < 100).any(axis=1))[0]


def test_prompt_grid_keeps_every_cell_full_size_in_place() -> None:
    # Tiny base images are enlarged, large fine-tuned ones shrunk: both must come out exactly 256 px square.
    images = {"base": [solid(c, 32) for c in COLOURS[:6]], "finetuned": [solid(c, 512) for c in COLOURS[6:]]}
    grid = prompt_grid(images, "Sketchy dog playing")
    assert grid.width >= 6 * 256 and grid.height >= 2 * 256
    boxes = {c: cell_box(grid, c) for c in COLOURS}
    for row, colours in enumerate((COLOURS[:6], COLOURS[6:])):
        lefts = [boxes[c][0] for c in colours]
        assert lefts == sorted(lefts) and len(set(lefts)) == 6  # columns in the given order
        for c in colours:
            assert boxes[c][2] - boxes[c][0] == 256 and boxes[c][3] - boxes[c][1] == 256
            assert boxes[c][1] == boxes[colours[0]][1]  # one row per model
    assert boxes[COLOURS[0]][3] <= boxes[COLOURS[6]][1]  # base above fine-tuned
    top, left = boxes[COLOURS[0]][1], boxes[COLOURS[0]][0]
    title = dark_rows(grid.crop((0, 0, grid.width, top)))
    assert len(title) and title.max() - title.min() + 1 >= 16  # a title of readable height
    for c in (COLOURS[0], COLOURS[6]):  # a row label left of each row
        assert len(dark_rows(grid.crop((0, boxes[c][1], left, boxes[c][3]))))


def test_prompt_grid_wraps_long_titles_and_keeps_tiny_images_crisp() -> None:
    red, blue = (255, 0, 0), (0, 0, 255)
    checker = Image.new("RGB", (2, 2), red)
    checker.putpixel((0, 1), blue)
    checker.putpixel((1, 0), blue)
    images = {"base": [checker] * 3, "finetuned": [checker] * 3}
    short, long = prompt_grid(images, "a cat", cell=300), prompt_grid(images, "a very long prompt " * 20, cell=300)
    assert long.width == short.width and long.height > short.height + 40  # wrapped, not widened
    pixels = np.asarray(short)
    for colour in (red, blue):  # NEAREST: each cell is four solid 150 px squares, no blended edges
        assert np.all(pixels == colour, axis=-1).sum() == 6 * 2 * 150 * 150
    with pytest.raises(ValueError):
        prompt_grid({"base": []}, "empty")


def test_training_examples_puts_captions_under_their_images() -> None:
    captions = ["a horse", "a pencil drawing of a house with a garden and a tall chimney on a hill", "dog"]
    sheet = training_examples([solid(c, 512) for c in COLOURS[:3]], captions)
    assert sheet.width >= 3 * 256
    boxes = [cell_box(sheet, c) for c in COLOURS[:3]]
    assert all(b[2] - b[0] == 256 and b[3] - b[1] == 256 for b in boxes)
    title = dark_rows(sheet.crop((0, 0, sheet.width, boxes[0][1])))
    assert len(title) and title.max() - title.min() + 1 >= 16
    below = [dark_rows(sheet.crop((b[0], b[3], b[2], sheet.height))) for b in boxes]
    assert all(len(rows) for rows in below)
    assert below[1].max() > below[0].max() + 10  # the long caption wrapped onto a second line
    clear = training_examples([Image.new("RGBA", (64, 64), (0, 0, 0, 0))], ["transparent"])
    assert clear.getpixel((clear.width // 2, clear.height // 2)) == (255, 255, 255)  # on white, not black
    with pytest.raises(ValueError, match="captions"):
        training_examples([solid(COLOURS[0], 64)], [])


def test_figures_import_matplotlib_lazily_and_leave_its_state_alone(tmp_path: Path) -> None:
    # A fresh interpreter: this process may have imported matplotlib already for the tests above.
    script = f"""
import sys
import stylestudy.report.figures as figures
assert "matplotlib" not in sys.modules, "importing stylestudy.report.figures must not import matplotlib"
import matplotlib
rc = matplotlib.rcParams.copy()  # copy(), not get_backend() or dict(): those resolve the backend through pyplot
figures.loss_chart([(1, 0.3), (2, 0.2)], [(2, 0.25)], __import__("pathlib").Path({str(tmp_path / "loss.png")!r}))
assert "matplotlib.pyplot" not in sys.modules, "charts must not go through pyplot"
assert matplotlib.rcParams.copy() == rc, "charts must not change rcParams"
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])
