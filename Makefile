# Two commands a user needs: `make run` and `make test`. Everything else is a helper of these.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
STAMP_DASH := $(VENV)/.installed-dashboard
APT_PACKAGES := socat mosquitto chromium openssl
PYTEST_ARGS ?=

.PHONY: run test dashboard lint bench sample-lake clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[all]'
	touch $@ $(STAMP_RUN)

## make run: create the venv, install, run the talk's demo into ./data/lake (Ctrl-C stops it)
run: $(STAMP_RUN)
	$(BIN)/collector run sample_data/temp.yaml

## make test: install everything the tests need (Python extras and Debian packages), run them all
test: $(STAMP_TEST) system-deps
	$(BIN)/ruff check collector sinks dashboards tests benchmarks sample_data
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

$(STAMP_DASH): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dashboard]'
	touch $@

## make dashboard: the Streamlit dashboard on ./data/lake (or the sample lake), on 127.0.0.1 only
dashboard: $(STAMP_DASH)
	$(BIN)/streamlit run dashboards/app.py --server.address 127.0.0.1

system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

lint: $(STAMP_TEST)
	$(BIN)/ruff check collector sinks dashboards tests benchmarks sample_data
	$(BIN)/ruff format --check collector sinks dashboards tests benchmarks

## make bench: run the benchmarks and rewrite the table in README.md
bench: $(STAMP_TEST)
	$(BIN)/python -m benchmarks.run_all

## make sample-lake: regenerate sample_data/lake (deterministic)
sample-lake: $(STAMP_RUN)
	$(BIN)/python -m sample_data.make_lake

clean:
	rm -rf $(VENV) data .pytest_cache
