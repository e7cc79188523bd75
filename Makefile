# Two commands set everything up on a fresh machine: `make serve` and `make test`.
# Both install from the lock files in requirements/ (exact versions, sha256 hashes); `make lock` refreshes them.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

# torch goes in first, on its own: which build is right depends on the machine, so it is pinned by version here
# and left out of the locks. A bare `torch==2.13.0` takes the CPU wheel on this project's machines (it lies on
# their disk) and the CUDA build from PyPI on an ordinary Linux machine. TORCH_INDEX picks the build elsewhere:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu     # the CPU-only build
#   make serve TORCH_INDEX=https://download.pytorch.org/whl/cu128  # a given CUDA build
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
# Where `make lock` reads the CPU build of torch's metadata (torch's own dependencies are locked, torch is not).
LOCK_TORCH_FROM ?= --find-links /opt/wheels
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --override requirements/torch-cpu.txt \
	--no-emit-package torch $(LOCK_TORCH_FROM) --custom-compile-command "make lock"
PIP_LOCKED := -m pip install -q --require-hashes --no-deps

.PHONY: install install-serve serve test check aot lock test-latest lint clean

$(VENV)/.torch: requirements/pip.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) $(PIP_LOCKED) -r requirements/pip.txt
	$(VPY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)'
	touch $@

# What serving needs: the library and its `server` extra.
$(VENV)/.serve: $(VENV)/.torch pyproject.toml requirements/serve.txt
	$(VPY) $(PIP_LOCKED) -r requirements/serve.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	$(VPY) -m pip check
	touch $@

# The dev set (tests, lint, Triton for the interpreter tests, Ray for --replicas); a superset of serve.txt
# with the same pins, so it satisfies the serve marker too.
$(VENV)/.dev: $(VENV)/.torch pyproject.toml requirements/dev.txt
	$(VPY) $(PIP_LOCKED) -r requirements/dev.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	$(VPY) -m pip check
	touch $@ $(VENV)/.serve

install-serve: $(VENV)/.serve
install: $(VENV)/.dev

serve: install-serve
	@echo "qserve: serving the demo model on http://$(HOST):$(PORT) (Ctrl-C stops it). Try, from another shell:"
	@echo "  curl http://$(HOST):$(PORT)/v1/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"demo\", \"prompt\": \"def fibonacci(n):\", \"max_tokens\": 64, \"temperature\": 0}'"
	$(VENV)/bin/qserve serve demo --host $(HOST) --port $(PORT)

test: install check

# The ahead-of-time kernel check: every Triton kernel x autotune config x dtype, compiled to sm_80 and sm_90
# cubins with triton's bundled ptxas (no GPU); fails on a compile error, shared memory over the limit or a
# spill. Per-variant results: $(AOT_JSON). AOT_FLAGS=--full compiles the whole cross product (many times longer).
AOT_JSON ?= build/aot.json
AOT_FLAGS ?=
# kernels/aot_known_spills.json: the paged-attention variants that spill today (fp32 queries; some sm_80
# fp16/bf16 prefill tiles), accepted until their launch parameters are fixed; any other spill fails, and so
# does an entry that stops spilling (remove it).
AOT := env -u TRITON_INTERPRET $(VPY) -m qserve.kernels.aot --arch 80,90 --json $(AOT_JSON) \
	--baseline kernels/aot_known_spills.json $(AOT_FLAGS)

check:
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .
	$(VPY) -m mypy qserve kernels converters models
	$(AOT)
	$(VPY) -m pytest

aot:
	$(AOT)

# Refresh the locks after a change to pyproject's dependencies (or to take upstream releases on purpose).
# serve.txt is resolved under dev.txt's pins, so the two never disagree.
lock:
	test -x $(VENV)/bin/uv || { test -x $(VPY) || $(PY) -m venv $(VENV); $(VPY) -m pip install -q uv; }
	$(VENV)/bin/uv pip compile requirements/pip.in $(LOCK_FLAGS) -o requirements/pip.txt
	$(VENV)/bin/uv pip compile pyproject.toml requirements/build.in --extra dev $(LOCK_FLAGS) -o requirements/dev.txt
	$(VENV)/bin/uv pip compile pyproject.toml requirements/build.in --extra server $(LOCK_FLAGS) -c requirements/dev.txt \
		-o requirements/serve.txt

# Not CI: the same checks against the newest versions pyproject allows, in a venv of their own, so the next
# upstream break is found on purpose rather than by a red CI.
test-latest:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)'
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	.venv-latest/bin/python -m pip list --format freeze > .venv-latest/versions.txt
	$(MAKE) check VENV=.venv-latest

lint: install
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info
