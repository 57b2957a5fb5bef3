# Two commands for a newcomer: `make run` (set up, then open the explorer on the embedded model) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test test-fast lint setup clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

setup: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/hierui explore --model smollm2-135m --prune wanda:0.5

# two workers (pytest-xdist), a test file each at a time: module fixtures are built once
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

# a developer's quick loop: everything but the tests marked slow (CI runs `make test`, all of them)
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) *.egg-info
