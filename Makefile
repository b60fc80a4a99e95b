# Set-up and entry points. `make run` and `make test` work on a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(CURDIR)/.flwr
export TMPDIR=$(CURDIR)/.tmp
export RAY_TMPDIR=$(CURDIR)/.tmp
export MPLBACKEND=Agg

.PHONY: run test test-slow install clean

$(STAMP): pyproject.toml
	@mkdir -p .tmp .flwr
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/cnfgnn experiment=synthetic_cnfgnn

test: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) .tmp .flwr outputs
