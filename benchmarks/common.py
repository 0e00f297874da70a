"""Shared benchmark helpers: data loading, cached teacher training, method comparison."""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from compress_toolbox.distill import distill  # noqa: E402
from compress_toolbox.evaldata import EvalData, evaluate, read_idx  # noqa: E402
from compress_toolbox.teacher import Teacher  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CACHE_DIR = Path(os.environ.get("DAFL_BENCH_CACHE", Path(tempfile.gettempdir()) / "dafl-bench"))


def load_idx_pair(images: Path, labels: Path, pad_to: int = 32, mean=MNIST_MEAN, std=MNIST_STD):
    """idx images+labels -> normalised float (N,1,pad_to,pad_to) tensor (zero-padded, as LeNet-5
    expects 32x32) and long labels."""
    x = torch.from_numpy(read_idx(images).copy()).float().div(255.0)[:, None]
    pad = (pad_to - x.shape[-1]) // 2
    x = F.pad(x, (pad, pad, pad, pad))
    x = (x - mean) / std
    y = torch.from_numpy(read_idx(labels).astype("int64"))
    return x, y


def train_classifier(model: nn.Module, x, y, *, epochs: int, batch_size: int = 128,
                     lr: float = 1e-3, seed: int = 0) -> nn.Module:  # fmt: skip
    """Plain supervised training (Adam, cosine LR) on in-memory tensors, single process."""
    torch.manual_seed(seed)
    # One thread: on this shared 2-core machine two OpenMP threads were several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.set_num_threads(threads)
    return model.eval()


def lenet(name: str) -> nn.Module:
    """The zoo's LeNet-5 (or LeNet-5-half) for 1x32x32 digits, 10 classes."""
    from model_zoo import get_model

    return get_model(name, num_classes=10, in_channels=1, input_size=(32, 32))


def cached_teacher(name: str, build, train) -> nn.Module:
    """Load ``name`` from the cache dir, or build + train + save it."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"{name}.pt"
    model = build()
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu"))
        print(f"teacher {name}: loaded from cache {path}")
        return model.eval()
    t0 = time.perf_counter()
    train(model)
    torch.save(model.state_dict(), path)
    print(f"teacher {name}: trained in {time.perf_counter() - t0:.0f} s, cached at {path}")
    return model.eval()


def accuracy_at(history: list[dict], seconds: float) -> float | None:
    """Last evaluated accuracy at or before ``seconds`` of training."""
    best = None
    for row in history:
        if row["accuracy"] is not None and row["elapsed_s"] <= seconds + 1e-9:
            best = row["accuracy"]
    return best


METHODS = {  # label -> (method, preset)
    "dafl+fast": ("dafl", "fast"),
    "dafl+paper-mnist": ("dafl", "paper-mnist"),
    "noise": ("noise", "fast"),
}


def compare(teacher_module: nn.Module, input_shape, make_student, eval_data: EvalData, *,
            budget: float, seeds: int, methods=METHODS, eval_every_s: float | None = None,
            progress: bool = False) -> dict:  # fmt: skip
    """Run each method for each seed with the same budget; print accuracy vs seconds and
    medians. Returns {label: [DistillResult, ...]}."""
    teacher = Teacher.from_module(teacher_module, tuple(input_shape))
    teacher_acc = evaluate(teacher_module, eval_data)
    print(f"teacher accuracy: {teacher_acc:.4f}  (99% target: {0.99 * teacher_acc:.4f})")
    checkpoints = [round(budget * k / 6, 1) for k in range(1, 7)]
    results: dict[str, list] = {}
    for label, (method, preset) in methods.items():
        results[label] = []
        for seed in range(seeds):
            # Evaluate about every 5 s (cheap on a 5k set) so accuracy-vs-time is finely sampled.
            result = distill(teacher, make_student(), method=method, preset=preset,
                             time_budget=budget, seed=seed, eval_data=eval_data,
                             progress=progress,
                             eval_interval_s=eval_every_s or budget / 12)  # fmt: skip
            results[label].append(result)
            curve = "  ".join(
                f"{t:>4.0f}s:{_fmt(accuracy_at(result.history, t))}" for t in checkpoints
            )
            print(
                f"{label:18s} seed {seed}: final {result.student_accuracy:.4f} "
                f"({result.iterations} it, {result.elapsed_s:.1f} s)  {curve}",
                flush=True,
            )
    print()
    print(f"median over {seeds} seed(s), budget {budget:.0f} s; teacher {teacher_acc:.4f}")
    header = "method".ljust(18) + "".join(f"{f'{t:.0f}s':>9}" for t in checkpoints) + \
        "    final  %teacher"  # fmt: skip
    print(header)
    for label, runs in results.items():
        cells = []
        for t in checkpoints:
            values = [accuracy_at(r.history, t) for r in runs]
            values = [v for v in values if v is not None]
            cells.append(_fmt(statistics.median(values) if values else None))
        final = statistics.median(r.student_accuracy for r in runs)
        print(label.ljust(18) + "".join(f"{c:>9}" for c in cells) +
              f"   {final:.4f}  {100 * final / teacher_acc:6.2f}%")  # fmt: skip
    return {"teacher_accuracy": teacher_acc, "results": results}


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:.4f}"


class SmallResNet(nn.Module):
    """ResNet-8 style CIFAR net (stem + 3 stages of one BasicBlock): cheap enough for CPU."""

    def __init__(self, widths=(16, 32, 64), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        from model_zoo.resnet import BasicBlock

        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))  # fmt: skip
        blocks, in_planes = [], widths[0]
        for i, planes in enumerate(widths):
            blocks.append(BasicBlock(in_planes, planes, stride=1 if i == 0 else 2))
            in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))
