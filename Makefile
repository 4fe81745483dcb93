# make demo: set-up plus the whole pipeline on the bundled sample data.  make test: the test suite.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench lab clean-outputs

install: $(STAMP)

# torch first, and only when missing: elsewhere (Colab, an existing env) the installed build is kept;
# letting pip resolve torch on its own could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml hatch_build.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: install
	$(BIN)/instructblip-peft demo

# The notebooks run with their defaults in a temporary work directory (not over data/ and outputs/).
test: install
	$(BIN)/python -m pytest tests -q -m "not slow and not slurm"
	INSTRUCTBLIP_PEFT_WORKDIR=$$(mktemp -d) $(BIN)/python -m pytest --nbval-lax notebooks -q -p no:cacheprovider

# Slow system tests (per-method learning checks, sweep launchers, a real Slurm cluster): CI runs them too.
test-slow: install
	$(BIN)/python -m pytest tests -q -m "slow or slurm"

bench: install
	$(BIN)/python benchmarks/eval_ranking.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/eval_vision_cache.py
	$(BIN)/python benchmarks/train_vision_cache.py --threads 1
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/eval_sharded.py
	$(BIN)/python benchmarks/trainer_race.py
	$(BIN)/python benchmarks/gpu_real_size.py
	$(BIN)/python benchmarks/demo_time.py

# At the repository root: notebooks/ and outputs/ (the demo's executed notebooks) both in the file browser.
lab: install
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)"

clean-outputs:
	find outputs -mindepth 1 ! -name README.md -delete
