# Each target creates the virtual environment it needs (CPU PyTorch pinned), then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
CHROMIUM := /usr/bin/chromium
# Playwright drives the system's Chromium; it must never download a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD := 1

.PHONY: demo test docs bench lint clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/codebook demo

# Debian's Chromium for the browser tests (once; as root, as on CI).
$(CHROMIUM):
	@echo "installing Debian's chromium for the browser tests"
	@log=$$(mktemp); export DEBIAN_FRONTEND=noninteractive; \
	  if (apt-get update -qq && apt-get install -y -qq chromium) > $$log 2>&1; then rm -f $$log; \
	  else tail -n 20 $$log; rm -f $$log; exit 1; fi

# The tests include the strict documentation build (tests/test_docs.py).
test: $(BIN)/.installed $(CHROMIUM)
	$(BIN)/python -m pytest -q

# The documentation site, offline, into site/; strict: a broken link or anchor fails.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/snap.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site
