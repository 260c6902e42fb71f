# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipforge-installed

.PHONY: demo test test-fast lint format clean venv debian-packages bench-data

$(STAMP): requirements/lock.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23"
	$(PY) -m pip install --quiet -r requirements/lock.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m clipforge demo

# Debian packages some tests need (the emoji font for the emoji renderer's test). Installed when missing and this
# is root with apt-get (CI, a fresh container); elsewhere the command to run is printed and those tests fail.
DEBIAN_PACKAGES := fonts-noto-color-emoji iso-codes
debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		else echo "missing Debian packages: $$missing (sudo apt-get install $$missing)"; fi; \
	fi

# The real captions the benchmarks read (Tux Paint stamp descriptions and translations, Openclipart titles;
# ~185 MB download); without them they fall back to synthetic captions and say so.
bench-data:
	$(MAKE) debian-packages DEBIAN_PACKAGES="tuxpaint-stamps-default openclipart-svg iso-codes"

test: $(STAMP) debian-packages
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m pytest -q tests

# The tier to run while working (about a minute on 2 cores): every test not marked slow. `make test` stays CI's.
test-fast: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m ruff format --check src tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
