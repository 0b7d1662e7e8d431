"""The offline check of `dvc plots show`'s page, on a tiny DVC project of image plots built in tmp_path."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image
from plots_page import check_plots_page, find_chromium

if find_chromium() is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

IMAGE_PLOTS = ["figures/overview.png", "samples"]  # one PNG file, one folder of PNGs: as the pipeline declares them


def project(root: Path, plots: list) -> Path:
    """A DVC project whose dvc.yaml has only a top-level `plots:` section, with the images it declares."""
    subprocess.run(["git", "init", "-q"], cwd=root, check=True, timeout=30)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True, timeout=60)
    (root / "figures").mkdir()
    Image.new("RGB", (32, 24), "red").save(root / "figures/overview.png")
    (root / "samples").mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16), (0, 0, 80 * i)).save(root / f"samples/{i}.png")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    return root


def test_a_page_of_image_plots_works_offline(tmp_path):
    assert check_plots_page(project(tmp_path, IMAGE_PLOTS)) == []


def test_a_corrupt_png_is_reported(tmp_path):
    repo = project(tmp_path, IMAGE_PLOTS)
    (repo / "samples/1.png").write_bytes(b"these bytes are not an image")
    problems = check_plots_page(repo)
    assert len(problems) == 1 and "samples_1.png did not load" in problems[0], problems


def test_a_vega_plot_is_reported_because_it_needs_the_cdn(tmp_path):
    curve = {"loss": {"x": "step", "y": {"loss.csv": "loss"}}}
    repo = project(tmp_path, [*IMAGE_PLOTS, curve])
    (repo / "loss.csv").write_text("step,loss\n0,1.0\n1,0.5\n")
    problems = check_plots_page(repo)
    assert "vega plot loss stayed empty" in problems, problems
    assert any("cdn.jsdelivr.net" in problem and "off the machine" in problem for problem in problems), problems
