#!/usr/bin/env bash
# Sets up, trains the embedded default teacher (examples/make_teacher.py) and compresses it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[demo]"
python examples/make_teacher.py
# The teacher takes Fashion-MNIST pixels normalised with the training set's mean and std.
dafl-compress examples/teacher.onnx --task classification --eval-data examples/eval.npz \
  --mean 0.2860 --std 0.3530 --out dafl-out/teacher --force "$@"
