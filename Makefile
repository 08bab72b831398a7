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
	ruff format src tests benchmarks
	ruff check --fix src tests benchmarks

lint: ## ruff
	ruff check src tests benchmarks
	ruff format --check src tests benchmarks

typecheck: ## mypy --strict on src/
	mypy

test: services ## start the services, then run every test but the slow ones
	$(PY) -m pytest

test-unit: ## unit tests only (no services)
	$(PY) -m pytest tests/unit

test-slow: services ## the slow tests only: wall-clock and memory bounds (machine-dependent)
	$(PY) -m pytest -m slow

bench: services ## run the benchmarks (sluice beside the reference engine)
	bash benchmarks/setup_reference.sh
	bash benchmarks/setup_peers.sh
	$(PY) -m benchmarks.kafka_to_postgres.run
	$(PY) -m benchmarks.kafka_sql_lookup_to_postgres.run
	$(PY) -m benchmarks.kafka_tumbling_to_postgres.run
	$(PY) -m benchmarks.kafka_join_to_postgres.run

.PHONY: help install services stop fmt lint typecheck test test-unit test-slow bench
