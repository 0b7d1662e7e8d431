"""Does the page of `dvc plots show` work offline? Opens it in headless Chromium with the network blocked.

DVC's page loads Vega from a CDN for Vega plots (blank offline) and embeds image plots (PNG files and folders of PNGs
declared under `plots:`), copying them into `static/`. `dvc plots show --json` names every image it found, so the
page must show each of them. Used by test_plots_page.py and by the end-to-end test on the real pipeline.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 120
# Written into a copy of the page: after `load` (and a moment of virtual time for vegaEmbed's promises) it puts the
# page's state into <pre id="probe">, which --dump-dom prints, so that no WebDriver is needed.
PROBE = """<script>
window.addEventListener("load", () => setTimeout(() => {
  const vega = [...document.querySelectorAll("div")].filter(d =>
    [...d.children].some(c => c.tagName === "SCRIPT" && c.textContent.includes("vegaEmbed(")));
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({
    imgs: [...document.images].map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll("script[src], link[href]")]
      .map(e => e.getAttribute("src") || e.getAttribute("href")),
    vega: vega.map(d => ({id: d.id, drawn: d.querySelectorAll("svg, canvas").length})),
  });
  document.body.appendChild(pre);
}, 1000));
</script>"""
# Offline for sure: no DNS answers but localhost's, and anything that still tries http(s) goes to a closed port.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-extensions", "--disable-background-networking", "--disable-component-update",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost", "--proxy-server=127.0.0.1:9",
                  "--virtual-time-budget=10000", "--dump-dom")


def find_chromium() -> str | None:
    """The first of chromium, chromium-browser, google-chrome on PATH."""
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _dvc(repo: Path, env: dict | None, *args: str) -> str:
    """stdout of `dvc ARGS` in `repo` (the environment's dvc, beside this interpreter, when there is one)."""
    beside = Path(sys.executable).parent / "dvc"
    dvc = str(beside) if beside.exists() else "dvc"
    result = subprocess.run([dvc, *args], cwd=repo, env=os.environ | (env or {}), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {repo}:\n{result.stderr[-2000:]}")
    return result.stdout


def declared(shown: dict) -> tuple[list[str], dict[str, str]]:
    """Problems DVC itself reports, and {file name in the page's static/: plot path} of every image it found."""
    problems = [f"dvc could not load plot {e.get('name')}: {e.get('msg', '').splitlines()[0]}"
                for e in shown.get("errors", [])]
    images = {}
    for name, entries in shown.get("data", {}).items():
        if not entries and not any(e.get("name") == name for e in shown.get("errors", [])):
            problems.append(f"plot {name} is declared but dvc found nothing for it")
        images |= {Path(e["url"]).name: name for e in entries if e.get("type") == "image"}
    return problems, images


def probe(page: Path, chromium: str, profile: Path) -> dict:
    """The page's state as the probe script records it in Chromium, network blocked."""
    probed = page.with_name("probe.html")
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", probed.as_uri()],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    start = result.stdout.find('<pre id="probe">')
    end = result.stdout.find("</pre>", start)
    if start < 0 or end < 0:
        raise RuntimeError(f"chromium printed no probe for {page}:\n{result.stderr[-2000:]}")
    text = result.stdout[start + len('<pre id="probe">'):end]
    return json.loads(html.unescape(text))


def problems_in(state: dict, images: dict[str, str]) -> list[str]:
    """One line per thing the offline page gets wrong."""
    problems = []
    shown = {Path(img["src"] or "").name: img for img in state["imgs"]}
    problems += [f"image {plot} ({name}) is not on the page" for name, plot in images.items() if name not in shown]
    problems += [f"image {img['src']} did not load" for img in state["imgs"] if not img["ok"]]
    problems += [f"the page loads {url} from off the machine" for url in state["links"]
                 if url.startswith(("http:", "https:", "//"))]
    problems += [f"vega plot {v['id']} stayed empty" for v in state["vega"] if not v["drawn"]]
    return problems


def check_plots_page(repo: Path, env: dict | None = None) -> list[str]:
    """Problems of `dvc plots show`'s page in `repo` opened offline; [] when every declared plot shows."""
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="plots-page-") as tmp:
        # -o keeps the images that --json copies out of the repository's own dvc_plots/.
        shown = json.loads(_dvc(repo, env, "plots", "show", "--json", "-o", f"{tmp}/json"))
        problems, images = declared(shown)
        _dvc(repo, env, "plots", "show", "-o", f"{tmp}/page")
        state = probe(Path(tmp, "page", "index.html"), chromium, Path(tmp, "profile"))
        return problems + problems_in(state, images)
