# Two commands on a fresh machine: `make train` and `make test`.
# Each makes .venv on first use and installs the package into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test train lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

train: $(STAMP)
	$(BIN)/minunet train --out runs/sample --size 128 --epochs 12 --force

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/minunet bench --backend numba

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
