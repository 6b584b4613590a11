# Stillroom: the two quick-start commands (`make demo`, `make test`) bootstrap .venv themselves.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stillroom-installed
EXTRAS ?= dev,embedded,train

.PHONY: demo test test-slow bench lint setup clean
BENCH_STAMP := $(VENV)/.stillroom-bench-installed

setup: $(STAMP)

# Without CUDA, install the CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA
# build); the project's own torch requirement stays a range for users with GPUs.
# The install's wall time goes to $(VENV)/.stillroom-install-seconds: `stillroom demo` prints it with its own.
$(STAMP): pyproject.toml
	@t0=$$(date +%s); \
	{ test -x $(BIN)/python || $(PY) -m venv $(VENV); } && \
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "installing the CPU build of torch"; $(BIN)/pip install -q torch==2.13.0; fi && \
	echo "$(BIN)/pip install -q -e '.[$(EXTRAS)]'" && $(BIN)/pip install -q -e '.[$(EXTRAS)]' && \
	$(BIN)/python -c "import stillroom, torch, transformers" && \
	echo $$(( $$(date +%s) - t0 )) > $(VENV)/.stillroom-install-seconds && touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stillroom demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The benchmarks compare against lm-evaluation-harness and DSPy, installed only for them.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[$(EXTRAS),bench]'
	@touch $(BENCH_STAMP)

# Real-model tests (Gemma-3 270M), minutes on CPU: run by the benchmark script, not by CI.
test-slow: $(BENCH_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(BENCH_STAMP)
	$(BIN)/python -m pytest -q -m slow
	bash bench/run_all.sh

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
