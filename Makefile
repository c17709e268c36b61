# prune-export: one entry point per job. Every target sets up what it needs first.
PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
CACHE     ?= .cache
PER_CLASS ?= 30
FMNIST    := $(CACHE)/fashion-mnist
DEMO      ?= artifacts/demo
SUDO      := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
STAMP     := $(VENV)/.installed

.PHONY: install system test test-all demo bench gpu-check clean

## Debian packages: the real labelled images (Fashion-MNIST) used by the demo and the benches.
system:
	@[ -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] || \
	  ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

$(STAMP): pyproject.toml constraints.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## Python packages, all from pyproject.toml, into ./.venv, at the exact versions of constraints.txt (the tested set).
install: system $(STAMP)

## The test suite (tiny models; minutes-long real-model checks are marked slow and left out).
test: install
	$(PY) -m pytest -q -m "not slow"

test-all: install
	$(PY) -m pytest -q

$(FMNIST)/train$(PER_CLASS)/manifest.json: | system $(STAMP)
	$(PY) -m search.images.fashion_mnist --split train --per-class $(PER_CLASS) --out $(FMNIST)/train$(PER_CLASS)

## The main job: prune real DINOv2-S weights on real images with the default method (acp) and steps,
## export, validate, report in $(DEMO)/ (git ignores it; artifacts/sample/ holds a committed report).
## 112 px keeps it to about 6 minutes on 2 idle cores (20 when another job shares them). A run that
## succeeds removes its work folder; an interrupted one keeps it, and the same command resumes.
demo: install $(FMNIST)/train$(PER_CLASS)/manifest.json
	$(VENV)/bin/prune-export dinov2_s --data $(FMNIST)/train$(PER_CLASS) --budget 0.63 --img-size 112 -o $(DEMO)/dinov2_s_0.63.onnx

## Benches into artifacts/bench/: --align table, latency (ORT CPU, random weights), latency of the CLI's
## plans (real and random weights, MAC and latency budgets, against a plain export), softmax-vs-linear
## crossover by image size (ORT CPU, about 6 min), quality (dinov2_s, Fashion-MNIST k-NN), and the acp
## ablation (3 seeds x 2 budgets, about 2 h on 2 cores; resumes where it stopped). QUICK=1 keeps it under
## 10 minutes by skipping the crossover, quality and ablation benches (their quick forms measure nothing to keep).
bench: install system
	$(PY) -m exporter.bench.align $(if $(QUICK),--runs 15,)
	$(PY) -m exporter.bench.latency $(if $(QUICK),--quick,)
	$(if $(QUICK),@echo "QUICK=1: latency-plans bench skipped; 'python -m exporter.bench.latency_plans --only deit_b' runs its random-weight rows",$(PY) -m exporter.bench.latency_plans)
	$(if $(QUICK),@echo "QUICK=1: crossover bench skipped; 'python -m exporter.bench.crossover --quick --out /tmp/crossover' checks its path",$(PY) -m exporter.bench.crossover)
	$(if $(QUICK),@echo "QUICK=1: quality bench skipped; 'python -m exporter.bench.quality --quick' runs its 0.63 rows",$(PY) -m exporter.bench.quality)
	$(if $(QUICK),@echo "QUICK=1: ablation bench skipped; 'python -m exporter.bench.ablation --budgets 0.63 --seeds 0' runs one seed",$(PY) -m exporter.bench.ablation)

## On a machine with CUDA: the device tests and the tiny end-to-end runs on the GPU, then the default
## dinov2_s command on CUDA, training throughput, GPU latency and the latency-budget rows (deit_b and
## dinov2_s at 0.63 on PyTorch with CUDA graphs, fp16/fp32, batch 1/32/256, predicted against measured;
## tables in artifacts/bench/latency_tables/) into artifacts/bench/gpu.md.
## Where packages cannot be installed (an offline GPU box), NO_INSTALL=1 PY=python3 uses what is there,
## and CHECKPOINT=dinov2_s.safetensors stands in for the real extra's weights.
gpu-check: $(if $(NO_INSTALL),,install)
	$(PY) -m pytest -q -p no:cacheprovider tests/test_devices.py tests/test_builtin_images.py tests/test_acp.py tests/test_recovery.py tests/test_flatten_kind.py
	$(PY) -m exporter.bench.gpu_check $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),)
	$(PY) -m exporter.bench.effort --only "=default, built-in @ 0.63" --only "=fast, built-in @ 0.63"

## Everything the targets made that git ignores: .cache/ (the images, and the work folders of the benches
## and the GPU check) and the demo's folder (its output and, after an interrupted run, its work folder).
clean:
	rm -rf $(CACHE) $(DEMO)
