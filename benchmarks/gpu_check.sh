#!/usr/bin/env bash
# The GPU checks and benchmarks, as one prepared run on a GPU machine (CI has none). PARTS
# picks what runs (default "profile suite"; each part alone unless it says otherwise):
#   tests   tests/test_gpu.py, alone (about 1 minute);
#   speed   iterations per second, bf16 autocast against float32: paper-mnist on the MNIST
#           LeNet-5, the fast preset on lenet5-fashion and resnet20-fashion (about 2 minutes);
#   paper   paper-mnist for 60 s through the CLI: how many of its 24,000 iterations it does;
#   profile benchmarks/profile_iteration.py: DAFL's paper-mnist recipe on the MNIST LeNet-5,
#      iterations per second (its 24,000 iterations in <= 3 minutes is issue 25's target) and
#      where an iteration's time goes (host launches, waits for the device);
#   suite   the teacher suite at 60 s per run (issue 25's target: >= the CPU's 600 s figures),
#      `--method auto`, one seed, the 8 runs sharing the GPU, tests/test_gpu.py beside them
#      (about 4 minutes). tests/test_gpu.py: bf16 autocast, a real CUDA out-of-memory halving
#      the batch, checkpoint/resume with CUDA random state, the whole pipeline on cuda.
#   priors  methods for teachers without BatchNorm statistics side by side at 60 s, 3 seeds,
#      on the two BatchNorm-folded ResNets and lenet5-fashion (PRIOR_TEACHERS): each method of
#      PRIOR_METHODS (default: dafl adversarial) one bench_suite process of 3 runs at a time,
#      all sharing the GPU (one CPU core per run), tests/test_gpu.py beside them (about 6
#      minutes).
# Needs the suite (python benchmarks/teachers/make_suite.py) and, where the machine lacks them,
# onnx2torch and torch-pruning wheels in .whl/. Figures go to $OUT (default /tmp/gpu-check).
#   bash benchmarks/gpu_check.sh                  # PARTS="tests speed paper" bash ... for others
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
PARTS=${PARTS:-profile suite}
PRIOR_TEACHERS=${PRIOR_TEACHERS:-resnet8-fashion resnet20-fashion lenet5-fashion}
PRIOR_METHODS=${PRIOR_METHODS:-dafl adversarial}
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

part() { [[ " $PARTS " == *" $1 "* ]]; }

if part tests; then
    echo "== tests/test_gpu.py, alone"
    timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py >"$OUT/tests.log" 2>&1
    tail -3 "$OUT/tests.log"
fi

if part speed; then
    echo "== iterations per second: bf16 autocast | float32"
    for run in "lenet5-mnist paper-mnist 1000" "lenet5-fashion fast 200" "resnet20-fashion fast 100"; do
        read -r teacher preset iters <<<"$run"
        for autocast in on off; do
            timeout 90 python3 benchmarks/profile_iteration.py --teacher "$teacher" --preset "$preset" \
                --iters "$iters" --device cuda --autocast "$autocast" --no-profile 2>&1 | tail -1
        done
    done | tee "$OUT/speed.txt"
fi

if part paper; then
    echo "== paper-mnist for 60 s through the CLI"
    suite=benchmarks/teachers/out
    timeout 150 python3 -m cli.main "$suite/lenet5-mnist.onnx" --method dafl --preset paper-mnist \
        --time-budget 60 --eval-data "$suite/lenet5-mnist-eval.npz" --mean 0.1307 --std 0.3081 \
        --out /tmp/paper-mnist --no-progress >"$OUT/paper_mnist.log" 2>&1
    echo "exit $?" >>"$OUT/paper_mnist.log"
    cat /tmp/paper-mnist/report.md >>"$OUT/paper_mnist.log" 2>/dev/null
    grep -i -m3 "iteration" "$OUT/paper_mnist.log"
fi

if part profile; then
    echo "== profile: paper-mnist on the MNIST LeNet-5, alone"
    timeout 150 python3 benchmarks/profile_iteration.py --teacher lenet5-mnist --preset paper-mnist \
        --iters 400 --device cuda >"$OUT/profile.txt" 2>&1
    head -3 "$OUT/profile.txt"
fi

if part suite; then
echo "== suite at 60 s, the 8 runs sharing the GPU; tests/test_gpu.py beside them"
timeout 400 python3 benchmarks/bench_suite.py --methods auto --seeds 1 --budget 60 --jobs 8 \
    --json "$OUT/suite.json" >"$OUT/suite.log" 2>&1 &
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py >"$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
wait
tail -15 "$OUT/suite.log"
fi

if part priors; then
echo "== methods for teachers without BatchNorm statistics at 60 s, 3 seeds: $PRIOR_METHODS"
for method in $PRIOR_METHODS; do
    # shellcheck disable=SC2086 # the teacher names are words
    timeout 420 python3 benchmarks/bench_suite.py --teachers $PRIOR_TEACHERS --seeds 3 --budget 60 \
        --jobs 3 --methods "$method" --json "$OUT/priors_$method.json" >"$OUT/priors_$method.log" 2>&1 &
done
timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py >"$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log"
wait
for method in $PRIOR_METHODS; do echo "-- $method"; tail -6 "$OUT/priors_$method.log"; done
fi
