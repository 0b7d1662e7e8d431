"""Write DVC's HTML template for `dvc plots show` and `dvc plots diff` with Vega, Vega-Lite and vega-embed inlined.

DVC's own page loads the three from a CDN, so its Vega plots stay blank without a network. This template carries
their minified builds in the page itself, so the page draws wherever DVC writes it (dvc_plots/index.html, `-o DIR`)
and wherever it is copied to. It has no `{scripts}` placeholder: that is where DVC would put its CDN script tags.

Reads NODE_MODULES/{vega,vega-lite,vega-embed} (installed by `npm ci` at the versions of package-lock.json) and writes
OUT, the file that `plots.html_template` in .dvc/config names. `make setup` runs it:

    python3 scripts/offline_plots_page.py node_modules .dvc/plots_page.html
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# In load order: vega-lite and vega-embed are UMD builds that find `vega` (and `vegaLite`) as globals.
BUILDS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
# DVC replaces these three strings in the template wherever they occur, inlined code included.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- {versions}, inlined by scripts/offline_plots_page.py: this page loads nothing from the network -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def inline_script(name: str, code: str) -> str:
    """`code` as an inline <script>, without its source-map comment; refused if it could end the tag or hold one of
    DVC's placeholders."""
    code = re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", code)
    if re.search(r"</script", code, re.IGNORECASE) or any(p in code for p in PLACEHOLDERS):
        raise ValueError(f"{name}'s build holds '</script' or one of {PLACEHOLDERS}: it cannot be inlined as it is")
    return f"    <script>/* {name} */\n{code}</script>"


def page(node_modules: Path) -> str:
    """The template, from the three packages' builds under `node_modules`."""
    scripts, versions = [], []
    for name, build in BUILDS.items():
        package = node_modules / name
        if not (package / build).is_file():
            raise FileNotFoundError(f"{package / build} is missing: run `make setup` (npm ci) first")
        versions.append(f"{name} {json.loads((package / 'package.json').read_text())['version']}")
        scripts.append(inline_script(name, (package / build).read_text(encoding="utf-8")))
    return PAGE.format(versions=", ".join(versions), scripts="\n".join(scripts))


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python3 scripts/offline_plots_page.py NODE_MODULES OUT")
    node_modules, out = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        text = page(node_modules)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    partial = out.with_name(out.name + ".tmp")  # written whole: DVC never reads half a template
    partial.write_text(text, encoding="utf-8")
    partial.replace(out)
    print(f"{out}: {', '.join(BUILDS)} inlined ({len(text) // 1024} KiB)")


if __name__ == "__main__":
    main()
