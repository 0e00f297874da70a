"""One rank of the distributed tests (tests/test_distributed.py), run by torchrun or alone:
``compress`` on a teacher, then each rank saves its trained student's parameters.

    python tests/dist_worker.py JSON   (JSON: teacher, out, iters, resume, params_dir,
                                        interrupt_at [rank, iteration], pid_dir, batch_size,
                                        time_budget)
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from compress_toolbox import CompressConfig, compress
from compress_toolbox.distillation import distributed
from compress_toolbox.errors import DaflError


def main(spec: dict) -> int:
    rank = int(os.environ.get("RANK", "0"))
    stop_rank, stop_iteration = spec.get("interrupt_at") or (-1, -1)

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    first = []

    def on_iteration(iteration: int) -> None:
        if spec.get("pid_dir") and not first:  # this process's pid and first iteration
            first.append(iteration)
            Path(spec["pid_dir"], f"rank{rank}.pid").write_text(str(os.getpid()))
            Path(spec["pid_dir"], f"rank{rank}.attempt{attempt}").write_text(str(iteration))
        if rank == stop_rank and iteration == stop_iteration:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C on this rank only

    try:
        result = compress(
            spec["teacher"],
            CompressConfig.from_options(
                out=spec["out"],
                iters=spec["iters"],
                batch_size=spec.get("batch_size", 32),
                resume=spec.get("resume", False),
                eval_data=spec.get("eval_data"),
                progress=False,
                threads=1,
                time_budget=spec.get("time_budget"),
            ),
            on_iteration=on_iteration,
        )
    except KeyboardInterrupt:
        return 130
    except DaflError as error:
        print(f"rank {rank}: {type(error).__name__}: {error}", file=sys.stderr)
        return error.exit_code
    finally:
        distributed.shutdown()
    if spec.get("params_dir"):
        torch.save(result.plan.module.state_dict(), Path(spec["params_dir"], f"rank{rank}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
