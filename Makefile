# Quickstart: `make run` (set-up + local end-to-end job), `make test` (set-up + whole suite).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20

.PHONY: setup run test lint synth clean

$(BIN)/marketrank: pyproject.toml training/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python -e ".[all,dev]"
	@touch $@

setup: $(BIN)/marketrank

run: setup
	$(BIN)/marketrank run

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

# CloudFormation templates into cdk.out/, offline (no AWS, no npm CLI); cdk-nag runs and fails it on a finding.
# `make synth STAGE=prod` for another stage of cdk.json.
synth: setup
	MARKETRANK_CDK_CONTEXT='$(if $(STAGE),{"marketrank:stage": "$(STAGE)"})' $(BIN)/python -m infra.app

clean:
	rm -rf $(VENV) workspace cdk.out .pytest_cache
