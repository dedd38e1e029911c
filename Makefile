# rocm_ray: set-up and the two front-door commands.
#   make demo   install what is missing, then run the main job on the embedded tiny world
#   make test   install what is missing, then run the whole test suite
#   make cluster-up / cluster-status / cluster-down   a local Ray head on 127.0.0.1 (rocm-ray cluster ...)
# On a machine without an NVIDIA GPU the CPU build of torch 2.13.0 is installed first, so no CUDA
# packages are pulled. Elsewhere, pass TORCH_PIP_ARGS, e.g.
#   make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
PIP := $(VENV)/bin/pip
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean cluster-up cluster-status cluster-down

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first, pinned, so that the packages after it never pull another (CUDA) build
	$(PIP) install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PIP) install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/rocm-ray train recipes/tiny_kl.yaml

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/ray_overhead.py

cluster-up: setup
	$(BIN)/rocm-ray cluster up

cluster-status: setup
	$(BIN)/rocm-ray cluster status

cluster-down: setup
	$(BIN)/rocm-ray cluster down

clean:
	rm -rf outputs .pytest_cache
