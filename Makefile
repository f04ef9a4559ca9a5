# Two entry points: `make train` and `make test`. Both create .venv/ on first use and reuse it after.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: train test lint summary clean-venv

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# setuptools' 10-line notice that an editable install follows the source folder: that is why we use one.
	PYTHONWARNINGS=ignore::UserWarning $(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

train: $(VENV)/.installed
	$(PY) train.py $(ARGS)

# The suite on every core (pytest-xdist); --dist loadfile keeps each test file on one worker, so the runs a
# file's module fixtures train are trained once. TEST_WORKERS=0 runs it in this process alone.
TEST_WORKERS ?= auto

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# ruff: style and real mistakes; lint-imports: the package's layers (pyproject.toml's import-linter contract).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

summary: $(VENV)/.installed
	$(PY) scripts/model_summary.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
