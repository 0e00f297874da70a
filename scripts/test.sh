#!/usr/bin/env bash
# Sets up (installs the package with its test and TensorFlow extras) and runs the fast test suite.
#   bash scripts/test.sh            # fast suite (slow end-to-end runs deselected)
#   bash scripts/test.sh -m slow    # the slow ones
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,tf]"
ruff check .
python -m pytest -q "$@"
