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

# The main job on its built-in tiny default: demo clips -> preprocessing -> Δ-encoder pretraining
# (about a minute on 2 cores), loss and next-frame retrieval against SigLIP alone. Reruns resume.
run: $(STAMP)
	$(VENV)/bin/python -m cope_jax.main --config=configs/pretrain.py:tiny --workdir workdir/pretrain-tiny

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_forward.py
	$(VENV)/bin/python bench/bench_convert.py
	$(VENV)/bin/python bench/bench_preprocess.py
	$(VENV)/bin/python bench/bench_pretrain.py
	$(VENV)/bin/python bench/bench_long_prefill.py
	$(VENV)/bin/python bench/bench_ttft.py
