# Every target the README names. `make setup` is idempotent: a stamp records
# the hash of pyproject.toml, so a second run costs nothing.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export DS_BUILD_OPS ?= 0
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: setup system-deps test lint demo gpu-check gpu-wheels clean-venv docker-deps docker docker-test

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# The CPU build lies on this machine's disk; pin it so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# DeepSpeed builds from source and imports torch in setup.py.
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e .
	rm -f $(VENV)/.installed-*
	touch $@

# SLURM and munge for the cluster tests (tests/integration/test_slurm*.py).
# Runs apt-get only when a daemon or client is missing, so a second run is instant.
SYSTEM_TOOLS := slurmctld slurmd munged sbatch srun scontrol scancel squeue sinfo
system-deps:
	@missing=$$(for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || echo $$t; done); \
	if [ -n "$$missing" ]; then \
		echo "installing slurm-wlm and munge (missing: $$(echo $$missing))"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; \
	fi
	@# iproute2: the two-node cluster's network namespaces, veth pairs and bridge (tests/integration/slurm_netns.py).
	@if ! command -v ip >/dev/null; then \
		echo "installing iproute2 (missing: ip)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends iproute2; \
	fi
	@# bubblewrap: the sandbox `mtp eval --suite humaneval` runs generated code in (pretrain/evaluation/sandbox.py).
	@if ! command -v bwrap >/dev/null; then \
		echo "installing bubblewrap (missing: bwrap)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends bubblewrap; \
	fi

# Each worker takes whole files, so a module fixture is built once. Why two, and
# what it saves: docs/benchmarks.md, "The test suite".
TEST_WORKERS ?= 2
test: setup system-deps
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The lint rules and why: [tool.ruff] in pyproject.toml.
lint: setup
	$(BIN)/ruff check .

# The main job on the embedded default: the Python standard library as a
# byte-level corpus, a tiny n=4 model trained for about ten minutes on CPU.
# Re-running continues the same run (it is already finished the second time).
DEMO_DATA := runs/data/stdlib-byte
DEMO_RUN := runs/demo
DEMO_STEPS ?= 150
demo: setup
	@test -f $(DEMO_DATA)/manifest.json || $(BIN)/mtp prepare --source stdlib --tokenizer byte --out $(DEMO_DATA)
	$(BIN)/mtp train --config configs/tiny-cpu.yaml model.n_future=4 run.dir=$(DEMO_RUN) data.dir=$(DEMO_DATA) \
		train.max_steps=$(DEMO_STEPS) schedule.warmup_steps=15 train.eval_interval=50 checkpoint.interval=50
	rm -f $(DEMO_RUN)/model.safetensors
	$(BIN)/mtp export --checkpoint $(DEMO_RUN) --out $(DEMO_RUN)/model.safetensors
	@echo "== a held-out stdlib function completed by plain greedy decoding (head 1), ended where it starts to loop =="
	$(BIN)/mtp generate --model $(DEMO_RUN)/model.safetensors --heldout-function 1 --max-new-tokens 128 \
		--stop-on-loop 32 --speculative off --stats --echo | tee $(DEMO_RUN)/plain.txt
	@echo "== the same with self-speculative decoding: heads 2-4 draft, head 1 verifies =="
	$(BIN)/mtp generate --model $(DEMO_RUN)/model.safetensors --heldout-function 1 --max-new-tokens 128 \
		--stop-on-loop 32 --speculative 4 --stats --echo > $(DEMO_RUN)/speculative.txt
	cmp $(DEMO_RUN)/plain.txt $(DEMO_RUN)/speculative.txt && echo "== speculative greedy output is identical to plain greedy decoding =="
	@echo "== sampled (temperature 0.8, top-p 0.95) with speculative rejection sampling: the same distribution as plain sampling =="
	$(BIN)/mtp generate --model $(DEMO_RUN)/model.safetensors --heldout-function 1 --max-new-tokens 160 \
		--temperature 0.8 --top-p 0.95 --seed 3 --stop-on-loop 32 --speculative 4 --stats --echo
	@echo "== per-head loss and draft acceptance on held-out stdlib code (mtp eval) =="
	OMP_NUM_THREADS=1 $(BIN)/mtp eval --model $(DEMO_RUN)/model.safetensors --data $(DEMO_DATA) --suite loss,acceptance \
		--max-windows 256 --out $(DEMO_RUN)/eval --no-tracking
	@echo "== expected tokens per forward (held-out text) beside the measured one (greedy completions, loops included) =="
	OMP_NUM_THREADS=1 $(BIN)/mtp bench speculative --model $(DEMO_RUN)/model.safetensors --prompts 4 \
		--prompt-tokens 128 --new-tokens 128 --batch-sizes 1

