# Two commands a new user needs (see README):
#   make demo   set up .venv and run the end-to-end Figure-2 reproduction (CPU, ~10 min on 2 quiet cores, ~20 min shared)
#   make test   set up .venv, refresh figures/ if the code changed, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 installs from local disk in seconds; any other spec pulls
# a multi-GB CUDA build. Installing it first makes the project's torch>=2.3 a no-op.
TORCH_CPU := torch==2.13.0

.PHONY: setup demo figures test lint docs

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e ".[demo,test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/wdanalysis demo --out runs/demo --figures figures

# CI (CI=true) always regenerates figures/; elsewhere only when the code changed.
figures: setup
	$(VENV)/bin/wdanalysis demo --out runs/demo --figures figures --quiet $(if $(CI),,--if-stale)

test: figures
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check wdanalysis tests benchmarks
	$(VENV)/bin/ruff format --check wdanalysis tests benchmarks

# the documentation site into site/ (strict: a broken link or reference fails the build)
docs: setup
	$(VENV)/bin/mkdocs build --strict
