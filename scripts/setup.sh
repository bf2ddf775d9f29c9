#!/usr/bin/env bash
# Installs what a fresh machine lacks, never another torch: torch 2.13.0 first (the local CPU build here),
# then everything else under constraints.txt, which pins torch so no dependency can pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.split("+")[0] == "2.13.0" else 1)' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -c constraints.txt -r "${1:-requirements.txt}"
