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

.PHONY: run test test-slow install clean bench deploy-demo test-deployment lint

$(STAMP): pyproject.toml
	@mkdir -p .tmp .flwr
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# CNFGNN, GRU local, GRU + FedAvg and GRU centralized on the synthetic network, one budget
# (cnfgnn/compare.py); RUN_ARGS: more settings, e.g. RUN_ARGS="compare.run=all"
run: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/cnfgnn-compare $(RUN_ARGS)

# the tests start several processes at once (Flower apps, subprocesses): idle OpenMP workers
# sleep instead of spinning (cnfgnn/__init__.py)
test test-slow test-deployment: export OMP_WAIT_POLICY ?= PASSIVE

test: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/python -m pytest -q

# ruff (pyflakes, pycodestyle, import order, bugbear, pyupgrade, docstrings) and its
# formatter, then mypy on the core packages; settings in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check cnfgnn tests
	$(BIN)/ruff format --check cnfgnn tests
	$(BIN)/mypy cnfgnn/federation cnfgnn/models cnfgnn/data

test-slow: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/python -m pytest -q -m slow

# every engine side by side on the same data (cnfgnn/bench/engines.py); BENCH_ARGS: Hydra overrides
bench: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/cnfgnn-bench $(BENCH_ARGS)

# a real Flower deployment on loopback (cnfgnn/deploy/): SuperLink + 3 SuperNodes, 2 rounds;
# DEPLOY_ARGS: more Hydra overrides
deploy-demo: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/cnfgnn-deploy demo $(DEPLOY_ARGS)

# tests that start SuperLink/SuperNode processes (tests/deployment, marker `deployment`)
test-deployment: $(STAMP)
	@mkdir -p .tmp .flwr
	$(BIN)/python -m pytest -q -m deployment tests/deployment

clean:
	rm -rf $(VENV) .tmp .flwr outputs
