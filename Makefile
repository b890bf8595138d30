# The README's two commands are `make run` and `make test`; the rest are parts of them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 9000
# The channels whose recent messages `make run` keeps (history_channels), so
# that the demo page's channels are recoverable; `make run HISTORY=` for none.
HISTORY ?= *
RUFF_OPTS := --line-length 100 --target-version py311
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint install redis-server node-clients browser screenshot conformance fuzz bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Dependencies are reinstalled only when the packaging files change.
$(VENV)/.deps: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet '.[test,lint]'
	touch $@

# A real (not editable) install, every time: twistd finds plugins only in an
# installed twisted/plugins, and the tests run the installed `twistd pubsub`.
install: $(VENV)/.deps
	rm -rf build  # setuptools' in-tree copy would carry files deleted since
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation --force-reinstall .

run: install
	$(BIN)/twistd -n pubsub --port $(PORT) --history-channels '$(HISTORY)'

# The differential tests compare against a real Redis 7; they start their own.
# Debian's redis-server brings redis-tools, whose redis-cli the RESP tests drive.
redis-server:
	@command -v redis-server >/dev/null && command -v redis-cli >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server redis-tools; }

# ioredis and node-redis, which the RESP tests drive (tests/clients/package.json).
node-clients:
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nodejs npm; }
	npm ci --silent --no-audit --no-fund --prefix tests/clients

# Debian's Chromium, which the browser tests drive through Playwright for Python
# (tests/browser); Playwright's own browser downloads are never used.
browser:
	@[ -x /usr/bin/chromium ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

lint: install
	$(BIN)/ruff check $(RUFF_OPTS) --extend-select I,B pubsub tests twisted bench docs/examples
	$(BIN)/ruff format --check $(RUFF_OPTS) pubsub tests twisted bench docs/examples
	$(BIN)/mypy
	$(BIN)/lint-imports

# docs/demo.png: the demo page after two pages exchanged a few messages, and one
# recovered after the page was away.
screenshot: install browser
	$(BIN)/python -m tests.browser.demo docs/demo.png

# The Autobahn TestSuite against /echo and /; reports in reports/conformance.
conformance: install
	$(BIN)/python tests/conformance/run_conformance.py --reports reports/conformance

# Coverage-guided fuzzing (atheris, tests/fuzz) of the JSON command decoder, the
# WebSocket reader and the RESP request reader: FUZZ_SECONDS each, on a copy of
# each committed corpus. A crash, a hang (-timeout) or an unexpected exception
# fails it, with the input kept in reports/fuzz.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := json websocket resp
fuzz: install
	@mkdir -p reports/fuzz
	@for target in $(FUZZ_TARGETS); do \
	  work=$$(mktemp -d) && cp -r tests/fuzz/corpus/$$target/. $$work/ && \
	  dict=$$([ -f tests/fuzz/$$target.dict ] && echo -dict=tests/fuzz/$$target.dict); \
	  echo "fuzz $$target: $(FUZZ_SECONDS) s"; \
	  $(BIN)/python tests/fuzz/fuzz_$$target.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	    -artifact_prefix=reports/fuzz/$$target- $$dict $$work >reports/fuzz/$$target.log 2>&1; \
	  status=$$?; rm -rf $$work; \
	  if [ $$status -ne 0 ]; then \
	    grep -v '^INFO: Instrumenting' reports/fuzz/$$target.log | tail -60; \
	    echo "fuzz $$target FAILED (exit $$status): log and input in reports/fuzz" >&2; exit 1; \
	  fi; \
	  grep -E '^Done [0-9]+ runs|not present yet' reports/fuzz/$$target.log || true; \
	done

# pytest last, under coverage (setup.cfg), whose figure closes the run and fails
# it below the floor; a short fuzzing run before it.
test: FUZZ_SECONDS = 15
test: install redis-server node-clients browser lint conformance fuzz
	rm -f .coverage .coverage.*
	PUBSUB_REQUIRE_REDIS=1 $(BIN)/coverage run -m pytest
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

# pubsub against a real redis-server, same machine, same run; see docs/benchmarks.md.
# Quick look: make bench ROUNDS=1 SCALE=0.1 (more options: BENCH_ARGS=--help).
bench: install redis-server
	@command -v node >/dev/null || { echo "make bench needs Node.js (node) on PATH" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --no-build-isolation '.[bench]'
	$(BIN)/python bench/run.py --rounds $(or $(ROUNDS),3) --scale $(or $(SCALE),1) $(BENCH_ARGS)
