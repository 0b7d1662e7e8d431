"""The offline check of `dvc plots show`'s page, on tiny DVC projects of image and line plots built in tmp_path."""
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from PIL import Image
from plots_page import check_plots_page, find_chromium, page_state

pytestmark = pytest.mark.slow  # a browser: the full tier

if find_chromium() is None:
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)

IMAGE_PLOTS = ["figures/overview.png", "samples"]  # one PNG file, one folder of PNGs: as the pipeline declares them
CURVE = {"loss": {"x": "step", "y": {"loss.csv": "loss"}}}
TEMPLATE = REPO / ".dvc/plots_page.html"  # written by `make setup` (scripts/offline_plots_page.py)


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
    """DVC's own page, without the project's template: the check can fail."""
    repo = project(tmp_path, [*IMAGE_PLOTS, CURVE])
    (repo / "loss.csv").write_text("step,loss\n0,1.0\n1,0.5\n")
    problems = check_plots_page(repo)
    assert "vega plot loss stayed empty" in problems, problems
    assert any("cdn.jsdelivr.net" in problem and "off the machine" in problem for problem in problems), problems


def test_a_line_plot_draws_offline_with_the_projects_template(tmp_path):
    """The project's .dvc/config and the template it names: Vega is in the page, the curve is drawn."""
    assert TEMPLATE.is_file(), f"{TEMPLATE} is missing: run `make setup`"
    repo = project(tmp_path, [*IMAGE_PLOTS, CURVE])
    (repo / "loss.csv").write_text("step,loss\n0,1.0\n1,0.5\n2,0.4\n")
    shutil.copy(REPO / ".dvc/config", repo / ".dvc/config")
    shutil.copy(TEMPLATE, repo / ".dvc/plots_page.html")
    problems, state = page_state(repo)
    assert problems == []
    assert [(plot["id"], plot["drawn"]) for plot in state["vega"]] == [("loss", 1)], state
    curves = [{k: curve[k] for k in ("rev", "field", "points", "opacity")} for curve in state["vega"][0]["curves"]]
    drawn = {"rev": "workspace", "field": None, "points": 3}  # DVC's default template: smoothed, and raw but faint
    assert curves == [drawn | {"opacity": 1}, drawn | {"opacity": 0.2}], state
    assert state["links"] == []  # nothing loaded by URL, not even from the machine


def test_the_template_refuses_code_that_would_end_its_script_tag():
    spec = importlib.util.spec_from_file_location("offline_plots_page", REPO / "scripts/offline_plots_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.inline_script("ok", 'f("<b>")\n//# sourceMappingURL=ok.min.js.map\n').count("sourceMappingURL") == 0
    for code in ('x = "</SCRIPT>"', 'x = "{plot_divs}"'):
        with pytest.raises(ValueError, match="cannot be inlined"):
            module.inline_script("bad", code)
