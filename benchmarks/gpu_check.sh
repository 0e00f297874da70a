#!/usr/bin/env bash
# The GPU checks and benchmarks, as one prepared run on a GPU machine (CI has none):
#   1. tests/test_gpu.py: bf16 autocast, a real CUDA out-of-memory halving the batch,
#      checkpoint/resume with CUDA random state, the whole pipeline on cuda;
#   2. the teacher suite (benchmarks/bench_suite.py, method auto, 30 s per run, 2 seeds,
#      4 runs sharing the GPU) and, beside it, DAFL's paper-mnist recipe for 150 s on the
#      MNIST LeNet-5 (how much of its 24,000 iterations a GPU does in that time).
# Needs the suite (python benchmarks/teachers/make_suite.py) and, where the machine lacks them,
# onnx2torch and torch-pruning wheels in .whl/. Figures go to $OUT (default /tmp/gpu-check).
#   bash benchmarks/gpu_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, onnx, onnxruntime, onnx2torch, torch_pruning, sys;
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'onnx', onnx.__version__, 'ort', onnxruntime.__version__, 'tp', torch_pruning.__version__)" \
    | tee -a "$OUT/env.txt"

echo "== tests/test_gpu.py"
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py 2>&1 \
    | tee "$OUT/tests.log"

echo "== suite (auto, 30 s, 2 seeds, 4 at a time) and paper-mnist (150 s) side by side"
suite=benchmarks/teachers/out
timeout 200 python3 -m cli.main "$suite/lenet5-mnist.onnx" --method dafl --preset paper-mnist \
    --time-budget 150 --eval-data "$suite/lenet5-mnist-eval.npz" --mean 0.1307 --std 0.3081 \
    --out /tmp/paper-mnist --no-progress >"$OUT/paper_mnist.log" 2>&1 &
paper=$!
timeout 300 python3 benchmarks/bench_suite.py --methods auto --seeds 2 --budget 30 --jobs 4 \
    --json "$OUT/suite_gpu.json" 2>&1 | tee "$OUT/suite_gpu.log"
wait $paper
echo "paper-mnist exit $?"
cat /tmp/paper-mnist/report.md >>"$OUT/paper_mnist.log" 2>/dev/null
cat "$OUT/paper_mnist.log"
