"""The one place that touches onnxscript internals: its default graph optimiser without the
rewrite rules that fold BatchNormalization into the preceding convolution.

Why: the BatchNorm-statistics prior (methods/bn_prior.py) needs the teacher's BatchNorm layers,
and .pt2 / TorchScript teachers reach us through an ONNX round trip whose optimiser would fold
them away. tests/test_adapters.py fails loudly if these internals move.
"""

from __future__ import annotations

import onnx


def optimize_keeping_batchnorm(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnxscript.optimizer.optimize`` (constant folding and the default rewrite rules, as
    torch's exporter applies with ``optimize=True``) minus the BatchNorm fusion rules."""
    import onnxscript.optimizer
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    batchnorm_rules = {id(rule) for rule in _fuse_batchnorm.rules.rules}
    saved = rewriter._DEFAULT_REWRITE_RULES
    rewriter._DEFAULT_REWRITE_RULES = tuple(r for r in saved if id(r) not in batchnorm_rules)
    try:
        return onnxscript.optimizer.optimize(model)
    finally:
        rewriter._DEFAULT_REWRITE_RULES = saved
