# `make test` and `make demo` work from a fresh clone: they create .venv and install what is needed.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS := test,examples,triton,lint
# The versions the suite passed with (every package, pip and torch included). torch==2.13.0 is served here as a
# CPU wheel from local disk; an open range pulls a multi-GB CUDA build. `make test-latest` refreshes this file.
LOCK := requirements/lock.txt
STAMP := $(VENV)/.installed
# -P keeps the repository root off sys.path: tests import the installed package, as users do.
# -n 2: the suite's processes wait on each other (gloo ranks, subprocess launches); two workers keep both cores busy.
# loadfile: each module runs on one worker, so a module-scoped fixture that launches a multi-process run runs once
# (with pytest 9.2, xdist 3.8's loadgroup no longer groups: its marks went unread and such fixtures ran on both
# workers, 150 s of CPU twice for the interpreted Triton cases). --no-loadscope-reorder keeps the modules in their
# collected order instead of the most tests first, which left the longest module, with four tests, to the end.
PYTEST := -P -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

.PHONY: install test test-latest test-floor lint demo bench clean

install: $(STAMP)

# uv installs the locked versions in seconds where pip took 1.5-2.5 minutes. It does not read pip's configuration:
# the folders pip takes wheels from (here: the CPU torch wheel on local disk) are handed to it.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) --upgrade pip uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) $(foreach f,$(FIND_LINKS),--find-links $(f)) -c $(LOCK) -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The suite starts over a hundred Python processes: let them cache the bytecode of the repository's own modules
# (an environment with PYTHONDONTWRITEBYTECODE set compiles lightning_mqsp again in each, 1.5 s of CPU on a slow host).
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(PY) $(PYTEST)

# The newest releases pyproject.toml allows (torch stays the CPU build unless LATEST_TORCH=torch: the newest is a
# CUDA build of several GB), the whole suite on them, and on success the lock file rewritten with what passed
# (with the CPU build only: the lock is what make test installs).
LATEST_VENV := .venv-latest
CPU_TORCH := torch==2.13.0
LATEST_TORCH ?= $(CPU_TORCH)
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip uv
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]" "$(LATEST_TORCH)"
	PYTHONDONTWRITEBYTECODE= $(LATEST_VENV)/bin/python $(PYTEST)
ifeq ($(LATEST_TORCH),$(CPU_TORCH))
	(echo "# make test-latest on $$(date -u +%Y-%m-%d): the versions the whole suite passed with. make install uses them."; \
	 $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//') > $(LOCK)
endif

# The declared floors (requirements/floor.txt) in their own environment, and the part of the suite that says the
# package works there: imports and packaging, core attention at P=2, one strategy run, one Hugging Face family.
FLOOR_VENV := .venv-floor
FLOOR_TESTS := tests/test_packaging.py tests/test_attention.py tests/test_adapters_huggingface.py \
	"tests/test_strategy.py::test_loss_and_gradients_match_single_process[bert]"
test-floor:
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet -c requirements/floor.txt -e ".[test]"
	PYTHONDONTWRITEBYTECODE= $(FLOOR_VENV)/bin/python $(PYTEST) $(FLOOR_TESTS)

# ruff (style, imports, likely bugs) over the whole tree, mypy over the package and kernels (pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

demo: $(STAMP)
	$(PY) examples/demo.py

bench: $(STAMP)
	$(PY) benchmarks/attention.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(FLOOR_VENV) build *.egg-info .pytest_cache
