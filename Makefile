# qywx-ray: the two commands are `make demo` and `make test`; both set up what is missing.
PY ?= python3
PYTEST_ARGS ?=

LINT_PATHS = qywx_ray serve tests bench examples

.PHONY: setup demo test unit lint fmt docs drills bench dev-up dev-down clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m qywx_ray.cli demo

test: setup
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy
	$(PY) -m pytest -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

# Unit tests only: no Kafka, Redis or Ray started, under a minute.
unit: setup
	$(PY) -m pytest tests/unit -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	$(PY) -m mypy

# Rewrites files: ruff's import sorting and safe fixes, then the formatter.
fmt:
	$(PY) -m ruff check --fix-only -q $(LINT_PATHS)
	$(PY) -m ruff format $(LINT_PATHS)

# The documentation site into site/ (the same strict build runs in make test).
docs:
	$(PY) -m mkdocs build --strict

drills: setup
	$(PY) -m pytest -m slow -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.peer_tools
	$(PY) -m bench.run_all

dev-up: setup
	$(PY) -m qywx_ray.cli dev up

dev-down:
	$(PY) -m qywx_ray.cli dev down

clean: dev-down
	rm -rf .qywx-data
