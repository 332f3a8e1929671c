# Set-up and the stages. PIPELINE names a file in pipelines/ (or a path to one); ARGS are passed to the command,
# e.g. make train PIPELINE=wiki ARGS="--bits 64" or make search PIPELINE=demo ARGS='--text "red circle"'.
PYTHON   ?= python3
VENV     ?= .venv
PIPELINE ?= demo
ARGS     ?=
CFRH     := $(VENV)/bin/cfrh

.PHONY: setup test extract train evaluate search serve demo benchmarks clean-cache

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU build on this machine's disk; a bare `torch` would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0 || $(VENV)/bin/pip install -q torch
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

test: setup
	$(VENV)/bin/python -m pytest -q -n 2

extract: setup
	$(CFRH) extract $(PIPELINE) $(ARGS)

train: setup
	$(CFRH) train $(PIPELINE) $(ARGS)

evaluate: setup
	$(CFRH) evaluate $(PIPELINE) $(ARGS)

search: setup
	$(CFRH) search $(PIPELINE) $(ARGS)

# The search service and its page on http://127.0.0.1:8000/ (ARGS="--port 8080 --bits 32", a token: CFRH_SERVE_TOKEN).
serve: setup
	$(CFRH) serve $(PIPELINE) $(ARGS)

# CLIP_MODEL: a hub id or local checkpoint directory; without one the demo says plainly that it is untrained.
# DATA: a new or empty folder for the scenes, or a collection to run on, only read (DATA=../shared/data/coco-mini).
demo: setup
	$(CFRH) demo $(if $(CLIP_MODEL),--model "$(CLIP_MODEL)") $(if $(DATA),--data "$(DATA)") $(ARGS)

benchmarks: setup
	for b in benchmarks/*.py; do $(VENV)/bin/python $$b || exit 1; done

clean-cache:
	find cache -mindepth 1 ! -name README.md -exec rm -rf {} +
