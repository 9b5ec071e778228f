# Everything runs from a local virtualenv (.venv) that `make` creates and keeps in step with
# pyproject.toml: a fresh machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean chromium

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	@touch $@

## The main job on embedded defaults: the whole pipeline (feed → stream → Airflow DAG → report).
demo: $(BIN)/.installed
	$(BIN)/candlekeep demo

# The report tests open pages in headless Chromium (Debian's package; as root we install it).
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)); } || \
	  { echo "headless Chromium is needed for the report tests: install the chromium package"; exit 1; }

## Lint, then the whole test suite. Two pytest workers: most integration tests wait on
## services (a worker's idle timeout, Airflow, a restarted broker), so two share the 2 CPUs well
## (~9 instead of ~15 minutes). Each worker has its own database and broker; the embedded
## PostgreSQL is shared by reference count. `pytest -p no:xdist` runs it in one process.
test: $(BIN)/.installed chromium
	$(BIN)/ruff check .
	.ci/compose-check
	$(BIN)/python -m pytest -n 2 --dist worksteal

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.bench-installed
	$(BIN)/python bench/aggregate_vs_bytewax.py

clean:
	rm -rf $(VENV) .candlekeep .pytest_cache .hypothesis
