# `make test` and `make demo` work from a fresh clone: they create .venv and install what is needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned: this exact version is served as a CPU wheel from local disk; an open range pulls a CUDA build.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test,examples,triton,lint]" $(TORCH_PIN)
	touch $(STAMP)

# The suite starts over a hundred Python processes: let them cache the bytecode of the repository's own modules
# (an environment with PYTHONDONTWRITEBYTECODE set compiles lightning_mqsp again in each, 1.5 s of CPU on a slow host).
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -q

# ruff (style, imports, likely bugs) over the whole tree, mypy over the package and kernels (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
