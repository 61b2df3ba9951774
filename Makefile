# The two commands of the README:  `make run`  and  `make test`.
# Both set themselves up from nothing: a virtualenv in .venv with uv, then the package and its extras.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PHOTOS ?= var/photos
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup test test-fast run tag-photos bench clean

$(BIN)/uv:
	@echo "setup: creating $(VENV) and installing uv (first time only)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.8

setup: $(BIN)/uv
	@echo "setup: installing ramplus and its dev extras into $(VENV) (torch, Ray, timm, open_clip...: minutes the first time, seconds after)"
	$(BIN)/uv pip install --quiet -p $(BIN)/python -e '.[dev]'

# Every test: unit, the full-size official variants, and the integration tests against the real local stack
# (Kafka, Redis, s3proxy from infra/local, installed and started by the tests themselves).
test: setup
	@echo "test: unit, slow and integration tiers; the integration tests install (first time) and start Kafka, Redis and s3proxy from infra/local"
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The fast unit tier only (seconds, no servers): what to run while editing.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

# The whole lifecycle on this machine (infra/local/demo.py): the local stack and a local Ray, a tiny RAM++
# retrained on synthetic scenes, its vocabulary in Redis, the fleet on a Kafka topic with a hot-swap
# mid-stream, a backfill, a summary table and var/demo/report.html. With RAMPLUS_MODEL__CHECKPOINT (and
# RAMPLUS_MODEL__TAG_LIST / RAMPLUS_MODEL__THRESHOLDS) it also tags the real photos with the official RAM++.
run: setup
	$(BIN)/python infra/local/demo.py $(DEMO_ARGS)

# Tag scikit-image's bundled photos with the official RAM++ (needs RAMPLUS_MODEL__CHECKPOINT; without it, it says how).
tag-photos: setup
	$(BIN)/ramplus samples $(PHOTOS)
	$(BIN)/ramplus tag $(PHOTOS)

bench: setup
	$(BIN)/python bench/bench_model.py

clean:
	rm -rf $(VENV) var .pytest_cache
