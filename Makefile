# The two commands in the README. Each one sets up .venv first (scripts/bootstrap.sh; it is a
# no-op when nothing changed), so both work on a fresh machine with nothing installed.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup train test lint check-kernels clean

setup:
	FASTSAE_VENV=$(VENV) bash scripts/bootstrap.sh

train: setup
	$(PY) -m fastsae.train $(ARGS)

test: setup lint
	bash scripts/run_tests.sh $(PY)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
