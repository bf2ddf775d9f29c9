#!/usr/bin/env bash
# The tests: set up, then run the whole suite (unit, real gloo ranks, real ComfyUI host).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
exec "${PYTHON:-python3}" -m pytest "$@"
