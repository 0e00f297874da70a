"""Stage 6: the report: report.json and report.md, loss/accuracy curves and generated samples."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.tasks.verdict import WARN_BELOW, falls_short, share_of_margin


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
        (f"latency, onnxruntime CPU, batch {student.get('latency_batch') or 1} (median)",
         "latency_ms", "ms"),
        ("accuracy on eval data", "accuracy", "pct"),
    ]
    lines = [f"# dafl-compress report: {Path(report['teacher']['source']).name}", ""]
    if report.get("status") == "failed":
        lines += [f"**FAILED: {'; '.join(report['problems'])}.**", ""]
    t_acc, s_acc = teacher.get("accuracy"), student.get("accuracy")
    seg = report.get("segmentation")
    if seg:
        t_acc, s_acc = teacher.get("mean_iou"), student.get("mean_iou")
    trivial = (report.get("trivial_predictor") or {}).get("value")
    if (report.get("status") != "failed" and t_acc and s_acc is not None and trivial is not None
            and falls_short(t_acc, s_acc, trivial, below=WARN_BELOW)):  # fmt: skip
        figure = "mean IoU" if seg else "accuracy"
        share = share_of_margin(t_acc, s_acc, trivial)
        lines += [f"**Warning: the student reaches only {100 * s_acc / t_acc:.1f}% of the "
                  f"teacher's {figure} ({100 * share:.0f}% of its margin over the trivial "
                  f"predictor's {100 * trivial:.2f}%).**", ""]  # fmt: skip
    if seg:
        rows[-1] = ("pixel accuracy on eval data (255 = ignored)", "accuracy", "pct")
        rows.append(("mean IoU on eval data", "mean_iou", "pct"))
    if report.get("score_rows"):  # the task's own figures (Task.measure)
        rows[-1:] = [tuple(row) for row in report["score_rows"]]
    lines += [
        "| | teacher | student | student / teacher |",
        "|---|---|---|---|",
    ]
    for label, key, kind in rows:
        t, s = teacher.get(key), student.get(key)
        ratio = f"{s / t:.3f}" if isinstance(t, (int, float)) and t and s is not None else ""
        lines.append(f"| {label} | {_fmt(t, kind)} | {_fmt(s, kind)} | {ratio} |")
    agreement = report.get("agreement") or {}
    if trivial is not None:
        baseline = report["trivial_predictor"]
        lines.append(f"| {baseline['figure']} of the trivial predictor ({baseline['what']}) | "
                     f"{_fmt(trivial, 'pct')} | {_fmt(trivial, 'pct')} | |")  # fmt: skip
    lines += [
        "",
        f"- {'agreement' if report.get('detection') else 'top-1 agreement'} student vs "
        f"teacher: {_fmt(agreement.get('value'), 'pct')} (on {agreement.get('on', 'n/a')})",
        *([f"- detection head: {report['detection']['layout']}; decoded by "
           f"{report['detection'].get('decoded_by', 'the built-in decoding')}"]
          if (report.get("detection") or {}).get("layout") else []),
        f"- student: {report['student'].get('kind')} (widths {report['student'].get('widths')})",
        f"- method: {report['method']} ({report.get('method_reason', '')}), preset "
        f"{report['preset']}{_preset_changes(report)}, {report['iterations']} iterations"
        f"{_planned(report)} in "
        f"{report['elapsed_s']:.1f} s {_after_race(report)}on {report['device']}"
        f"{_ranks(report)}, seed {report['seed']}",
        f"- health of the generated inputs at the end: {_health(report.get('health'))}; "
        f"generator restarts after a collapse: {report.get('generator_restarts', 0)}",
        f"- input domain: {teacher.get('input_domain', 'n/a')}",
        _student_onnx_line(report),
        f"- student accuracy is measured on the exported student.onnx with onnxruntime; "
        f"ONNX verified against PyTorch (max abs diff {report['onnx_check']['max_abs_diff']:.2e} "
        f"at batch 1 and 7)"
        + (
            f"; no student.pt2: {report['onnx_check']['pt2_skipped']}"
            if report["onnx_check"].get("pt2_skipped")
            else ""
        ),  # fmt: skip
        f"- command: `{report['command']}`",
        "",
    ]
    if seg:
        lines += _per_class_iou(seg)
    if report.get("per_class_accuracy"):
        lines += _per_class_accuracy(report["per_class_accuracy"])
    if report.get("int8"):
        lines += _int8_section(report["int8"])
    return "\n".join(lines)


def _student_onnx_line(report: dict[str, Any]) -> str:
    """What student.onnx takes and gives: the teacher file's signature where it was given one
    (``exported_as``), else its input."""
    exported_as, shape = report.get("exported_as") or {}, report["teacher"]["input_shape"]
    found, layout = exported_as.get("signature"), exported_as.get("input_layout")
    differences = exported_as.get("differences")
    if found is None:
        dims = [*shape[1:], shape[0]] if layout else shape  # channels last: (H, W, C)
        return (f"- student.onnx input: float32 `[batch, {', '.join(map(str, dims))}]`"
                + (f" ({layout}, as the teacher's file takes it)" if layout else "")
                + (f"; the teacher file's signature {'; '.join(differences)}"
                   if differences else ""))  # fmt: skip

    def tensors(specs: list[dict]) -> str:
        shown = [f"`{s['name']}` {s['dtype']} [{', '.join(map(str, s['declared']))}]"
                 for s in specs]  # fmt: skip
        return ", ".join(shown)

    verdict = ("the teacher file's signature" if not differences
               else f"differs from the teacher file's: {'; '.join(differences)}")  # fmt: skip
    return (f"- student.onnx ({verdict}): {tensors(found['inputs'])} -> "
            f"{tensors(found['outputs'])}")


def latency_columns(latencies: list[dict[str, Any]]) -> list[str]:
    """The "batch B" keys of these latency tables (INT8 rows), by batch: batch 1 and 32, and
    any batch a fixed-batch file was timed at instead."""
    keys = {key for latency in latencies for key in latency} or {"batch 1", "batch 32"}
    return sorted(keys, key=lambda key: int(key.split()[-1]))


def _int8_section(int8: dict[str, Any]) -> list[str]:
    """report.md's INT8 table (teacher fp32 / teacher int8 / student fp32 / student int8) and
    each INT8 model's verdict, calibration and the ops left in float."""
    figure = (int8["student"].get("figure") or "accuracy") if int8.get("student") else "accuracy"
    columns = latency_columns([row["latency_ms"] for row in int8["rows"]])
    lines = ["## INT8", "",
             f"| model | file | params | size (bytes) | "
             f"{''.join(f'latency {key} | ' for key in columns)}{figure} | agreement with fp32 |",
             "|---|---|---|---|" + "---|" * len(columns) + "---|---|"]  # fmt: skip
    for row in int8["rows"]:
        name = row["model"] + ("" if row["status"] == "ok" else f" ({row['status'].upper()})")
        latency = "".join(f"{_fmt(row['latency_ms'].get(key), 'ms')} | " for key in columns)
        lines.append(f"| {name} | {row['file'] or 'none'} | {_fmt(row['params'], 'int')} | "
                     f"{_fmt(row['onnx_bytes'], 'int')} | {latency}{_fmt(row['score'], 'pct')} | "
                     f"{_fmt(row['agreement'], 'pct')} |")  # fmt: skip
    lines += ["", f"- calibrated on {int8['calibrated_on']}; kept only when {int8['margin']}"]
    check = (int8.get("student") or {}).get("agreement")
    if check:
        lines.append(f"- agreement with fp32: top-1 (per pixel for masks) on {check['on']}")
    for side in ("student", "teacher"):
        if int8.get(side):
            lines.append(f"- {side} int8: {_int8_verdict(int8[side])}")
    return [*lines, "- latency: onnxruntime CPU, one thread, median of 20 runs", ""]


