#!/usr/bin/env bash
# Rebuild the shipped digits base model (src/xdpo/apps/digits/assets/digits-base) from scratch with the recipe
# in src/xdpo/apps/digits/base.py, then measure its prompted-digit accuracy (written to xdpo_digits.json).
# Took 29 min on one CPU core of a busy 2-core machine (one thread: more threads than free
# cores slow torch down). digits-flow reuses this base's tokenizer and VAE weights (stored once, here):
# after rebuilding the base in place, rebuild digits-flow too (scripts/build_digits_flow.sh).
# Usage: scripts/build_digits_base.sh [OUT_DIR] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-src/xdpo/apps/digits/assets/digits-base}"
SEED="${2:-0}"
export HF_HUB_OFFLINE=1
PY="${PYTHON:-.venv/bin/python}"
"$PY" -m xdpo digits build-base --out "$OUT" --seed "$SEED" --threads 1
