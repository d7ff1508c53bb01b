# varq — `make help` lists the targets. Everything runs inside the project's own virtualenv (.venv).
PY      := .venv/bin/python
STAMP   := .venv/.installed
PYTEST  := OMP_NUM_THREADS=2 $(PY) -m pytest

.PHONY: help setup test test-slow test-gpu test-slurm demo lint assets bench bench-gpu tables clean mutants

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): requirements-pinned.txt pyproject.toml
	python3 -m venv .venv
	# torch, torchvision and torch-fidelity in ONE resolve (see requirements-pinned.txt for why)
	.venv/bin/pip install -q -r requirements-pinned.txt
	.venv/bin/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install varq with pinned dependencies (README "Install": clusters, ranges)

.PHONY: wheel
wheel: $(STAMP)  ## build dist/varq-*.whl (configs and assets inside; install elsewhere with pip install dist/varq-*.whl)
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

test: $(STAMP)  ## the fast CPU suite (excludes slow, gpu and slurm markers)
	$(PYTEST) -q

test-slow: $(STAMP)  ## slow CPU tests (minutes; includes the fresh-venv wheel install)
	$(PYTEST) -q -m slow

test-gpu: $(STAMP)  ## CUDA checks (on a GPU machine)
	$(PYTEST) -q -m gpu

test-slurm: $(STAMP)  ## start a local single-node SLURM cluster and run the slurm tests against it
	bash scripts/slurm-local.sh start
	CI=$${CI:-1} $(PYTEST) -q -m slurm tests/slurm --durations=0; status=$$?; bash scripts/slurm-local.sh stop; exit $$status

demo: $(STAMP)  ## the embedded default end to end (var_digits, offline, CPU)
	$(PY) -m varq.run

mutants: $(STAMP)  ## apply each mutant of scripts/mutants.py in a scratch copy; fails if the tests miss one (minutes)
	OMP_NUM_THREADS=2 $(PY) scripts/mutants.py

lint: $(STAMP)  ## static checks
	$(PY) -m ruff check varq tests scripts

assets: $(STAMP)  ## retrain the shipped digits weights from fixed seeds (CPU, ~15 min)
	OMP_NUM_THREADS=2 $(PY) -m varq.train

bench: $(STAMP)  ## speed side by side with the official VAR code (REFERENCE_REPO=path/to/VAR) → results/bench/
	$(PY) -m varq.bench $(if $(REFERENCE_REPO),--reference-repo $(REFERENCE_REPO)) $(BENCH_ARGS)

bench-gpu:  ## the GPU benchmark in one command (REFERENCE_REPO=path/to/VAR; PYTHON= the CUDA interpreter)
	PYTHON=$(or $(PYTHON),$(PY)) scripts/gpu_bench.sh $(REFERENCE_REPO)

tables: $(STAMP)  ## rebuild the comparison tables from result rows under runs/
	$(PY) -m varq.tables --root runs --out results/tables

clean:  ## remove run outputs and build files (keeps .venv)
	rm -rf runs outputs multirun build dist
