#!/usr/bin/env bash
# Rebuild the shipped flow-matching digits base (src/xdpo/apps/digits/assets/digits-flow) from scratch with
# the recipe in src/xdpo/apps/digits/flow_base.py, measure its prompted-digit accuracy (xdpo_digits.json),
# then store it as the package ships it: the files identical to digits-base's (its CLIP tokenizer, twice,
# and its VAE weights) are listed in xdpo_shared.json instead of copied (xdpo.apps.digits.assets.ship).
# Usage: scripts/build_digits_flow.sh [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
SEED="${1:-0}"
export HF_HUB_OFFLINE=1
PY="${PYTHON:-.venv/bin/python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m xdpo digits build-base --family flow --out "$TMP/digits-flow" --seed "$SEED" --threads 1
"$PY" -c 'import sys; from xdpo.apps.digits.assets import ship; print(ship(sys.argv[1], "digits-flow"))' \
  "$TMP/digits-flow"
