# Two entry points for a fresh machine: `make demo` (set up + generate with the bundled model) and `make test`.
VENV ?= .venv
PYTHON ?= python3
# Set TORCH_REQUIREMENTS= (empty) to keep a torch you installed yourself, e.g. a CUDA build.
TORCH_REQUIREMENTS ?= requirements/cpu.txt
BIN := $(VENV)/bin

.PHONY: setup demo test test-all clean

$(BIN)/.illada-installed: pyproject.toml requirements/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_REQUIREMENTS),$(BIN)/python -m pip install --quiet -r $(TORCH_REQUIREMENTS))
	$(BIN)/python -m pip install --quiet -e ".[dev]" $(if $(TORCH_REQUIREMENTS),-c $(TORCH_REQUIREMENTS))
	touch $@

setup: $(BIN)/.illada-installed

demo: setup
	$(BIN)/illada generate "ROMEO:"

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
