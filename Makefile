# The README's two commands: `make run` (install + train the tiny MoE on the embedded corpus)
# and `make test` (install with test extras + run the whole suite). Both use ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/tiny_moe
ARGS ?=

.PHONY: run test install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps: reinstall only when pyproject.toml changes (the install is editable, so code
# changes need none).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,tpu,data]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/jaxmoe train --config configs/tiny_moe.yaml --run-dir $(RUN_DIR) $(ARGS)

# Two pytest workers, whole files each (module fixtures compile once per worker): most tests
# are bound by XLA's single-threaded compiles, so two workers take the 2-core CI machine from
# ~16.5 to ~12 min. `make test ARGS="-n 0"` runs in one process.
test: install-dev
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -n 2 --dist loadfile $(ARGS)

bench: install-dev
	JAX_PLATFORMS=cpu $(BIN)/python tools/bench_train.py

clean:  # the environment and caches; trained runs (runs/) are left alone
	rm -rf $(VENV) .pytest_cache *.egg-info
