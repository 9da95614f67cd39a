# Two commands do all the set-up on a fresh machine:
#   make train   - create .venv (first time), then run the default training job (CPU, digits, no network)
#   make test    - create .venv (first time), then run the test suite
# Extra Hydra overrides: make train ARGS="model=unet_tiny trainer.max_steps=200"
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: train test setup
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

train: setup
	$(BIN)/python -m diffexp.train $(ARGS)

test: setup
	$(BIN)/python -m pytest $(ARGS)
