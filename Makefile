# The only commands a newcomer needs: `make run` and `make test`. `make lint`, `make gen`, `make bench` for changes.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
DATA    ?= .data

.PHONY: setup emulators ts-deps run test faults lint gen api-baseline bench bench-quick mutate wheel clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./clients/python -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## The storage emulators the tests start that are not Python packages: Azurite (Azure Blob), from npm, into .tools/.
## Tests whose emulator is missing skip with a message (fail under CI=true); `make test` installs them when npm is there.
AZURITE := .tools/azurite/node_modules/.bin/azurite-blob
$(AZURITE):
	@if command -v npm >/dev/null 2>&1 || [ "$$CI" = true ]; then \
		npm install --silent --no-audit --no-fund --prefix .tools/azurite azurite@3.35.0; \
	else echo "make: npm not found: the Azure storage tests will skip (install Node.js and npm to run them)"; fi

emulators: $(AZURITE)

## The TypeScript client's packages (clients/typescript/package-lock.json), for its tests and `make gen`. Without npm
## its tests skip with a message (fail under CI=true).
TS_DEPS := clients/typescript/node_modules/.installed-stamp
$(TS_DEPS): clients/typescript/package-lock.json
	@if command -v npm >/dev/null 2>&1 || [ "$$CI" = true ]; then \
		npm ci --silent --no-audit --no-fund --prefix clients/typescript && touch $@; \
	else echo "make: npm not found: the TypeScript client's tests will skip (install Node.js 20+ and npm to run them)"; fi

ts-deps: $(TS_DEPS)

## Serve the example product on 127.0.0.1:50051 with the embedded SQLite store under $(DATA)/, and the example
## mailer stub on 127.0.0.1:8025 that the product's `mailer` app calls in its `dev` environment.
run: setup
	@$(PY) examples/mailer_stub.py & stub=$$!; trap 'kill $$stub 2>/dev/null' EXIT INT TERM; \
	PROCESSOR_DATA_DIR=$(DATA) $(VENV)/bin/ductape-processor serve --manifest examples/shop.yaml \
		--secrets-file examples/secrets.env --log-format text

## Run the whole test suite (PostgreSQL tests skip with a message when no server is reachable, fail under CI=true).
test: setup emulators ts-deps
	$(PY) -m pytest $(PYTEST_ARGS)

## Only the fault-injection tests (terminated store connections, kill -9 of a replica), with their figures printed.
## `make test` runs them too.
faults: setup
	$(PY) -m pytest -m faults -s $(PYTEST_ARGS)

lint: setup ts-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy server/ductape_processor clients/python/ductape/processor
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format --diff --exit-code
	$(VENV)/bin/buf breaking --against api/baseline.json
	@if [ -x clients/typescript/node_modules/.bin/tsc ]; then clients/typescript/node_modules/.bin/tsc -p clients/typescript --noEmit; \
	else echo "make: the TypeScript client is not type-checked (no clients/typescript/node_modules)"; fi

## Regenerate every client's code (Python stubs, TypeScript modules) and the manifest JSON Schema (all checked in).
gen: setup ts-deps
	$(PY) scripts/gen_protos.py
	$(VENV)/bin/ductape-processor schema > docs/manifest.schema.json

## Move the API baseline that `make lint`'s breaking-change check compares protos/ with (docs/api.md#breaking-changes):
## on a release, or in the commit that makes an agreed breaking change.
api-baseline: setup
	$(VENV)/bin/buf build --exclude-source-info -o api/baseline.json
	$(PY) -c 'import json, pathlib; p = pathlib.Path("api/baseline.json"); \
		p.write_text(json.dumps(json.loads(p.read_text()), indent=1, sort_keys=True) + "\n")'

bench: setup ts-deps
	$(PY) bench/bench_foundation.py
	$(PY) bench/bench_actions.py
	$(PY) bench/bench_sessions.py
	$(PY) bench/bench_brokers.py
	$(PY) bench/bench_databases.py
	$(PY) bench/bench_storage.py
	$(PY) bench/bench_notifications.py
	$(PY) bench/bench_jobs.py
	$(PY) bench/bench_clients.py
	$(PY) bench/bench_webhooks.py
	$(PY) bench/bench_features.py

## Every benchmark once, short (--quick: one round of 1 s runs, smaller loads): about 3 minutes on a quiet machine,
## a check during changes; `make bench` gives the figures to quote. BENCH_QUICK_DIR keeps each script's --json.
BENCH_QUICK_DIR ?= .bench-quick
bench-quick: setup ts-deps
	mkdir -p $(BENCH_QUICK_DIR)
	$(PY) bench/bench_foundation.py --quick --json $(BENCH_QUICK_DIR)/bench_foundation.json
	$(PY) bench/bench_actions.py --quick --json $(BENCH_QUICK_DIR)/bench_actions.json
	$(PY) bench/bench_sessions.py --quick --json $(BENCH_QUICK_DIR)/bench_sessions.json
	$(PY) bench/bench_brokers.py --quick --json $(BENCH_QUICK_DIR)/bench_brokers.json
	$(PY) bench/bench_databases.py --quick --json $(BENCH_QUICK_DIR)/bench_databases.json
	$(PY) bench/bench_storage.py --quick --json $(BENCH_QUICK_DIR)/bench_storage.json
	$(PY) bench/bench_notifications.py --quick --json $(BENCH_QUICK_DIR)/bench_notifications.json
	$(PY) bench/bench_jobs.py --quick --processes 1 --triggers 300 --json $(BENCH_QUICK_DIR)/bench_jobs.json
	$(PY) bench/bench_clients.py --quick --json $(BENCH_QUICK_DIR)/bench_clients.json
	$(PY) bench/bench_webhooks.py --quick --json $(BENCH_QUICK_DIR)/bench_webhooks.json
	$(PY) bench/bench_features.py --quick --json $(BENCH_QUICK_DIR)/bench_features.json

## Mutation testing (cosmic-ray) of the security-critical modules, each in a scratch copy under .mutate/; prints the
## surviving mutants (docs/mutation.md has the verdict on each). Not part of `make test`. MUTATE_ARGS="--module auth".
mutate: setup
	$(PY) scripts/mutate.py $(MUTATE_ARGS)

wheel: setup
	$(PY) -m build --wheel --no-isolation --outdir dist clients/python

clean:
	rm -rf $(VENV) $(DATA) $(BENCH_QUICK_DIR) dist .mypy_cache .ruff_cache .pytest_cache .mutate .tools clients/typescript/node_modules \
		clients/typescript/dist
