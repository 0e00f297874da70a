"""Helpers shared by the family modules."""

from __future__ import annotations

from torch import nn


def hw(input_size: tuple[int, int] | None, default: tuple[int, int]) -> tuple[int, int]:
    """``input_size`` as an (H, W) pair, or ``default`` when None."""
    if input_size is None:
        return default
    height, width = input_size
    return int(height), int(width)


def replace_first_conv(
    model: nn.Module, in_channels: int, *, stride: int | tuple[int, int] | None = None
) -> nn.Module:
    """Swap the model's first ``nn.Conv2d`` for one taking ``in_channels`` (and ``stride``).

    The replacement keeps kernel, padding, groups, bias and output width; weights are fresh.
    """
    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:  # pragma: no cover - every zoo model has a conv
        raise ValueError("model has no Conv2d to adapt")
    name, conv = found
    new_stride = conv.stride if stride is None else stride
    if conv.in_channels == in_channels and tuple(conv.stride) == _pair(new_stride):
        return model
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=new_stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups if in_channels % conv.groups == 0 else 1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)
    return model


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
