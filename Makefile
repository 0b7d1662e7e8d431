# Two entry points: `make demo` (the whole pipeline on the offline smoke setting) and `make test`.
# Each sets up the virtual environment first; a second run reuses it.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo study test bench

$(VENV)/installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

setup: $(VENV)/installed

demo: setup
	HF_HUB_OFFLINE=1 dvc exp run -S profile=smoke
	@echo "report:  reports/report.md (figures in reports/figures/)"
	@echo "metrics: reports/clip_eval.json reports/blip_check.json reports/finetune/metrics.json (dvc metrics show)"
	@echo "images:  reports/samples/base/ reports/samples/finetuned/"

study: setup
	dvc exp run -S profile=study

test: setup
	python -m pytest -q tests

bench: setup
	python bench/smoke_dag.py
