# Two commands do all the set-up: `make demo` and `make test` create (and then reuse) a local virtual environment.
VENV ?= .venv
PYTHON ?= python3
# A CPU build of torch by default; on a GPU machine: make TORCH="torch" test
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test slow lint bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2

slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check sdlora_peft tests examples benchmarks
	$(PY) -m ruff format --check sdlora_peft tests examples benchmarks
	$(PY) -m mypy sdlora_peft
