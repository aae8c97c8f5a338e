# d2norm: `make demo` (set up + train/evaluate the demo) and `make test` (set up + test suite).
# Setup is reproducible from this repository's files and offline except for the package registries;
# re-running it is a no-op when nothing changed. An existing detectron2 in the venv is left alone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.d2norm-setup
DEMO_CONFIG ?= configs/demo/mask_rcnn_R_18_FPN_MABN_shapes.yaml
# One folder per demo config: output/demo/<config file name without .yaml>.
DEMO_OUTPUT ?= output/demo/$(basename $(notdir $(DEMO_CONFIG)))
# Config overrides for `make demo`, e.g. ARGS="SOLVER.MAX_ITER 100 SEED 1".
ARGS ?=

.PHONY: setup demo test test-slow lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements/cpu.txt setup.py tools/install_detectron2.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -r requirements/cpu.txt
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) OUTPUT_DIR $(DEMO_OUTPUT) $(ARGS)
	$(PY) tools/predict.py --config-file $(DEMO_CONFIG) --weights $(DEMO_OUTPUT)/model_final.pth \
		--limit 8 --grid $(DEMO_OUTPUT)/predictions.png $(ARGS)
	$(PY) tools/plot_norm_stats.py $(DEMO_OUTPUT)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

test-slow: setup
	$(PY) -m pytest -m slow -s -v

bench: setup
	$(PY) tools/benchmark_norm.py

# Run first on a GPU machine: every layer on CUDA against CPU float64, AMP, channels_last,
# torch.compile, no host syncs, a DDP step (`--device cpu` runs the same checks in `make test`),
# then the norm-cost benchmark and the demo training with its COCO AP on the GPU.
gpu-check: setup
	mkdir -p benchmarks/gpu_check
	$(PY) -m d2norm.selftest --device cuda --benchmark --demo --markdown benchmarks/gpu_check/table.md

clean:
	rm -rf $(VENV) output
