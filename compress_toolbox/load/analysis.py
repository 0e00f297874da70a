"""Stage 2: analyse a module: parameters, MACs, layer widths, output shape and the task it fits."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from compress_toolbox.tasks import task_of_output

# Layers whose widths we report and whose multiply-accumulates we count.
_WIDTH_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)


@dataclass
class LayerInfo:
    name: str
    type: str
    in_width: int
    out_width: int
    macs: int


@dataclass
class Analysis:
    params: int
    macs: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]  # without the batch dimension
    task: str | None  # the registered task whose teachers give this output, if any
    layers: list[LayerInfo] = field(default_factory=list)
    final_layer: str | None = None  # name of the last Linear (or 1x1 conv) run: its input is the
    # feature vector DAFL's activation loss uses

    @property
    def num_outputs(self) -> int:
        return self.output_shape[0] if self.output_shape else 0

    @property
    def widths(self) -> list[int]:
        return [layer.out_width for layer in self.layers]

    def to_dict(self) -> dict:
        return asdict(self)

    def not_smaller_than(self, other: Analysis) -> list[tuple[str, int, int]]:
        """``not_smaller`` for parameters and MACs, this model (a student) against ``other``
        (its teacher)."""
        return not_smaller([("parameters", other.params, self.params),
                            ("MACs", other.macs, self.macs)])  # fmt: skip


def not_smaller(sizes: list[tuple[str, int | None, int | None]]) -> list[tuple[str, int, int]]:
    """Of (what, teacher's, student's) sizes, those where the student is no smaller than its
    teacher: what makes it no compression. A size not known (0 or None) is not compared."""
    return [(what, teacher, student) for what, teacher, student in sizes
            if teacher and student is not None and student >= teacher]  # fmt: skip


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def _layer_macs(layer: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    if isinstance(layer, nn.Linear):
        return output.numel() // output.shape[0] * layer.in_features
    if isinstance(layer, nn.ConvTranspose2d):
        x = inputs[0]
        kernel = layer.weight[0].numel()  # (out/groups) * kh * kw
        return x.numel() // x.shape[0] * kernel
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        kernel = layer.weight[0].numel()  # (in/groups) * kh * kw
        return output.numel() // output.shape[0] * kernel
    return 0


def _widths(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def output_tensor(output) -> torch.Tensor:
    """The main output of a model: the tensor itself, or the first tensor of a tuple/dict."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)) and output:
        return output_tensor(output[0])
    raise TypeError(f"model output of type {type(output).__name__} holds no tensor")


@torch.no_grad()
def run_with_hooks(module: nn.Module, example: torch.Tensor, hooks: list, *, pre: bool = False):
    """``module(example)`` once, without gradients, with ``hooks`` ((layer, function) pairs)
    attached as forward hooks (forward pre-hooks with ``pre``) for that call only."""
    handles = [layer.register_forward_pre_hook(fn) if pre else layer.register_forward_hook(fn)
               for layer, fn in hooks]  # fmt: skip
    try:
        return module(example)
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def analyse(module: nn.Module, input_shape: tuple[int, ...]) -> Analysis:
    """Run one forward pass at batch 1 and collect params, MACs, layer widths and output size."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    records: list[tuple[str, nn.Module, int]] = []
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, _WIDTH_LAYERS):

            def hook(mod, inputs, output, name=name):
                records.append((name, mod, _layer_macs(mod, inputs, output)))

            hooks.append((layer, hook))
    was_training = module.training
    module.eval()
    try:
        example = torch.zeros(1, *input_shape, device=device)
        output = output_tensor(run_with_hooks(module, example, hooks))
    finally:
        module.train(was_training)

    layers: list[LayerInfo] = []
    seen: set[str] = set()
    for name, layer, macs in records:
        if name in seen:  # a layer called twice counts its MACs twice but is listed once
            next(info for info in layers if info.name == name).macs += macs
            continue
        seen.add(name)
        in_w, out_w = _widths(layer)
        layers.append(LayerInfo(name, type(layer).__name__, in_w, out_w, macs))

    final_layer = None
    for name, layer, _ in reversed(records):
        # a depthwise 1x1 conv (a per-channel scale, onnx_cleanup.py) never mixes channels
        if isinstance(layer, nn.Linear) or (
            isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1
        ):
            final_layer = name
            break
    output_shape = tuple(output.shape[1:])
    return Analysis(
        params=count_params(module),
        macs=sum(info.macs for info in layers),
        input_shape=tuple(input_shape),
        output_shape=output_shape,
        task=getattr(task_of_output(output_shape), "name", None),
        layers=layers,
        final_layer=final_layer,
    )
