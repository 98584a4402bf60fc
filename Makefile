# qywx-ray: the two commands are `make demo` and `make test`; both set up what is missing.
PY ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test lint drills bench dev-up dev-down clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m qywx_ray.cli demo

test: setup
	$(PY) -m ruff check qywx_ray serve tests bench
	$(PY) -m mypy
	$(PY) -m pytest -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check qywx_ray serve tests bench
	$(PY) -m ruff format --check qywx_ray serve tests bench
	$(PY) -m mypy

drills: setup
	$(PY) -m pytest -m slow -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) -c "import matplotlib" 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/peer_tools.py
	$(PY) bench/run_all.py

dev-up: setup
	$(PY) -m qywx_ray.cli dev up

dev-down:
	$(PY) -m qywx_ray.cli dev down

clean: dev-down
	rm -rf .qywx-data
