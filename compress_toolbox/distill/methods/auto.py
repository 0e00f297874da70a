"""``--method auto``: which method to run on a teacher, from the teacher's properties, as the
teacher suite measured (benchmarks/RESULTS.md)."""

from __future__ import annotations

from compress_toolbox.distill.methods.base import MethodContext


def choose_method(ctx: MethodContext) -> tuple[str, str]:
    """(method name, the reason, for the report)."""
    if ctx.task == "segmentation":
        return "dafl", (
            "per-pixel DAFL measured best on the segmentation benchmark, BatchNorm or not (at "
            "300 s on the .pt2 teachers keeping BatchNorm: 68% and 53% of the teacher's mean "
            "IoU against 49% and 46% with bn-prior; dfad behind or level)"
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
