# Entry points that work on a fresh machine: `make demo` (train the embedded demo), `make lint` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo lint test gpu-test bench setup clean

setup: $(STAMP)

# CPU torch comes from the pinned local wheel; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenmill train --overwrite

# Lint, format check and import contracts (pyproject.toml: [tool.ruff*], [tool.importlinter]). All three run
# and each reports, so one failure does not hide the others; the target fails if any did.
LINT_PATHS := src tests benchmarks
lint: $(STAMP)
	@status=0; \
	$(BIN)/ruff check --output-format concise $(LINT_PATHS) || status=1; \
	$(BIN)/ruff format --check --output-format concise $(LINT_PATHS) || status=1; \
	PYTHONPATH=src $(BIN)/lint-imports --no-cache || status=1; \
	exit $$status

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout 600

gpu-test: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

bench: $(STAMP)
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