# One GPU, one command, under 9 minutes: tests/gpu, step speed and MFU, loss memory, speculative decoding
# (pretrain/bench/gpu_check.py); the report lands in runs/gpu-check/gpu-check.md (docs/benchmarks.md).
# Where pip can reach PyPI, `make setup` installs the CUDA build of the pinned torch. On a GPU machine with
# a CUDA torch and no network, GPU_WHEELS=DIR names the folder `make gpu-wheels` filled elsewhere: it is
# installed with --no-deps into .gpu-site/ (the folder is complete by construction), which goes first on
# PYTHONPATH for $(PY), the interpreter that holds the CUDA torch. Not a venv over the system packages:
# where that interpreter is itself a venv (NGC-style images, many clusters), a new venv would not see its torch.
GPU_WHEELS ?=
GPU_SITE := .gpu-site
GPU_CHECK_ARGS ?=
gpu-check:
ifeq ($(GPU_WHEELS),)
	$(MAKE) setup
	@# Optional: where liger-kernel / cut-cross-entropy do not install, the check measures without them
	@# (its environment stage says so).
	-$(BIN)/pip install -q -e '.[gpu-kernels]'
	$(BIN)/python -m pretrain.cli bench gpu-check --out runs/gpu-check $(GPU_CHECK_ARGS)
else
	@test -d "$(GPU_WHEELS)" || { echo "make gpu-check: GPU_WHEELS=$(GPU_WHEELS) is not a directory; fill one with make gpu-wheels"; exit 2; }
	rm -rf $(GPU_SITE)
	$(PY) -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target $(GPU_SITE) "$(GPU_WHEELS)"/*
	PYTHONPATH=$(CURDIR)/$(GPU_SITE):$(CURDIR) $(PY) -m pretrain.cli bench gpu-check --out runs/gpu-check $(GPU_CHECK_ARGS)
endif

# What `make gpu-check GPU_WHEELS=DIR` installs, collected here for a GPU machine without network: this
# project's stack (megatron-core, DeepSpeed's source, webdataset, MLflow, liger-kernel, ...) for
# GPU_PYTHON, without torch/Triton/CUDA. GPU_HAVE=FILE (`pip list --format=freeze` there) leaves out what
# that machine has (pretrain/bench/gpu_wheels.py).
GPU_PYTHON ?= 3.12
GPU_HAVE ?=
gpu-wheels: setup
	$(BIN)/python -m pretrain.bench.gpu_wheels --out .gpu-wheels --python $(GPU_PYTHON) $(if $(GPU_HAVE),--have $(GPU_HAVE))

clean-venv:
	rm -rf $(VENV)

# Docker's engine, a compose command, debootstrap (the CPU image's base is built
# locally: no registry needed) and PostgreSQL (the tracking server's optional
# backend, tested for real). apt-get runs only when one is missing.
docker-deps:
	@missing=$$(command -v dockerd >/dev/null || echo docker.io; \
		{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; } || echo docker-compose; \
		command -v debootstrap >/dev/null || echo debootstrap; \
		ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || echo postgresql); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" -ne 0 ]; then echo "make docker-deps: missing $$(echo $$missing); install these Debian packages as root"; exit 1; fi; \
		echo "installing $$(echo $$missing)"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

# The GPU image on the NGC PyTorch base (needs that registry); see docs/containers.md.
docker:
	bash docker/build.sh gpu

# Build the CPU image and run it for real: the demo in compose against an MLflow server.
docker-test: docker-deps
	bash docker/smoke-test.sh
