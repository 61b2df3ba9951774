# The two commands of the README:  `make run`  and  `make test`.
# Both set themselves up from nothing: a virtualenv in .venv with uv, then the package and its extras.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PHOTOS ?= var/photos
PYTEST_ARGS ?=

.PHONY: setup test test-fast run bench clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8

setup: $(BIN)/uv
	$(BIN)/uv pip install --quiet -p $(BIN)/python -e '.[dev]'

# Every test: unit, the full-size official variants, and the integration tests against the real local stack
# (Kafka, Redis, s3proxy from infra/local, installed and started by the tests themselves).
test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fast unit tier only (seconds, no servers): what to run while editing.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

# Tag scikit-image's bundled photos with RAM++. Needs the official checkpoint: set RAMPLUS_CHECKPOINT
# (and RAMPLUS_TAG_LIST / RAMPLUS_THRESHOLDS for tag names); without it, it says how to get one.
run: setup
	$(BIN)/ramplus samples $(PHOTOS)
	$(BIN)/ramplus tag $(PHOTOS)

bench: setup
	$(BIN)/python bench/bench_model.py

clean:
	rm -rf $(VENV) var .pytest_cache
