"""``--method auto``: which method to run on a teacher, from the teacher's properties, as the
teacher suite measured (benchmarks/RESULTS.md)."""

from __future__ import annotations

from .base import MethodContext


def choose_method(ctx: MethodContext) -> tuple[str, str]:
    """(method name, the reason, for the report)."""
    if ctx.task == "segmentation":
        return "dafl", (
            "per-pixel DAFL measured best on the segmentation benchmark at 600 s (U-Net: 32% of "
            "the teacher's mean IoU, against 20% with dfad and 9% with bn-prior on its .pt2 "
            "keeping BatchNorm; LR-ASPP: 20-22% with each)"
        )
    layers = ctx.batchnorm_layers()
    if layers:
        return "bn-prior", (
            f"the teacher keeps {layers} BatchNorm layers, whose recorded statistics guide "
            "generation (best on the suite's BatchNorm teachers)"
        )
    return "dafl", (
        "the teacher has no BatchNorm statistics to match (folded by the ONNX exporter, or "
        "none); DAFL measured best on the suite's teachers without BatchNorm"
    )
