"""Labelled document pages for RapidAI's PicoDet layout detector (``picodet_layout`` of
bench_real_exports.py): eval data for a real detector nobody here trained.

    python benchmarks/teachers/make_layout_pages.py [--count 100] [--seed 0] [--out FILE.npz]

Each page is 608 x 800 pixels (the detector's input, width x height), white, drawn with PIL in
DejaVu fonts: an optional header line and page-number footer, a title, then blocks down the
page (one column, or two on a third of the pages): paragraphs of English words, section
titles, figures (axes with curves, or filled shapes) with a caption below, tables (ruled grids
of numbers) with a caption above, and centred equations. Each block's box is its drawn extent,
labelled with the detector's classes (CDLA's: text 0, title 1, figure 2, figure_caption 3,
table 4, table_caption 5, header 6, footer 7, reference 8, equation 9; references are not
drawn). Writes an ``.npz`` in ``--eval-data``'s detection format (default
benchmarks/real_models/layout_pages.npz, not committed); use it with ``--mean
0.485,0.456,0.406 --std 0.229,0.224,0.225``, rapid_layout's normalisation.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from compress_toolbox.tasks.detection.data import save_detection_npz  # noqa: E402

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
WIDTH, HEIGHT, MARGIN = 608, 800, 36
TEXT, TITLE, FIGURE, FIGURE_CAPTION, TABLE, TABLE_CAPTION, HEADER, FOOTER, _, EQUATION = range(10)
WORDS = ("the model of data we show that results method training network layer image input "
         "output loss accuracy student teacher feature detection class sample value figure "
         "table section shows compared baseline proposed approach performance experiments "
         "distribution learning parameters").split()


def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_DIR / ("DejaVuSerif-Bold.ttf" if bold
                                              else "DejaVuSerif.ttf")), size)  # fmt: skip


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _lines(draw, rng, x, y, width, font, count, gap) -> tuple[int, list[int]]:
    """``count`` lines of words from (x, y) within ``width``; the y below them and the box."""
    right, top = x, y
    for i in range(count):
        text = _words(rng, 40)
        while draw.textlength(text, font=font) > width:
            text = text.rsplit(" ", 1)[0]
        if i == count - 1 and count > 1:  # a paragraph's last line is shorter
            text = text[: max(8, len(text) * rng.randint(3, 9) // 10)].rstrip()
        draw.text((x, y), text, font=font, fill=20)
        right = max(right, x + int(draw.textlength(text, font=font)))
        y += font.size + gap
    return y, [x, top, right, y - gap + 2]


def _figure(draw, rng, x, y, width, height) -> list[int]:
    draw.rectangle([x, y, x + width, y + height], outline=rng.randint(0, 120))
    if rng.random() < 0.5:  # a plot: axes and curves
        draw.line([x + 12, y + height - 12, x + width - 8, y + height - 12], fill=0, width=2)
        draw.line([x + 12, y + 8, x + 12, y + height - 12], fill=0, width=2)
        for _ in range(rng.randint(1, 3)):
            points = [(x + 12 + i * (width - 20) / 20,
                       y + 10 + rng.random() * (height - 24)) for i in range(21)]  # fmt: skip
            draw.line(points, fill=tuple(rng.randint(0, 200) for _ in range(3)), width=2)
    else:  # shapes, as a diagram or a photograph
        for _ in range(rng.randint(3, 8)):
            x1, y1 = x + rng.randint(0, width - 20), y + rng.randint(0, height - 20)
            box = [x1, y1, min(x + width, x1 + rng.randint(15, width // 2)),
                   min(y + height, y1 + rng.randint(15, height // 2))]  # fmt: skip
            fill = tuple(rng.randint(0, 255) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return [x, y, x + width, y + height]


def _table(draw, rng, x, y, width, rows, font) -> list[int]:
    columns, row_height = rng.randint(3, 6), font.size + 8
    for r in range(rows + 1):
        draw.line([x, y + r * row_height, x + width, y + r * row_height], fill=0,
                  width=2 if r in (0, 1, rows) else 1)  # fmt: skip
    for r in range(rows):
        for c in range(columns):
            cell = f"{rng.uniform(0, 100):.1f}" if r else rng.choice(WORDS)[:8]
            draw.text((x + 4 + c * width / columns, y + r * row_height + 4), cell, font=font,
                      fill=20)  # fmt: skip
    return [x, y, x + width, y + rows * row_height]


def _block(draw, rng, x, y, width, objects) -> int:
    """One block at (x, y) within ``width``: its objects appended; the y below it."""
    kind = rng.choices(["text", "section", "figure", "table", "equation"], [8, 2, 2, 2, 1])[0]
    body = _font(rng.randint(11, 13))
    if kind == "text":
        y, box = _lines(draw, rng, x, y, width, body, rng.randint(3, 9), 4)
        objects.append((box, TEXT))
    elif kind == "section":
        y, box = _lines(draw, rng, x, y, width * 2 // 3, _font(rng.randint(14, 17), True), 1, 4)
        objects.append((box, TITLE))
    elif kind == "figure":
        height = rng.randint(90, 200)
        objects.append((_figure(draw, rng, x + 10, y, width - 20, height), FIGURE))
        y, box = _lines(draw, rng, x + 20, y + height + 6, width - 40, _font(10), 1, 3)
        objects.append((box, FIGURE_CAPTION))
    elif kind == "table":
        y, box = _lines(draw, rng, x + 20, y, width - 40, _font(10), 1, 3)
        objects.append((box, TABLE_CAPTION))
        rows = rng.randint(3, 8)
        objects.append((_table(draw, rng, x, y + 4, width, rows, _font(10)), TABLE))
        y += 4 + rows * (10 + 8)
    else:
        power = f"{rng.choice('αβγ')}^{rng.randint(2, 9)}"
        text = f"{rng.choice('xyzf')}(t) = Σ a_i · {power} / (1 + t²)"
        font = _font(14)
        left = x + (width - int(draw.textlength(text, font=font))) // 2
        draw.text((left, y), text, font=font, fill=0)
        objects.append(([left, y, left + int(draw.textlength(text, font=font)), y + 18],
                        EQUATION))  # fmt: skip
        y += 18
    return y + rng.randint(10, 20)


def make_page(rng: random.Random) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One page: (3, 800, 608) uint8 pixels, its boxes (G, 4) and labels (G,)."""
    page = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(page)
    objects: list[tuple[list[int], int]] = []
    if rng.random() < 0.6:
        _, box = _lines(draw, rng, MARGIN, 12, WIDTH // 2, _font(9), 1, 2)
        objects.append((box, HEADER))
    y, box = _lines(draw, rng, MARGIN + 40, 40, WIDTH - 2 * MARGIN - 80,
                    _font(rng.randint(20, 26), True), rng.randint(1, 2), 6)  # fmt: skip
    objects.append((box, TITLE))
    columns = 2 if rng.random() < 0.35 else 1
    width = (WIDTH - 2 * MARGIN - 20 * (columns - 1)) // columns
    for column in range(columns):
        x, y_column = MARGIN + column * (width + 20), y + 16
        while y_column < HEIGHT - 240:
            y_column = _block(draw, rng, x, y_column, width, objects)
    if rng.random() < 0.6:
        text = str(rng.randint(1, 300))
        left = (WIDTH - int(draw.textlength(text, font=_font(10)))) // 2
        draw.text((left, HEIGHT - 26), text, font=_font(10), fill=0)
        objects.append(([left, HEIGHT - 26, left + 8 * len(text), HEIGHT - 14], FOOTER))
    boxes = np.clip(np.array([b for b, _ in objects], np.float32), 0, [WIDTH, HEIGHT] * 2)
    seen = (boxes[:, 3] - boxes[:, 1] >= 4) & (boxes[:, 2] - boxes[:, 0] >= 4)  # on the page
    labels = np.array([k for _, k in objects], np.int64)
    return np.asarray(page).transpose(2, 0, 1).copy(), boxes[seen], labels[seen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path,
                        default=HERE.parent / "real_models" / "layout_pages.npz")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pages = [make_page(rng) for _ in range(args.count)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_detection_npz(args.out, np.stack([p[0] for p in pages]), [p[1] for p in pages],
                       [p[2] for p in pages])  # fmt: skip
    print(f"{args.out}: {args.count} pages, {sum(len(p[2]) for p in pages)} objects")


if __name__ == "__main__":
    main()
