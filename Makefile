# laps: one entry point for every way of working with the project.
#   make test        export/clean sync check, notebook tests (nbdev_test), fast pytest suite
#   make test-slow   end-to-end and multi-process tests (pytest -m slow)
#   make lab         JupyterLab on nbs/
#   make export      regenerate laps/ from nbs/ (never edit laps/*.py by hand)
#   make demo        synthetic benchmark v3: generate, fine-tune the cpu preset (the final framework, from the pretrained
#                    laps/conv-vit-synth and MiniLM), evaluate on test and the test probes (per-kind minimal-pair table
#                    beside the bag-of-words oracle), then print the recorded dense and global baselines of the same budget
#                    (12 min 47 s with install on a fresh clone of the 2-core machine at 917c585; the numbers are in README.md)
#   make bench       reference vs fast similarity engine (laps bench)
#   make pretrain    rebuild the built-in vision backbone laps/conv-vit-synth (laps/weights/conv-vit-synth: weights,
#                    model card, pretrain.json) by caption-free multi-label pretraining on synthetic scenes
#   make reports     regenerate reports/ with papermill (trains its runs under runs/reports; 67 min 23 s measured
#                    at d7978c5 on 2 free cores; REPORT_ARGS='-p seeds [0,1]' passes parameters to every report)
#   make reports-quick  the same pipeline with tiny parameters into reports-quick/ (CI, a few minutes)
#   make gpu-check   the CUDA paths in one command (tests/gpu_check.py: engine vs reference and bench on cuda, fp32 and
#                    bf16 autocast; `laps bench --train` of the paper preset at batch 32 and 128 for fp32/bf16/fp16 with and
#                    without gradient checkpointing; a short bf16 training run beside fp32 and bf16's effect on test recall;
#                    two-stage eval on cuda); only where a GPU is at hand
#   make check-install  `pip install .` (no extras) into a fresh temporary venv and run `laps` there:
#                    the runtime needs no dev tools (CI; 159-224 s measured on the shared 2-core machine, about 2.5 min of CPU)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# The small CPU wheel of torch lies on disk on the project's CPU machines; on a GPU machine
# override it (make TORCH_SPEC="torch" ...) or keep the torch already in the environment.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.laps-installed

.PHONY: install export clean-nbs sync-check readme test test-nbs test-py test-slow lab demo bench pretrain reports reports-quick \
	check-install gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

readme: $(STAMP)
	$(BIN)/python .ci/make_readme.py

# Fails when nbdev_export, nbdev_clean or the README generator would change a file.
sync-check: $(STAMP)
	$(BIN)/python .ci/sync_check.py

test-nbs: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 --timing

test-py: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

test: sync-check test-nbs test-py

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

lab: $(STAMP)
	$(BIN)/jupyter lab nbs

# The ImageNet analogue of the synthetic world: the weights the cpu preset fine-tunes from (laps.training.pretrain).
pretrain: $(STAMP)
	$(BIN)/laps pretrain --out laps/weights/conv-vit-synth --force

# The embedded default: the synthetic fine-grained benchmark on the cpu preset. Each demo run gets
# its own run directory, so re-running never overwrites an earlier one. `laps eval RUN --split test`
# prints the recall table with rsum's bootstrap 95% CI and the per-kind minimal-pair table (i2t, t2i,
# pair, mean with CIs, the bag-of-words reference beside them) and writes them to RUN/metrics_test.json.
# The demo evaluates its encoders in bf16, the precision the run trained and validated in (1.4x faster
# than `laps eval`'s fp32 default here; the README gives both evaluations of one demo checkpoint).
DEMO_DATA ?= data
DEMO_STAMP := $(shell date +%Y%m%d-%H%M%S)
DEMO_RUN ?= runs/demo-$(DEMO_STAMP)
demo: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/laps data synthetic --out $(DEMO_DATA)/synthetic && \
	$(BIN)/laps train --preset cpu --data_path $(DEMO_DATA) --logger_name $(DEMO_RUN) && \
	$(BIN)/laps eval $(DEMO_RUN) --split test --precision bf16 --save_sims $(DEMO_RUN)/sims_test.npy && \
	cat reports/demo/baselines.md && \
	echo "demo: $(DEMO_RUN), $$(( $$(date +%s) - start )) s wall"

bench: $(STAMP)
	$(BIN)/laps bench

gpu-check: $(STAMP)
	$(BIN)/python tests/gpu_check.py

REPORT_ARGS ?=
reports: $(STAMP)
	$(BIN)/python -m laps report --all $(REPORT_ARGS)

# One torch thread: a smoke test of the pipeline, robust to a busy CI machine (oversubscribed
# OpenMP threads are several times slower there).
reports-quick: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m laps report --all --quick $(REPORT_ARGS)

# A new user's install: a fresh venv outside the checkout, torch from TORCH_SPEC first (an unpinned torch would pull
# the multi-GB CUDA build), then `pip install .` without extras from a copy of the working tree (so no stale build/
# or egg-info is reused), and the commands run from outside the checkout so that the installed package is the one
# imported. fastcore (nbdev's) must be absent and every laps module must import without it.
check-install:
	@start=$$(date +%s); tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; set -e; \
	mkdir "$$tmp/src"; git ls-files -co --exclude-standard -z | tar -c --null -T - -f - | tar -x -C "$$tmp/src" -f -; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q "$(TORCH_SPEC)"; \
	"$$tmp/venv/bin/python" -m pip install -q "$$tmp/src"; \
	cd "$$tmp"; \
	! venv/bin/python -c "import fastcore" 2>/dev/null || { echo "check-install: fastcore is installed"; exit 1; }; \
	venv/bin/laps --help > /dev/null; \
	venv/bin/laps data synthetic --out "$$tmp/data/synthetic" --n_train 4 --n_dev 2 --n_test 2 --dev_probe_pairs 1 --test_probe_pairs 1 --img_size 32; \
	venv/bin/python -c "import laps; laps.LAPSModel; print('import laps', laps.__version__, 'from', laps.__file__)"; \
	venv/bin/python -c "import importlib, pkgutil, laps; \
	  mods = [m.name for m in pkgutil.walk_packages(laps.__path__, 'laps.')]; [importlib.import_module(m) for m in mods]; \
	  assert {m.split('.')[1] for m in mods if m.count('.') == 2} == set(laps.LAYERS), mods; \
	  print('imported', len(mods), 'laps modules of every subpackage without dev tools')"; \
	echo "check-install: passed in $$(( $$(date +%s) - start )) s"
