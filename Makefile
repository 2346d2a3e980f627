# The stack's entry points. `make setup` is idempotent: it rebuilds the venv only
# when a requirements file changed since the last install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
MODELS_DIR ?= models
LOG_DIR ?= runs
BENCH_DIR ?= bench/results
# TORCH=cpu: the CPU-only torch build from PyTorch's own wheel index (an extra index beside PyPI);
# without it, torch comes from PyPI as it is (the CUDA build on Linux x86-64). docs/install.md.
TORCH ?=
ifneq ($(filter-out cpu,$(TORCH)),)
$(error TORCH=$(TORCH): expected TORCH=cpu (the CPU-only build) or no TORCH at all (PyPI's build))
endif
TORCH_PIP_FLAGS := $(if $(TORCH),--extra-index-url https://download.pytorch.org/whl/cpu)
# TF=cuda: TensorFlow's CUDA build (requirements/tf-cuda.txt) in place of tensorflow-cpu, so that the TF
# trainer and the stand-in can use an NVIDIA GPU; without it, TensorFlow runs on the CPU. docs/gpu.md.
TF ?=
ifneq ($(filter-out cuda,$(TF)),)
$(error TF=$(TF): expected TF=cuda (TensorFlow's CUDA build) or no TF at all (tensorflow-cpu))
endif

export PYTHONPATH := $(CURDIR)

.PHONY: setup train train-torch train-tf test pytest bench demo serve protos clean tensorboard compose-test \
	gpu-check tf-cuda

# nginx fronts both REST servers in make serve and make demo: installed here where we may (root with
# apt-get), named otherwise (its tests skip without it).
setup: $(STAMP)
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "setup: installing nginx (apt-get)" && apt-get update -qq && apt-get install -y -qq nginx >/dev/null; \
	  else \
	    echo "setup: nginx is missing: make serve and make demo run it in front of the REST servers; install it (apt-get install -y nginx)"; \
	  fi

$(STAMP): requirements/main.txt requirements/constraints.txt requirements/no-deps.txt clients/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH_PIP_FLAGS) -r requirements/main.txt -c requirements/constraints.txt
	$(PIP) install --quiet --no-deps -r requirements/no-deps.txt
	$(PIP) install --quiet --no-deps -e ./clients
	touch $@

# TF=cuda: tensorflow-cpu and TensorFlow's CUDA build install the same `tensorflow` package, so the CPU
# build is removed and the CUDA build reinstalled over what it shared with it; `make clean setup` goes back.
ifeq ($(TF),cuda)
setup: tf-cuda
endif
tf-cuda: $(STAMP)
	@if $(PIP) show tensorflow-cpu >/dev/null 2>&1; then \
	  echo "setup: TF=cuda: replacing tensorflow-cpu with TensorFlow's CUDA build (requirements/tf-cuda.txt)"; \
	  $(PIP) uninstall --quiet --yes tensorflow-cpu && \
	  $(PIP) install --quiet --force-reinstall --no-deps -r requirements/tf-cuda.txt; \
	fi
	$(PIP) install --quiet -r requirements/tf-cuda.txt -c requirements/constraints.txt

train: train-torch train-tf

train-torch: setup
	$(PY) -m training.train_torch --output-dir $(MODELS_DIR) --log-dir $(LOG_DIR)

train-tf: setup
	$(PY) -m training.train_tf --output-dir $(MODELS_DIR) --log-dir $(LOG_DIR)

tensorboard: setup
	$(VENV)/bin/tensorboard --logdir $(LOG_DIR)

# The whole suite: pytest, then the real compose stack (compose-test below; it skips, saying why,
# where no Docker engine can be had). `make pytest` runs the first part alone.
test: setup
	$(PY) -m pytest
	$(PY) docker/local/compose_test.py

pytest: setup
	$(PY) -m pytest

bench: setup
	$(PY) -m bench.run_all --output-dir $(BENCH_DIR)

# The GPU check (docs/gpu.md), for a machine with an NVIDIA GPU: one epoch of each trainer on CUDA, both
# servers on the GPU, load-tested at concurrency 1, 16 and 64 (about 5 minutes; TF=cuda puts TensorFlow's
# parts on the GPU too). Without CUDA it refuses; GPU_CHECK_ARGS=--allow-cpu rehearses it on the CPU.
gpu-check: setup
	$(PY) -m bench.gpu_check --output-dir $(BENCH_DIR) $(GPU_CHECK_ARGS)

# The compose stack for real (docker-compose.local.yml; docs/compose-local.md): starts dockerd if none
# runs, builds, brings the stack up, load-tests it, tears it down. Skips where no engine can be had.
compose-test: setup
	$(PY) docker/local/compose_test.py

# Regenerates the client's wire-compatible *_pb2.py from clients/mnist_client/protos/*.proto.
protos: setup
	clients/scripts/gen_protos.sh $(PY)

clean:
	rm -rf $(VENV) .pytest_cache

serve: setup
	$(PY) -m stack.serve

demo: setup
	$(PY) -m stack.demo $(DEMO_ARGS)
