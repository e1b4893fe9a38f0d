# Two entry points (see README): `make run` (main job) and `make test` (test suite).
# Both create .venv and install the pinned stack first; re-running skips what is up to date.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install data run flow serve lint test test-fast bench clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $@

install: $(STAMP)

# The embedded sample data is versioned by data.dvc; its objects ship in the in-repo remote dvc-store/.
data: install
	dvc pull -q data.dvc

run: data
	dvc repro
	ctharden summary

flow: data
	python flows/pipeline.py

# The scheduled deployments (nightly champion re-evaluation, weekly re-hardening); needs a Prefect
# server: `prefect server start` and PREFECT_API_URL (see README, "Scheduled runs").
serve: data
	python flows/serve.py

# Static checks: ruff, the import contracts of pyproject.toml (layers point one way, no cycles), mypy.
lint: install
	ruff check src tests flows benchmarks tools
	lint-imports
	mypy

test: data lint
	python -m pytest

# The suite without the tests marked slow (pyproject.toml: training, the smoke pipeline, servers).
test-fast: data
	python -m pytest -m "not slow" -q

clean:
	rm -rf artifacts reports $(VENV)
