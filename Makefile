# Two entry points do all set-up on a fresh machine:  make demo  and  make test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.14.1 and torchvision 0.29.1 lie on this machine's disk (torchvision does not import
# beside the 2.13.0 CPU build there); elsewhere pip fetches them from PyPI. Override with a
# pair that imports together, e.g. TORCH_SPEC="torch==2.9.1 torchvision==0.24.1" on aarch64.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# the tests run single-threaded (tests/conftest.py), so make test runs them in this many
# worker processes, a test file per worker at a time (pytest-xdist); 1: one process
TEST_WORKERS ?= 2

.PHONY: demo test lint typecheck bench docs data browser clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,torchvision,timm,export]'
	touch $@

data:
	@scripts/ensure-fashion-mnist.sh

# headless Chromium for tests/test_browser.py
browser:
	@scripts/ensure-chromium.sh

demo: $(VENV)/.installed data
	$(VENV)/bin/python scripts/demo.py

test: $(VENV)/.installed data browser
	$(PY) -m pytest $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks scripts

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

bench: $(VENV)/.installed data
	$(PY) -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) benchmarks/disassembly.py
	$(PY) benchmarks/assembly.py
	$(PY) benchmarks/assembly.py --joint-epochs 0
	$(PY) benchmarks/routers.py
	$(PY) benchmarks/strategies.py
	$(PY) benchmarks/compression.py
	$(PY) benchmarks/distillation.py
	$(PY) benchmarks/tables.py --docs

# the documentation site (mkdocs.yml, docs/) into out/site/; `$(VENV)/bin/mkdocs serve` serves it
docs: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir out/site

clean:
	rm -rf $(VENV) out .pytest_cache
