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

.PHONY: demo test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_PIN)
	$(BIN)/python -m pip install -q setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	# NATTEN: a test and benchmark dependency only (an sdist; runs uncompiled on CPU).
	$(BIN)/python -c "import natten" 2>/dev/null || $(BIN)/python -m pip install -q --no-build-isolation $(NATTEN_PIN)
	# local-attention: a benchmark contender only (1-D windows).
	$(BIN)/python -c "import local_attention" 2>/dev/null || $(BIN)/python -m pip install -q $(LOCAL_ATTENTION_PIN)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/foveal show --gallery gallery
	$(BIN)/foveal check

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) gallery bench-out
