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
# The graph-editor tests drive Debian's Chromium (no browser download). Install it where we may (root with apt);
# elsewhere those tests report themselves skipped, naming the package.
if [ "${1:-}" = "requirements-test.txt" ] && ! command -v chromium >/dev/null 2>&1 \
    && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "setup: could not install chromium" >&2
fi
