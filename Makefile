# dagcast: `make demo` runs a real DAG-only deploy end to end on the embedded stack;
# `make test` installs everything and runs lint, types and the whole test suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

STAGE       ?= dev
PACKAGE_DIR ?= build/$(STAGE)

# checkov pins boto3 (and packaging) to versions older than ours, so it gets a virtualenv of its own.
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV    := $(VENV)/checkov
CHECKOV_STAMP   := $(CHECKOV_VENV)/.installed-$(CHECKOV_VERSION)

.PHONY: install demo test lint unit integration bench package deploy clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev,airflow]'
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	touch $(STAMP)

install: $(STAMP)

$(CHECKOV_STAMP):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q 'checkov==$(CHECKOV_VERSION)'
	touch $(CHECKOV_STAMP)

demo: install
	$(PY) examples/demo.py

# Also the packaged template: cfn-lint (in `package`) and checkov, whose every skip is explained in the template.
lint: install package $(CHECKOV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy app.py chalicelib dagcast
	$(CHECKOV_VENV)/bin/checkov -f $(PACKAGE_DIR)/sam.yaml --framework cloudformation --skip-download --compact --quiet
	$(VENV)/bin/hadolint Dockerfile Dockerfile.airflow

test: install lint
	$(PY) -m pytest -q -p no:cacheprovider

unit: install
	$(PY) -m pytest -q tests/unit

integration: install
	$(PY) -m pytest -q tests/integration tests/e2e

bench: install
	$(PY) bench/bundle_bench.py
	$(PY) bench/validate_bench.py
	$(PY) bench/sidecar_bench.py
	$(PY) bench/e2e.py
	$(PY) bench/cli_overhead.py
	$(PY) bench/wait_notice.py
	$(PY) bench/durable.py
	$(PY) bench/delta_bench.py
	$(PY) bench/packaging_bench.py

# The deployable template and zip, offline: no AWS credentials needed (the zip's
# dependencies come from PyPI, like the rest of the install).
package: install
	rm -rf $(PACKAGE_DIR)
	AWS_DEFAULT_REGION=$${AWS_DEFAULT_REGION:-us-east-1} $(VENV)/bin/chalice package --stage $(STAGE) \
		--merge-template infra/resources.yaml --pkg-format cloudformation --template-format yaml $(PACKAGE_DIR)
	$(VENV)/bin/cfn-lint $(PACKAGE_DIR)/sam.yaml
	@echo "packaged: $(PACKAGE_DIR)/sam.yaml and $(PACKAGE_DIR)/deployment.zip"

# Needs the AWS CLI, credentials, and ARTIFACT_BUCKET (an S3 bucket for the code zip).
deploy: package
	@test -n "$(ARTIFACT_BUCKET)" || (echo "set ARTIFACT_BUCKET=<an S3 bucket for the code zip>"; exit 2)
	aws cloudformation package --template-file $(PACKAGE_DIR)/sam.yaml --s3-bucket $(ARTIFACT_BUCKET) \
		--output-template-file $(PACKAGE_DIR)/packaged.yaml
	aws cloudformation deploy --template-file $(PACKAGE_DIR)/packaged.yaml --stack-name dagcast-$(STAGE) \
		--capabilities CAPABILITY_IAM CAPABILITY_AUTO_EXPAND
	@aws cloudformation describe-stacks --stack-name dagcast-$(STAGE) \
		--query "Stacks[0].Outputs[?OutputKey=='EndpointURL' || OutputKey=='FirstAdminToken'].[OutputKey,OutputValue]" --output text

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
