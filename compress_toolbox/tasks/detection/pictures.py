"""samples.png for detection: generated scenes with the teacher's boxes (green) and the
student's (red, dashed) drawn on them, class and score written by each box."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress_toolbox.domain import InputDomain
from compress_toolbox.tasks.detection.decode import DETECTION_THRESHOLD, Decoding, Detections

SHOWN = 8


def _draw(ax, found: Detections, colour: str, style: str) -> None:
    from matplotlib.patches import Rectangle

    for box, score, label in zip(found.boxes.tolist(), found.scores.tolist(),
                                 found.labels.tolist()):  # fmt: skip
        x1, y1, x2, y2 = box
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour,
                               linestyle=style, linewidth=1))  # fmt: skip
        ax.text(x1, y1, f"{label}:{score:.2f}", color=colour, fontsize=5, va="bottom")


@torch.no_grad()
def plot_detections(sampler, teacher: nn.Module, student: nn.Module, domain: InputDomain,
                    path: Path, decoding: Decoding) -> None:  # fmt: skip
    """Draw ``SHOWN`` generated scenes with both models' detections into ``path`` (boxes
    encoded against anchors the file does not hold are not drawn without the user's
    --decode: their pixels are unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress_toolbox.report.render import _displayable  # lazy: matplotlib

    x = sampler(SHOWN).cpu()
    t_out, s_out = teacher.eval().cpu()(x), student.eval().cpu()(x)
    found = [decoding(out, x.shape[-2:], DETECTION_THRESHOLD) for out in (t_out, s_out)]
    pixels = _displayable(x, domain)
    fig, axes = plt.subplots(1, SHOWN, figsize=(2 * SHOWN, 2.3), squeeze=False)
    for i, ax in enumerate(axes[0]):
        image = pixels[i].permute(1, 2, 0).squeeze(-1).numpy()
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        if decoding.in_pixels:
            _draw(ax, found[0][i], "lime", "-")
            _draw(ax, found[1][i], "red", "--")
        else:
            ax.set_title(f"{len(found[0][i])} / {len(found[1][i])} found", fontsize=6)
        ax.set_axis_off()
    fig.suptitle("generated scenes: teacher's boxes (green), student's (red, dashed)"
                 if decoding.in_pixels else "generated scenes: detections of teacher / "
                 "student (boxes encoded against anchors: not drawn)")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
