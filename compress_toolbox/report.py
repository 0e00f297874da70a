"""Stage 6: the report: report.json and report.md, loss/accuracy curves and generated samples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "int":
        return f"{value:,}"
    if kind == "ms":
        return f"{value:.3f} ms"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: a teacher vs student table and how the student was made."""
    teacher, student = report["teacher"], report["student"]
    rows = [
        ("parameters", "params", "int"),
        ("MACs (batch 1)", "macs", "int"),
        ("ONNX file size (bytes)", "onnx_bytes", "int"),
        ("latency, onnxruntime CPU, batch 1 (median)", "latency_ms", "ms"),
        ("accuracy on eval data", "accuracy", "pct"),
    ]
    lines = [
        f"# dafl-compress report: {Path(report['teacher']['source']).name}",
        "",
        "| | teacher | student | student / teacher |",
        "|---|---|---|---|",
    ]
    for label, key, kind in rows:
        t, s = teacher.get(key), student.get(key)
        ratio = f"{s / t:.3f}" if isinstance(t, (int, float)) and t and s is not None else ""
        lines.append(f"| {label} | {_fmt(t, kind)} | {_fmt(s, kind)} | {ratio} |")
    agreement = report.get("agreement") or {}
    lines += [
        "",
        f"- top-1 agreement student vs teacher: {_fmt(agreement.get('value'), 'pct')} "
        f"(on {agreement.get('on', 'n/a')})",
        f"- student: {report['student'].get('kind')} (widths {report['student'].get('widths')})",
        f"- method: {report['method']}, preset {report['preset']}, "
        f"{report['iterations']} iterations in {report['elapsed_s']:.1f} s on {report['device']}, "
        f"seed {report['seed']}",
        f"- student accuracy is measured on the exported student.onnx with onnxruntime; "
        f"ONNX verified against PyTorch (max abs diff {report['onnx_check']['max_abs_diff']:.2e} "
        f"at batch 1 and 7)",
        f"- command: `{report['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """curves.png: each loss, and student accuracy when measured, against elapsed seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    seconds = [row["elapsed_s"] for row in history]
    for key in ("loss_oh", "loss_ie", "loss_a", "loss_kd"):
        values = [row.get(key) for row in history]
        if any(v is not None for v in values):
            ax_loss.plot(seconds, [float("nan") if v is None else v for v in values], label=key)
    ax_loss.set(xlabel="seconds", ylabel="loss", title="losses")
    ax_loss.legend()
    points = [
        (row["elapsed_s"], row["accuracy"]) for row in history if row.get("accuracy") is not None
    ]
    if points:
        ax_acc.plot(*zip(*points), marker="o")
        ax_acc.set(xlabel="seconds", ylabel="student accuracy", title="eval accuracy")
    else:
        ax_acc.text(0.5, 0.5, "no eval data given", ha="center", va="center")
        ax_acc.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def plot_samples(generator: nn.Module | None, teacher: nn.Module, path: Path, per_class: int = 8):
    """samples.png: generated inputs grouped by the teacher's predicted class (images only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_note = None
    images = labels = None
    if generator is not None:
        generator = generator.eval().cpu()
        z = torch.randn(256, getattr(generator, "latent_dim", 100))
        images = generator(z)
        labels = teacher.eval().cpu()(images).argmax(1)
    if images is None or images.dim() != 4:
        fig_note = "no image generator (noise baseline or flat inputs)"
    if fig_note:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, fig_note, ha="center", va="center")
        ax.set_axis_off()
    else:
        classes = sorted(set(labels.tolist()))[:20]
        fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class, len(classes)),
                                 squeeze=False)  # fmt: skip
        for row, cls in enumerate(classes):
            picked = images[labels == cls][:per_class]
            for col in range(per_class):
                ax = axes[row][col]
                ax.set_axis_off()
                if col < len(picked):
                    img = picked[col]
                    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
                    if img.shape[0] == 1:
                        ax.imshow(img[0].numpy(), cmap="gray")
                    else:
                        ax.imshow(img[:3].permute(1, 2, 0).numpy())
            axes[row][0].set_title(f"class {cls}", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json and report.md."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
