# Front door for contributors. Users need only the README's two commands.
.DEFAULT_GOAL := help
PY ?= python

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## install sluice with every connector and the dev tools
	$(PY) -m pip install -e ".[all,dev]"

services: ## start the real services the tests use (Kafka, Postgres, MariaDB, RabbitMQ, Pub/Sub, S3 + Kinesis on moto, kinesis-local)
	bash scripts/services.sh start

stop: ## stop the services
	bash scripts/services.sh stop

fmt: ## format the code
	ruff format src tests benchmarks examples
	ruff check --fix src tests benchmarks examples

lint: ## ruff, and hadolint on the Dockerfile
	ruff check src tests benchmarks examples
	ruff format --check src tests benchmarks examples
	hadolint Dockerfile

typecheck: ## mypy --strict on src/
	mypy

docs: ## regenerate docs/pipeline-toml.md from the spec (after adding or changing keys)
	$(PY) scripts/gen_docs.py

test: services ## start the services, then run every test but the slow ones
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow and not disruptive and not quarantine"
	$(PY) -m pytest -m "disruptive and not slow and not quarantine"

test-unit: ## unit tests only (no services)
	$(PY) -m pytest tests/unit

test-quarantine: services ## the tests of known, open defects (they fail some of the time)
	$(PY) -m pytest -m quarantine

test-slow: services ## the slow tests only: wall-clock and memory bounds (machine-dependent)
	$(PY) -m pytest -m slow

bench: services ## run the benchmarks (sluice beside the reference engine)
	bash benchmarks/setup_reference.sh
	bash benchmarks/setup_peers.sh
	$(PY) -m benchmarks.kafka_to_postgres.run
	$(PY) -m benchmarks.kafka_sql_lookup_to_postgres.run
	$(PY) -m benchmarks.kafka_tumbling_to_postgres.run
	$(PY) -m benchmarks.kafka_join_to_postgres.run
	$(PY) -m benchmarks.brokers.rabbitmq_run

.PHONY: help install services stop fmt lint typecheck docs test test-unit test-slow test-quarantine bench
