# Two commands on a fresh machine:
#   make demo   sets up .venv (torch 2.13.0 first), trains the demo, evaluates it, draws predictions
#   make test   sets up .venv if needed and runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: a CPU build is on the project's machines; the package's own range
# (torch>=2.4,<3) is then satisfied and pip installs nothing more for it.
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/onestage: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

setup: $(BIN)/onestage

demo: setup
	$(BIN)/onestage train configs/demo.yaml --overwrite

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
