# Two commands on a fresh machine:  `make demo` (set up + run the demo pipeline)  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	dvc repro
	pipeline status

test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check pipeline stages tests benchmarks

lint: setup
	$(BIN)/ruff check pipeline stages tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_frames.py
	$(BIN)/python benchmarks/bench_codec.py
	$(BIN)/python benchmarks/bench_features.py
	$(BIN)/python benchmarks/bench_loader.py

clean:
	rm -rf cache/world cache/frames
