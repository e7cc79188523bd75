# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test lint generate clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# torch first: a CPU wheel on local disk; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

serve: install
	@echo "qserve: serving the demo model on http://$(HOST):$(PORT) (Ctrl-C stops it). Try, from another shell:"
	@echo "  curl http://$(HOST):$(PORT)/v1/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"demo\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 64, \"temperature\": 0}'"
	$(VENV)/bin/qserve serve demo --host $(HOST) --port $(PORT)

test: install
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m mypy qserve kernels converters models
	$(VPY) -m pytest

lint: install
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info
