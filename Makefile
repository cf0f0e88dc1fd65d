# One-command set-up and entry points. `make run` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export KEDRO_DISABLE_TELEMETRY := true

.PHONY: setup run test viz test-airflow test-storage airflow-check dags bench clean-test

setup: $(STAMP)

# Re-runs only when the pins change; a second `make setup` is a no-op.
$(STAMP): requirements.txt requirements-assets.txt requirements-reference.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-assets.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-reference.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: setup
	$(BIN)/kedro run

test: setup
	$(BIN)/python -m pytest

viz: setup
	$(BIN)/kedro viz build

test-airflow: setup
	$(BIN)/python -m pytest -m airflow -p no:cacheprovider tests/integration

# The catalog on a real S3 server (moto) through s3fs, in .storage-venv/: an environment layered
# over .venv (it sees .venv's packages, its own come first), because botocore pins
# python-dateutil<3 (requirements-storage.txt). `make test` runs the same tests on memory:// only.
STORAGE_VENV := .storage-venv
$(STORAGE_VENV)/.installed: $(STAMP) requirements-storage.txt
	test -x $(STORAGE_VENV)/bin/python || $(BIN)/python -m venv $(STORAGE_VENV)
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')')" \
		> "$$($(STORAGE_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_project_venv.pth"
	$(STORAGE_VENV)/bin/python -m pip install --quiet --no-deps --ignore-installed -r requirements-storage.txt
	touch $@

test-storage: $(STORAGE_VENV)/.installed
	$(STORAGE_VENV)/bin/python -m pytest -p no:cacheprovider tests/io tests/reliability/test_storage_faults.py

airflow-check: setup
	$(BIN)/python scripts/airflow_check.py

dags: setup
	$(BIN)/kedro airflow create -j airflow/dag_template.j2 -t dags/ -p __default__,distill

bench: setup
	$(BIN)/python benchmarks/run_benchmarks.py --quick

clean-test:
	rm -rf data/test
