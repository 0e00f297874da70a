"""Labelled text lines for PaddleOCR's text-direction classifier (``ocr_cls`` of
bench_real_exports.py): eval data for a real teacher nobody here trained.

    python benchmarks/teachers/make_textlines.py [--count 1000] [--seed 0] [--out FILE.npz]

Each line is 1-4 English words (a number after half of them) in a random DejaVu font, size,
grey level and margin, rendered with PIL, then prepared as PaddleOCR prepares a line for this
classifier: scaled to height 48 keeping its aspect ratio, at most 192 wide, the rest of the
width grey (128: 0.004 after its ``(x - 0.5) / 0.5``, where PaddleOCR pads with 0). Every
second line is turned 180 degrees: label 1 ("180"), else 0 ("0"). Writes uint8 x
(N, 3, 48, 192) and y (N,) (default benchmarks/real_models/textlines.npz, not committed); use
it with ``--input-shape 3,48,192 --mean 0.5 --std 0.5 --eval-data``. Another ``--seed`` gives
other lines (a training set for bench_ceiling-style checks).
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
FONTS = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("*.ttf"))
WORDS = ("invoice total amount date name address street city phone number order shipping "
         "price quantity item description payment receipt customer account balance due tax "
         "subtotal discount store market coffee bread milk sugar water apple orange").split()
HEIGHT, WIDTH = 48, 192


def _text(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 4))]
    if rng.random() < 0.5:
        words.append(str(rng.randint(1, 99999)))
    text = " ".join(words)
    return text.upper() if rng.random() < 0.3 else text.capitalize()


def _render(text: str, rng: random.Random) -> Image.Image:
    font = ImageFont.truetype(str(rng.choice(FONTS)), rng.randint(28, 44))
    left, top, right, bottom = font.getbbox(text)
    margin_x, margin_y = rng.randint(2, 10), rng.randint(2, 8)
    image = Image.new("L", (right - left + 2 * margin_x, bottom - top + 2 * margin_y),
                      rng.randint(180, 255))  # fmt: skip
    ImageDraw.Draw(image).text((margin_x - left, margin_y - top), text, font=font,
                               fill=rng.randint(0, 80))  # fmt: skip
    return image.convert("RGB")


def _as_classifier_input(image: Image.Image) -> np.ndarray:
    width = min(WIDTH, math.ceil(HEIGHT * image.width / image.height))
    line = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    line[:, :width] = np.asarray(image.resize((width, HEIGHT), Image.BILINEAR))
    return line.transpose(2, 0, 1)


def make_lines(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` lines (uint8, N x 3 x 48 x 192) and their labels (1: turned 180 degrees)."""
    if not FONTS:
        raise SystemExit("no DejaVu fonts in /usr/share/fonts/truetype/dejavu (fonts-dejavu)")
    rng = random.Random(seed)
    lines, labels = [], []
    for index in range(count):
        image = _render(_text(rng), rng)
        turned = index % 2
        lines.append(_as_classifier_input(image.rotate(180) if turned else image))
        labels.append(turned)
    return np.stack(lines), np.array(labels, np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description="Labelled text lines for PaddleOCR's "
                                     "text-direction classifier (ocr_cls).")  # fmt: skip
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE.parent / "real_models" / "textlines.npz")
    args = parser.parse_args()
    x, y = make_lines(args.count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, x=x, y=y)
    print(f"{args.out}: {len(x)} lines, {int(y.sum())} turned 180 degrees")


if __name__ == "__main__":
    main()
