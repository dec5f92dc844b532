# Quickstart: `make run` (set-up + local end-to-end job), `make test` (set-up + whole suite).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: setup run test lint synth clean cdk-cli localstack bench

$(BIN)/marketrank: pyproject.toml training/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e ".[all,dev]"
	@touch $@

setup: $(BIN)/marketrank

# The npm `aws-cdk` CLI pinned in package.json/package-lock.json: `cdk deploy` and the emulator deploy tests.
cdk-cli: node_modules/.bin/cdk

node_modules/.bin/cdk: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# LocalStack community in host mode (no Docker) for the emulator deploy tests, in its own Python 3.13 venv
# (localstack-core needs 3.13, the project 3.11): the machine's pyenv 3.13 if there is one, else uv finds or
# downloads a 3.13 (`make localstack PYTHON313=/path/to/python3.13` to choose).
LOCALSTACK_VENV ?= .venv-localstack
PYTHON313 ?= $(or $(lastword $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.13*/bin/python3.13)),3.13)

localstack: $(LOCALSTACK_VENV)/.installed

$(LOCALSTACK_VENV)/.installed: tests/localstack-requirements.txt | $(BIN)/marketrank
	rm -rf $(LOCALSTACK_VENV)
	$(BIN)/uv venv --quiet --python $(PYTHON313) $(LOCALSTACK_VENV)
	$(BIN)/uv pip install --quiet --python $(LOCALSTACK_VENV)/bin/python -r $<
	@touch $@

run: setup
	$(BIN)/marketrank run

# Every benchmark (quality, unbiased, train, serve) -> benchmarks/results/*.json + PNG, BENCHMARKS.md.
bench: setup
	$(BIN)/marketrank bench all

# The emulator deploy tests need the npm `cdk` CLI and LocalStack's venv; `make run` needs neither.
test: setup cdk-cli localstack
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# CloudFormation templates into cdk.out/, offline (no AWS, no npm CLI); cdk-nag runs and fails it on a finding.
# `make synth STAGE=prod` for another stage of cdk.json.
synth: setup
	MARKETRANK_CDK_CONTEXT='$(if $(STAGE),{"marketrank:stage": "$(STAGE)"})' $(BIN)/python -m infra.app

clean:
	rm -rf $(VENV) $(LOCALSTACK_VENV) node_modules workspace cdk.out .pytest_cache
