# a2ad: the two commands are `make run` and `make test`; everything they need
# is installed into .venv from pyproject.toml.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PORT ?= 8470
AGENT_PORT ?= 9001

.PHONY: install run test lint typecheck format unit integration acceptance clean bench bench-quick \
	soak wheelhouse chromium postgresql

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "a2ad needs Python 3.11 or newer (found $$($(BIN)/python -V))"; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

## run: a2ad on a2ad.toml with the demo agent beside it; Ctrl-C stops both.
run: install
	@mkdir -p var
	@trap 'kill $$agent 2>/dev/null; wait $$agent 2>/dev/null' EXIT INT TERM; \
	$(BIN)/python -m a2ad.demo_agent --port $(AGENT_PORT) --delay 2 \
		--a2ad http://127.0.0.1:$(PORT) --workspace demo --token demo-heartbeat-token & agent=$$!; \
	echo; \
	echo "a2ad on http://127.0.0.1:$(PORT), the demo agent on http://127.0.0.1:$(AGENT_PORT)"; \
	echo "Send a first message:"; \
	echo "  curl -s http://127.0.0.1:$(PORT)/workspaces/demo/a2a -H 'Content-Type: application/json' \\"; \
	echo "    -d '{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"message/send\",\"params\":{\"message\":{\"role\":\"user\",\"messageId\":\"m-1\",\"parts\":[{\"kind\":\"text\",\"text\":\"hello\"}]}}}'"; \
	echo; \
	$(BIN)/a2ad serve --config a2ad.toml

## test: lint, type checks, then every test tier.
test: install chromium postgresql lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider

## chromium: Debian's chromium, for the status page's browser test. Playwright's own
## browser download cannot run on air-gapped machines, so the test drives this one.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "chromium is missing; installing Debian's chromium with apt-get"; \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends chromium; } >/dev/null || \
			{ echo "could not install chromium (apt-get failed); the status page's browser test needs it"; exit 1; }; \
	}

## postgresql: Debian's PostgreSQL server programs; the store's tests start their own
## throwaway server from them (initdb in a temporary folder), never a system one.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "PostgreSQL is missing; installing Debian's postgresql with apt-get"; \
		{ apt-get update -q && apt-get install -y -q --no-install-recommends postgresql; } >/dev/null || \
			{ echo "could not install postgresql (apt-get failed); the PostgreSQL store's tests need it"; exit 1; }; \
	}

## soak: kill -9 a2ad at random moments under load, 100 times, and reconcile; the
## admission stress test, bigger; then fuzz every endpoint and the admission
## invariants with ten times the examples, freshly random.
soak: install
	A2AD_SOAK_TRIALS=$${A2AD_SOAK_TRIALS:-100} $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/acceptance/test_soak.py
	A2AD_STRESS_ROUNDS=$${A2AD_STRESS_ROUNDS:-4} A2AD_STRESS_ROWS=$${A2AD_STRESS_ROWS:-400000} \
		A2AD_STRESS_SIGTERMS=$${A2AD_STRESS_SIGTERMS:-12} $(BIN)/python -m pytest -q \
		-p no:cacheprovider tests/acceptance/test_admission_stress.py
	A2AD_FUZZ_EXPLORE=$${A2AD_FUZZ_EXPLORE:-10} $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/integration/test_fuzz.py tests/integration/test_admission_invariants.py

## wheelhouse: a2ad and every runtime dependency as wheels in dist/wheelhouse/ (the
## PostgreSQL extra's too), for machines without network:
## pip install --no-index --find-links dist/wheelhouse a2ad   (or 'a2ad[postgres]')
wheelhouse: install
	rm -rf dist/wheelhouse
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --wheel-dir dist/wheelhouse '.[postgres]'

lint: install
	$(BIN)/ruff check a2ad tests bench
	$(BIN)/ruff format --check a2ad tests bench

typecheck: install
	$(BIN)/mypy

format: install
	$(BIN)/ruff format a2ad tests bench
	$(BIN)/ruff check --fix a2ad tests bench

unit integration acceptance: install
	$(BIN)/python -m pytest -q tests/$@

clean:
	rm -rf $(VENV) var dist build *.egg-info .mypy_cache .ruff_cache .pytest_cache

## bench: every benchmark scenario (about ten minutes on 2 cores); prints the table
## and writes bench/results/<timestamp>.json. BENCH_ARGS passes options to bench/run.py,
## e.g. BENCH_ARGS="--only proxy,enqueue" or BENCH_ARGS="--profile py-spy".
bench: install
	@command -v wrk >/dev/null 2>&1 || { \
		echo "bench: wrk is missing; installing Debian's wrk with apt-get"; \
		{ apt-get update -q && apt-get install -y -q wrk; } >/dev/null || \
			echo "bench: could not install wrk; the enqueue scenario falls back to the Python generator"; \
	}
	$(BIN)/python -m bench.run $(BENCH_ARGS)

## bench-quick: every scenario, briefly (about a minute); the Python generator stands
## in for wrk when wrk is not installed.
bench-quick: install
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)
