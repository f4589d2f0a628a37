# Gatehouse: build, test and run the gatehouse.access collection.
#
#   make demo        deploy the demo topology on this machine's Docker engine
#   make test        the whole suite: lint, unit + integration tests, Molecule scenarios
#   make help        every target
#
# Longer shell logic lives in hack/; this file only wires it together.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# The one version lives in galaxy.yml.
VERSION := $(shell sed -n 's/^version:[[:space:]]*//p' galaxy.yml)
# Base of the service images; override for a public base, e.g. BASE_IMAGE=python:3.11-slim.
BASE_IMAGE ?=
COLLECTION := dist/gatehouse-access-$(VERSION).tar.gz
BUNDLE := dist/gatehouse-bundle-$(VERSION).tar.gz

VENV_STAMP := $(VENV)/.gatehouse-venv.stamp
export VENV
export BASE_IMAGE

.PHONY: help venv demo demo-down test lint pytest molecule images collection bundle bench clean clean-images

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: $(VENV_STAMP) ## Create/refresh the pinned virtualenv (.venv, or VENV=...)

# Re-run only when the pins, the services' dependencies or their C extension (built in place by
# the editable install) change.
$(VENV_STAMP): requirements.txt files/services/pyproject.toml files/services/gatehouse/sg/_mmsg.c
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-build-isolation -e files/services
	touch $@

demo: venv ## Deploy the demo topology (hack/demo.sh up)
	@if [[ -x hack/demo.sh ]]; then hack/demo.sh up; \
	else echo "make demo: not yet implemented (hack/demo.sh is missing)" >&2; exit 2; fi

demo-down: ## Remove everything the demo created (hack/demo.sh down)
	@if [[ -x hack/demo.sh ]]; then hack/demo.sh down; \
	else echo "make demo-down: not yet implemented (hack/demo.sh is missing)" >&2; exit 2; fi

test: venv images ## The whole suite: lint, then pytest and Molecule side by side (hack/test.sh)
	hack/test.sh $(PYTEST_ARGS)

lint: venv ## ruff, antsibull-changelog, ansible-lint, ansible-test sanity
	hack/lint.sh

pytest: venv images ## Unit and integration tests (PYTEST_ARGS=... to pass options)
	hack/pytest.sh $(PYTEST_ARGS)

molecule: venv images ## Every Molecule scenario (SCENARIOS="default ha" to choose)
	hack/molecule.sh $(SCENARIOS)

images: venv ## Build gatehouse/base (if its package list changed), the service and test images
	hack/build-images.sh

collection: venv ## Build dist/gatehouse-access-<version>.tar.gz
	hack/build-collection.sh

bundle: images collection ## Write the dark-site bundle dist/gatehouse-bundle-<version>.tar.gz
	$(VENV)/bin/python hack/make-bundle.py --collection $(COLLECTION)

bench: venv ## Benchmarks (bench/)
	@if [[ -f bench/__main__.py ]]; then $(VENV)/bin/python -m bench $(BENCH_ARGS); \
	else echo "make bench: no benchmarks yet (bench/__main__.py is missing)" >&2; exit 2; fi

clean: ## Remove build output, caches and test output (not the venv, not images)
	rm -rf build dist tests/output .pytest_cache .ruff_cache
	find plugins files tests bench hack -name __pycache__ -type d -prune -exec rm -rf {} +

clean-images: ## Remove the gatehouse/* images of this version (and the base) and stale builds
	docker images --format '{{.Repository}}:{{.Tag}}' | grep -E '^gatehouse/[a-z-]+:$(VERSION)$$' \
		| xargs -r docker rmi
	docker image prune --force --filter label=gatehouse.base.packages-sha256 >/dev/null
	docker image prune --force --filter label=gatehouse.identity-test.sha256 >/dev/null
	docker image prune --force --filter label=gatehouse.registry-test.sha256 >/dev/null
	docker image prune --force --filter label=gatehouse.firewalld-test.sha256 >/dev/null
	docker image prune --force --filter label=gatehouse.ee-base.sha256 >/dev/null
	docker image prune --force --filter label=gatehouse.postgres.sha256 >/dev/null
