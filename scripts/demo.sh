#!/usr/bin/env bash
# The main job: set up, then run the demo on the embedded tiny model (2 CPU ranks, Ulysses and data parallel).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
exec "${PYTHON:-python3}" -m dist_backend demo "$@"
