"""The teacher's input domain: the one place that knows what a valid teacher input is.

Pixels (or flat features) live in [0, 1]; when the user gives ``--mean``/``--std`` the teacher
expects ``(x - mean) / std`` (normalisation outside the model), otherwise it takes [0, 1] values
as they are (a model that normalises itself, or features already in [0, 1]). Evaluation data is
mapped into this domain and generators produce images in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compress_toolbox.errors import DaflError


def _as_tuple(name: str, value: float | str | Sequence[float] | None) -> tuple[float, ...] | None:
    """``value`` as floats: a number, a sequence of them, or text as the CLI takes it
    (``"0.5,0.5,0.5"``); DaflError naming the option otherwise."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        values = (float(parts),) if isinstance(parts, (int, float)) else tuple(map(float, parts))
    except (TypeError, ValueError):
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise DaflError(f"--{name} must be finite numbers, got {value!r}")
    return values


@dataclass(frozen=True)
class InputDomain:
    """Valid teacher inputs: ``(pixels - mean) / std`` for pixels in [0, 1].

    ``mean``/``std`` hold one value or one per channel; ``None`` means no normalisation.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @classmethod
    def from_options(
        cls,
        mean: float | Sequence[float] | None,
        std: float | Sequence[float] | None,
        input_shape: tuple[int, ...] | None = None,
    ) -> InputDomain:
        """Validate ``--mean``/``--std`` (finite; std non-zero; 1 or C values) for a teacher
        whose ``input_shape`` is known (the channel count is not checked without it)."""
        mean_t, std_t = _as_tuple("mean", mean), _as_tuple("std", std)
        channels = input_shape[0] if input_shape and len(input_shape) == 3 else 1
        for name, values in (("mean", mean_t), ("std", std_t)):
            if input_shape is not None and values is not None and len(values) not in (1, channels):
                raise DaflError(
                    f"--{name} has {len(values)} values; the teacher's input has {channels} "
                    "channel(s): give 1 or one per channel"
                )
        if std_t is not None and any(v == 0 for v in std_t):
            raise DaflError("--std must not be zero")
        if mean_t is None and std_t is None:
            return cls()
        return cls(mean_t or (0.0,), std_t or (1.0,))

    @property
    def normalised(self) -> bool:
        return self.mean is not None

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (like.dim() - 2) if like.dim() > 2 else (1, -1)
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device)
        if mean.numel() > 1:
            mean = mean.view(shape)
        if std.numel() > 1:
            std = std.view(shape)
        return mean, std

    def to_model(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (N, C, H, W) or features (N, F) -> what the teacher takes."""
        if not self.normalised:
            return pixels
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_model`` (for pictures of generated inputs)."""
        if not self.normalised:
            return x
        mean, std = self._stats(x)
        return x * std + mean

    def describe(self) -> str:
        if not self.normalised:
            return "pixels in [0, 1], no normalisation (the model normalises itself, if at all)"
        return f"pixels in [0, 1], then (x - {list(self.mean)}) / {list(self.std)}"
