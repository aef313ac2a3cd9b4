# dagcast: `make demo` runs a real DAG-only deploy end to end on the embedded stack;
# `make test` installs everything and runs lint, types and the whole test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint unit integration bench clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy app.py chalicelib dagcast

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider

unit: install
	$(PY) -m pytest -q tests/unit

integration: install
	$(PY) -m pytest -q tests/integration tests/e2e

bench: install
	$(PY) bench/bundle_bench.py
	$(PY) bench/validate_bench.py
	$(PY) bench/sidecar_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
