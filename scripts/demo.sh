#!/usr/bin/env bash
# Sets up, trains the embedded default teacher (examples/make_teacher.py) and compresses it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e .
python examples/make_teacher.py
dafl-compress examples/teacher.onnx --task classification --eval-data examples/eval.npz \
  --out dafl-out/teacher --force "$@"
