# Two entry points: `make demo` (the whole pipeline on the offline smoke setting) and `make test`.
# Each sets up the virtual environment first; a second run reuses it.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1
# Put the environment's bin/ first on PATH in every process that its Python starts (`.venv/bin/dvc` included), so
# the stages' `python -m stages...` run with this environment's interpreter however DVC is called.
PATH_HOOK := import os, sys; b = os.path.dirname(sys.executable); p = os.environ.get("PATH", ""); b in p.split(os.pathsep) or os.environ.update(PATH=b + os.pathsep + p)
ACTIVATE := @echo "In a new shell, run 'source .venv/bin/activate' first so that 'dvc' and 'python' are this project's."

.PHONY: setup demo study test test-all bench compare gpu-wheels

$(VENV)/installed: requirements.txt Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	PATH_HOOK='$(PATH_HOOK)' $(VENV)/bin/python -c 'import os, sysconfig; \
	  open(sysconfig.get_paths()["purelib"] + "/sketch_path.pth", "w").write(os.environ["PATH_HOOK"] + "\n")'
	touch $@

# DVC's plots page offline: Vega, Vega-Lite and vega-embed as package-lock.json pins them, inlined into the HTML
# template that .dvc/config names (plots.html_template), so the page needs no CDN wherever DVC writes it.
node_modules/.installed: package.json package-lock.json
	@command -v npm >/dev/null || { echo "error: npm not found; install Node.js and npm (apt-get install npm)"; exit 1; }
	npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

.dvc/plots_page.html: node_modules/.installed scripts/offline_plots_page.py
	python3 scripts/offline_plots_page.py node_modules $@

setup: $(VENV)/installed .dvc/plots_page.html

demo: setup
	HF_HUB_OFFLINE=1 dvc exp run -S profile=smoke
	@echo "report:  reports/report.md (figures in reports/figures/)"
	@echo "metrics: reports/clip_eval.json reports/blip_check.json reports/finetune/metrics.json (dvc metrics show)"
	@echo "images:  reports/samples/base/ reports/samples/finetuned/"
	$(ACTIVATE)

study: setup
	dvc exp run -S profile=study

# The fast tier: unit and property tests and one smoke DAG through DVC (tests/test_dag.py), a few minutes.
test: setup
	python -m pytest -q -m "not slow" tests

# Every test, the slow tier too (more experiments through DVC, several processes, sharing, the queue, resume, the
# learning check, benches, the offline plots pages in a browser): what CI runs. The plots-page tests need a Chromium:
# install it where we can (root with apt), else say they will be skipped.
test-all: setup
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get update -qq >/dev/null 2>&1 \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } \
	  || echo "chromium not installed: the offline plots-page test will be skipped"; }
	python -m pytest -q tests

# The wheels a bare GPU machine lacks (CPython 3.12, manylinux x86_64; bitsandbytes with its CUDA 13 and CPU libraries
# only), into git-ignored gpu-wheels/ for bench/gpu_check.sh to install there; needs PyPI. bench/GPU_WHEELS.md.
gpu-wheels: setup
	python scripts/gpu_wheels.py gpu-wheels

bench: setup  # make bench AGAINST=<rev>: that commit's DAG too, side by side
	python bench/smoke_dag.py $(if $(AGAINST),--against $(AGAINST))

# Both also redraw reports/comparison.png (style against held-out CLIP score, the Pareto front), a plot of dvc.yaml
# kept in git.
compare: setup
	@mkdir -p reports
	@python scripts/compare.py --chart reports/comparison.png

# Written under a temporary name and renamed, so that a failed comparison leaves no half-written report.
.PHONY: compare-md
compare-md: setup
	@mkdir -p reports
	@python scripts/compare.py --markdown --chart reports/comparison.png > reports/comparison.md.tmp || { rm -f reports/comparison.md.tmp; exit 1; }
	@mv reports/comparison.md.tmp reports/comparison.md
	@echo "reports/comparison.md"
