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