def _int8_verdict(entry: dict[str, Any]) -> str:
    """One line on an INT8 model: kept, rejected (and why) or failed, its ops left in float."""
    if entry["status"] == "failed":
        return f"**FAILED, none written**: {entry['reason']}"
    text = (f"{entry['calibration_method']} calibration on {entry['calibration_samples']} "
            f"inputs, {entry['activations']} activations, size {entry['size_ratio']:.2f}x fp32, "
            f"verified at batch {' and '.join(map(str, entry['verified_batches']))}")  # fmt: skip
    if entry["size_ratio"] >= 1:
        text += " (no smaller: its quantisation scales outweigh so few weights)"
    floats, layout = entry["float_op_types"], entry.get("float_layout_ops") or []
    kept = entry.get("kept_float_ops")
    if floats:
        text += f"; left in float (onnxruntime cannot quantise them): {', '.join(floats)}"
    elif kept:
        text += "; every op onnxruntime can quantise is quantised"
    else:
        text += "; every computing op quantised"
    if layout:
        text += f" (data-movement ops on float tensors: {', '.join(layout)})"
    if kept:
        text += f"; {entry['kept_float_reason']}"
    if entry["status"] == "rejected":
        return (f"**REJECTED, written as {entry['file']}, not equivalent**: {entry['reason']}; "
                f"{text}")
    return text


