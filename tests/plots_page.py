"""Does the page of `dvc plots show` (or `dvc plots diff REVS`) work offline? Opens it in headless Chromium with the
network blocked.

DVC draws Vega plots with Vega, Vega-Lite and vega-embed: its own page loads them from a CDN (blank offline), the
project's template (.dvc/plots_page.html, `make setup`) carries them inlined. Image plots (PNG files and folders of
PNGs declared under `plots:`) are copied into `static/`. `dvc plots show --json` names every image it found, so the
page must show each of them, and every Vega plot must draw. Used by test_plots_page.py and by the end-to-end tests
on the real pipeline, which also read the curves that each Vega plot drew.
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
# Written into a copy of the page. HOOK, last in <head>, keeps the view of each vegaEmbed call (DVC's plot divs make
# them as the page loads), where vega-embed was loaded at all. PROBE, after `load` (and a moment of virtual time for
# vegaEmbed's promises), puts the page's state into <pre id="probe">, which --dump-dom prints: no WebDriver needed.
HOOK = """<script>
window.probedViews = {};
if (window.vegaEmbed) {
  const embed = window.vegaEmbed;
  window.vegaEmbed = Object.assign((el, spec, options) => embed(el, spec, options).then(result => {
    window.probedViews[String(el).replace(/^#/, "")] = result.view;
    return result;
  }), embed);
}
</script>"""
# A curve: one line mark drawn with points, named by the rev and the `filename::field` of its first point (DVC's data
# fields; the field is absent where a plot has one y), with its number of points and where it ends on the chart (in
# pixels). Opacity tells the smoothed curve of DVC's default template from its faint raw one.
PROBE = """<script>
function curves(node, out = []) {
  if (node.marktype === "line" && node.items && node.items.length) {
    const [first, last] = [node.items[0], node.items[node.items.length - 1]];
    out.push({rev: first.datum?.rev ?? null, field: first.datum?.["filename::field"] ?? null,
              points: node.items.length, end: [Math.round(last.x), Math.round(last.y)], opacity: first.opacity ?? 1});
  }
  for (const child of node.items || []) if (child.items) curves(child, out);
  return out;
}
window.addEventListener("load", () => setTimeout(() => {
  // vegaEmbed replaces the div's script by the chart (and adds its class): a div of either kind is a Vega plot.
  const vega = [...document.querySelectorAll("div")].filter(d => d.classList.contains("vega-embed") ||
    [...d.children].some(c => c.tagName === "SCRIPT" && c.textContent.includes("vegaEmbed(")));
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify({
    imgs: [...document.images].map(i => ({src: i.getAttribute("src"), ok: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll("script[src], link[href]")]
      .map(e => e.getAttribute("src") || e.getAttribute("href")),
    vega: vega.map(d => ({id: d.id, drawn: d.querySelectorAll("canvas.marks, svg.marks").length,  // not the menu's icon
                          curves: window.probedViews[d.id] ? curves(window.probedViews[d.id].scenegraph().root) : []})),
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
    text = page.read_text()
    head, body = text.rindex("</head>"), text.rindex("</body>")  # the last: inlined Vega holds such strings too
    probed.write_text(text[:head] + HOOK + text[head:body] + PROBE + text[body:])
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


def page_state(repo: Path, env: dict | None = None, revs: tuple[str, ...] = ()) -> tuple[list[str], dict]:
    """Problems of the page of `dvc plots show` in `repo` (`dvc plots diff REVS` when given) opened offline, [] when
    every declared plot shows; and the page's state: `vega` lists each Vega plot's div id, `drawn` and `curves`."""
    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    command = ("plots", "diff", *revs) if revs else ("plots", "show")
    with tempfile.TemporaryDirectory(prefix="plots-page-") as tmp:
        # -o keeps the images that --json copies out of the repository's own dvc_plots/.
        shown = json.loads(_dvc(repo, env, *command, "--json", "-o", f"{tmp}/json"))
        problems, images = declared(shown)
        _dvc(repo, env, *command, "-o", f"{tmp}/page")
        state = probe(Path(tmp, "page", "index.html"), chromium, Path(tmp, "profile"))
        return problems + problems_in(state, images), state


def check_plots_page(repo: Path, env: dict | None = None) -> list[str]:
    """Problems of `dvc plots show`'s page in `repo` opened offline; [] when every declared plot shows."""
    return page_state(repo, env)[0]
