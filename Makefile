# Two commands on a fresh machine:  `make demo` (set up + run the demo pipeline)  and  `make test`.
# On a GPU machine: `make gpu-check` (GPU tests, the pipeline end to end on the GPU, the throughput table).
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup demo test test-fast test-gpu gpu-check lint bench clean readme-results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	dvc repro
	pipeline status

# The CPU suite, on both cores (pytest-xdist, test by test; the demo's dvc-repro tests stay on one worker, their xdist_group); the GPU tests (marker gpu) run in test-gpu and gpu-check.
test: setup
	$(BIN)/python -m pytest -q -m "not gpu" -n 2 --dist loadgroup
	$(BIN)/ruff check pipeline stages tests benchmarks docs

# The edit-test loop: every CPU test but the slow end-to-end ones (marker slow).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not gpu and not slow" -n 2 --dist loadgroup

# Where CUDA is absent every test reports skipped, with the reason.
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu -rs

# GPU tests, the pipeline on a generated world with a random ViT-B/16, then gpu_throughput.py, within 8 minutes:
# cache/gpu-check/gpu_check.md and .json. GPU_CHECK_FLAGS="--budget-s 600", or "--smoke" on a CPU.
gpu-check: setup
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_FLAGS)

lint: setup
	$(BIN)/ruff check pipeline stages tests benchmarks docs

bench: setup
	$(BIN)/python benchmarks/bench_frames.py
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_features.py
	$(BIN)/python benchmarks/bench_loader.py

# After `make demo`: the report's tables into the README (MINUTES: the fresh-clone time, when measured).
readme-results: setup
	$(BIN)/python docs/readme_results.py $(if $(MINUTES),--minutes $(MINUTES))

clean:
	rm -rf cache/world cache/frames