def _per_class_iou(seg: dict[str, Any]) -> list[str]:
    """report.md's per-class IoU table (n/a: the class is in neither masks nor predictions)."""
    lines = ["## Per-class IoU on the eval data", "", "| class | teacher | student |",
             "|---|---|---|"]  # fmt: skip
    for index, (t, s) in enumerate(zip(seg["teacher"]["per_class_iou"],
                                       seg["student"]["per_class_iou"])):  # fmt: skip
        lines.append(f"| {index} | {_fmt(t, 'pct')} | {_fmt(s, 'pct')} |")
    return [
        *lines,
        "",
        f"Pixels labelled {seg['ignore_index']} are ignored; the mean IoU "
        "averages the classes present in the masks or the predictions.",
        "",
    ]


PER_CLASS_ROWS = 20  # more classes than this: only the ones the student loses most


def _per_class_accuracy(section: dict[str, Any]) -> list[str]:
    """report.md's per-class accuracy table, the classes where the student gets the most eval
    inputs wrong that the teacher gets right first (by count, so that a class of one input
    does not lead at 100 points); all of them up to PER_CLASS_ROWS classes, else that many;
    n/a: no eval input of the class."""
    columns = zip(section["inputs"], section["teacher"], section["student"])
    rows = [(index, *values) for index, values in enumerate(columns)]
    rows.sort(key=lambda row: (row[2] - row[3]) * -row[1] if row[1] else float("inf"))
    shown = rows[:PER_CLASS_ROWS]
    what = "the classes where the student loses most inputs first"
    if len(shown) < len(rows):
        what = f"the {len(shown)} of {len(rows)} classes where the student loses most inputs"
    lines = [f"## Per-class accuracy on the eval data ({what})", "",
             "| class | eval inputs | teacher | student | student - teacher (points) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for index, inputs, t, s in shown:
        change = f"{100 * (s - t):+.1f}" if inputs else "n/a"
        lines.append(f"| {index} | {inputs:,} | {_fmt(t, 'pct')} | {_fmt(s, 'pct')} | {change} |")
    return [*lines, ""]


def _health(health: dict[str, Any] | None) -> str:
    if not health:
        return "n/a"
    found = health.get("found", 1.0)
    found_text = f"finds objects in {found:.0%} of the generated inputs, " if found < 1 else ""
    return (
        f"the teacher answers {health['classes']} classes (normalised entropy "
        f"{health['class_entropy']:.2f}, mean confidence {health['teacher_confidence']:.2f}), "
        f"{found_text}student agrees on {100 * health['agreement']:.1f}%"
    )


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """curves.png: each loss, and student accuracy when measured, against elapsed seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    seconds = [row["elapsed_s"] for row in history]
    columns = dict.fromkeys(key for row in history for key in row)
    keys = [key for key in columns if key.startswith("loss_")]
    for key in keys:
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


def _displayable(images: torch.Tensor, domain: InputDomain) -> torch.Tensor:
    """Model inputs -> [0, 1] pixels: back through the input domain; per-image min-max when
    the inputs are not pixels (the paper's standardised generator output)."""
    pixels = domain.to_pixels(images)
    if pixels.min() >= -0.01 and pixels.max() <= 1.01:
        return pixels.clamp(0, 1)
    flat = pixels.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1, 1)
    high = flat.max(1).values.view(-1, 1, 1, 1)
    return (pixels - low) / (high - low + 1e-8)


@torch.no_grad()
def plot_samples(
    sampler: Callable[[int], torch.Tensor] | None,
    teacher: nn.Module,
    domain: InputDomain,
    path: Path,
    per_class: int = 8,
) -> None:
    """samples.png: generated inputs grouped by the teacher's predicted class (images only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = sampler(256).cpu() if sampler is not None else None
    if images is None or images.dim() != 4:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no images to show (flat inputs)", ha="center", va="center")
        ax.set_axis_off()
    else:
        labels = teacher.eval().cpu()(images).argmax(1)
        images = _displayable(images, domain)
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
                    if img.shape[0] == 1:
                        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                    else:
                        ax.imshow(img[:3].permute(1, 2, 0).numpy())
            axes[row][0].set_title(f"class {cls}", fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def plot_segmentation_samples(
    sampler: Callable[[int], torch.Tensor] | None,
    teacher: nn.Module,
    student: nn.Module,
    domain: InputDomain,
    path: Path,
    count: int = 8,
) -> None:
    """samples.png: generated inputs (top row) with the teacher's (middle) and the student's
    (bottom) masks overlaid, one colour per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, count, figsize=(count * 1.3, 4.2), squeeze=False)
    images = sampler(count).cpu() if sampler is not None else None
    masks = {}
    if images is not None:
        masks = {"teacher": teacher.eval().cpu()(images).argmax(1),
                 "student": student.eval().cpu()(images).argmax(1)}  # fmt: skip
        images = _displayable(images, domain)
    for col in range(count):
        for row, name in enumerate(("input", "teacher", "student")):
            ax = axes[row][col]
            ax.set_axis_off()
            if images is None:
                continue
            img = images[col]
            shown = img[0].numpy() if img.shape[0] == 1 else img[:3].mean(0).numpy()
            ax.imshow(shown, cmap="gray", vmin=0, vmax=1)
            if name != "input":
                ax.imshow(masks[name][col].numpy(), cmap="tab20", alpha=0.5,
                          interpolation="nearest", vmin=0, vmax=19)  # fmt: skip
            if col == 0:
                ax.set_title(name if name == "input" else f"{name}'s masks", fontsize=7,
                             loc="left")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    """report.json and report.md."""
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n",
                                          encoding="utf-8")
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")


