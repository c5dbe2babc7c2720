# `make demo` and `make test` each set everything up on a fresh machine (Python 3.10-3.12).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Tests and the demo run on 2 cores: one BLAS thread each avoids 10-40x oversubscription slowdowns;
# albumentations (imported by img2dataset) otherwise calls PyPI from every worker.
export OMP_NUM_THREADS ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install chromium demo lint test test-fast mutation bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,spark]'
	touch $(STAMP)

# The main job on the embedded default: build the demo corpus from the built-in sample web,
# train both stages of the tiny model on it, evaluate, print the tables; the build writes
# manifests/demo/report.html, the last line runs/demo/report.html.
demo: $(STAMP)
	$(BIN)/cnclip corpus build recipes/demo.yaml
	$(BIN)/cnclip corpus stats manifests/demo
	$(BIN)/cnclip train recipes/train-demo.yaml
	$(BIN)/cnclip train report runs/demo

# pyflakes, bugbear, import order, naming, pycodestyle: configured in pyproject.toml [tool.ruff].
lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools

# Two pytest workers (pytest-xdist): much of the suite waits on servers, subprocesses and timeouts,
# so two keep both cores busy; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: lint chromium
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The browser tests render pages in headless Chromium: Debian's package, installed when missing
# (as root through apt-get; otherwise the tests say they cannot find it and how to install it).
CHROMIUM ?= $(shell command -v chromium || command -v chromium-browser)
chromium:
	@if [ -z "$(CHROMIUM)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found: the browser tests will fail; install it (apt-get install chromium) or run pytest -m 'not browser'"; fi; \
	fi

# While iterating: everything but the end-to-end builds.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m 'not slow'

# Mutation testing over the areas of tools/mutation_areas.toml (not part of `make test`: minutes
# per area on 2 cores). `make mutation AREAS="text dedup"` runs some; see README "Testing".
mutation: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test,spark,mutation]'
	$(BIN)/python tools/mutation.py $(AREAS)

# Speed and memory targets: each benchmark prints its figures and a ratio to a baseline run beside it.
# CNCLIP_BENCH_SMALL=1 make bench: the same code on tiny inputs, seconds each (what make test runs).
bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf data/demo manifests/demo runs/demo .pytest_cache
