# The handful of commands a newcomer needs. Each creates .venv on first use.
.PHONY: run test test-fast lint format bench venv

venv:
	@scripts/bootstrap

run: venv          ## the mesh on this machine (control plane, agent, demo web + api with sidecars); make run ARGS="--http-addr 127.0.0.1:8600"
	.venv/bin/mesh dev $(ARGS)

# Each test file runs whole on one worker: its module fixtures (servers, clouds)
# start once, and tests that build on the file's earlier ones keep their order.
test: venv         ## run the whole test suite
	.venv/bin/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: venv    ## unit tests only (no server processes)
	.venv/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: venv
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

bench: venv
	.venv/bin/python bench/registry.py