def planned_iterations(recipe: dict[str, Any] | None) -> int | None:
    """The iterations a time-budgeted run's last (re-)plan expected (report.json's recipe),
    None for a run bounded by iterations or without a plan."""
    recipe = recipe or {}
    if str(recipe.get("sized_by", "counts")).startswith("counts"):
        return None
    return recipe.get("planned_total") or None


def _preset_changes(report: dict) -> str:
    changes = report.get("preset_changes") or {}
    if not changes:
        return ""
    return " (changed: " + ", ".join(f"{key}={value}" for key, value in changes.items()) + ")"


def _planned(report: dict) -> str:
    planned = planned_iterations(report.get("recipe"))
    if planned is None:
        return ""
    replans = report["recipe"].get("replans", 0)
    again = f", re-planned {replans} time{'s' * (replans > 1)}" if replans else ""
    return f" (planned: about {planned}{again})"


def _after_race(report: dict[str, Any]) -> str:
    """What the run's seconds hold beside its iterations when a race chose the method."""
    race = report.get("race")
    if not race:
        return ""
    legs = sum(leg["iterations"] for leg in race["legs"])
    return f"(the winner's, after a race of {legs} iterations in {race['seconds']:.1f} s) "


def _ranks(report: dict) -> str:
    """' x 2 ranks (global batch 64)' for a run of several processes, else nothing."""
    ranks = report.get("world_size", 1)
    if ranks <= 1:
        return ""
    return (
        f" x {ranks} ranks (batch {report['batch_size']} each, global batch "
        f"{report['global_batch_size']})"
    )
