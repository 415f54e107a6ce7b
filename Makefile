# Quickstart targets: each creates .venv and installs what it needs on first use.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install run test bench
install: $(STAMP)

# The main job on its built-in tiny default: demo clips whose questions need motion -> preprocessing
# -> stage 1 (Δ-encoder alignment) -> stage 2 (instruction tuning of a tiny CoPE-VideoLM) -> held-out
# accuracy with Δ-tokens, zeroed Δ-tokens and keyframes only (about 7 minutes on 2 cores). Reruns resume.
run: $(STAMP)
	$(VENV)/bin/python -m cope_jax.main --config=configs/finetune.py:tiny --workdir workdir/finetune-tiny

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_forward.py
	$(VENV)/bin/python bench/bench_convert.py
	$(VENV)/bin/python bench/bench_preprocess.py
	$(VENV)/bin/python bench/bench_pretrain.py
	$(VENV)/bin/python bench/bench_long_prefill.py
	$(VENV)/bin/python bench/bench_ttft.py
	$(VENV)/bin/python bench/bench_live.py --parts flops live
	$(VENV)/bin/python bench/bench_live.py --parts memory --minutes 1 10
	$(VENV)/bin/python bench/plan_finetune.py --devices 8 --mesh fsdp=8 --remat layer none
	$(VENV)/bin/python bench/plan_finetune.py --devices 64 --mesh fsdp=64 --grad-accum 2

# The compile environment (--mode=compile): the project plus libtpu and the CUDA compile packages
# (jax-cuda12-plugin/pjrt, ptxas, cuDNN, cuBLAS, NVRTC; about 4 GB) in their own virtualenv, so
# .venv and `make test` stay CPU-only. Its tests run from .venv (tests/test_compile.py) against it.
COMPILE_VENV := .venv-compile
COMPILE_STAMP := $(COMPILE_VENV)/.installed

$(COMPILE_STAMP): setup.py
	test -x $(COMPILE_VENV)/bin/python || $(PYTHON) -m venv $(COMPILE_VENV)
	echo '*' > $(COMPILE_VENV)/.gitignore
	$(COMPILE_VENV)/bin/pip install -q --upgrade pip
	$(COMPILE_VENV)/bin/pip install -q -e '.[compile]'
	touch $(COMPILE_STAMP)

.PHONY: compile-env test-compile
compile-env: $(COMPILE_STAMP)

# Compiles the tiny stage 2 and chat programs for a TPU topology and for 8 H100s (tests/test_compile.py).
test-compile: $(STAMP) $(COMPILE_STAMP)
	$(VENV)/bin/python -m pytest -q tests/test_compile.py

# lmms-eval (integrations/lmms_eval/) gets its own virtualenv: lmms-eval 0.7.3 pins av<16 (we pin 18) and
# pulls torch, torchvision, wandb and ~150 more packages. CPU torch goes in first (it lies in pip's
# find-links here; elsewhere: LMMS_TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu');
# torchvision is pinned with it, else pip takes one that upgrades torch to a CUDA build, and then removed:
# PyPI's torchvision is a CUDA build whose import fails on CPU torch and breaks transformers' import, and
# lmms-eval never needs it. filelock<4: 4.x lacks filelock._api, which lmms-eval's evaluator imports.
LMMS_VENV := .venv-lmms-eval
LMMS_STAMP := $(LMMS_VENV)/.installed
LMMS_TORCH ?= torch==2.13.0+cpu

$(LMMS_STAMP): integrations/lmms_eval/pyproject.toml
	test -x $(LMMS_VENV)/bin/python || $(PYTHON) -m venv $(LMMS_VENV)
	echo '*' > $(LMMS_VENV)/.gitignore
	$(LMMS_VENV)/bin/pip install -q --upgrade pip
	$(LMMS_VENV)/bin/pip install -q $(LMMS_TORCH)
	printf '%s\n' "torch==$$($(LMMS_VENV)/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))')" \
		'torchvision==0.28.0' 'filelock<4' > $(LMMS_VENV)/constraints.txt
	$(LMMS_VENV)/bin/pip install -q 'lmms-eval==0.7.3' -c $(LMMS_VENV)/constraints.txt
	$(LMMS_VENV)/bin/pip uninstall -q -y torchvision
	$(LMMS_VENV)/bin/pip install -q --no-deps -e integrations/lmms_eval
	$(LMMS_VENV)/bin/python -c 'from importlib.metadata import entry_points; \
		assert [e.value for e in entry_points(group="lmms_eval.models", name="cope_jax")] == ["cope_lmms.manifest:manifest"]'
	touch $(LMMS_STAMP)

.PHONY: lmms-eval-venv test-lmms-eval
lmms-eval-venv: $(LMMS_STAMP)

# Starts cope_jax.serve on a tiny checkpoint, runs lmms-eval (in its venv, offline) on a local task over
# generated videos and checks its scores equal cope_jax.evaluate's.
test-lmms-eval: $(STAMP) $(LMMS_STAMP)
	$(VENV)/bin/python -m pytest -q integrations/lmms_eval/tests
