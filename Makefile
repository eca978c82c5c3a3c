# Sluice developer entry points. Everything a test needs is installed here.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench check clean deps docker-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

deps: $(STAMP)
	@bash scripts/ensure-binaries.sh redis-server redis-sentinel redis-cli nginx promtool openssl chromium

run: $(STAMP)
	$(BIN)/python -m proxy.demo --rules rules.yaml

test: deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy
	SLUICE_ADMIN_TOKEN=$${SLUICE_ADMIN_TOKEN:-placeholder-token-for-lint} \
		$(BIN)/sluice check rules.yaml $(wildcard config/*.yaml) $(wildcard deploy/*/rules.yaml) >/dev/null

bench: $(STAMP)
	@bash scripts/ensure-binaries.sh redis-server nginx wrk
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# Docker cannot run here: replay the Dockerfile's steps in a clean venv instead.
docker-check:
	bash scripts/docker-steps.sh
