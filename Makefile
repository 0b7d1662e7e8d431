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

.PHONY: setup demo study test bench compare

$(VENV)/installed: requirements.txt Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	PATH_HOOK='$(PATH_HOOK)' $(VENV)/bin/python -c 'import os, sysconfig; \
	  open(sysconfig.get_paths()["purelib"] + "/sketch_path.pth", "w").write(os.environ["PATH_HOOK"] + "\n")'
	touch $@

setup: $(VENV)/installed

demo: setup
	HF_HUB_OFFLINE=1 dvc exp run -S profile=smoke
	@echo "report:  reports/report.md (figures in reports/figures/)"
	@echo "metrics: reports/clip_eval.json reports/blip_check.json reports/finetune/metrics.json (dvc metrics show)"
	@echo "images:  reports/samples/base/ reports/samples/finetuned/"
	$(ACTIVATE)

study: setup
	dvc exp run -S profile=study

test: setup
	python -m pytest -q tests

bench: setup
	python bench/smoke_dag.py

compare: setup
	@python scripts/compare.py
