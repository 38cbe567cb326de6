"""The synthetic "shapes" task the bundled demo checkpoint was trained on (issue 7).

Everything here is exact and deterministic given a ``numpy.random.Generator``, so
anyone can draw fresh scenes and know the one right answer to each question:

* a white RGB image, width and height each in [112, 224] pixels;
* one to three filled, non-overlapping shapes, each a circle, a square or a
  triangle (apex up), colored red (255,0,0), green (0,160,0), blue (0,0,255) or
  yellow (230,200,0), of size 24-64 px (circle diameter, square side, triangle
  base = height);
* questions and their exact answers (``qa_pairs``):

  - "How many shapes are there?" -> "There is 1 shape." / "There are N shapes."
  - "What color is the {shape}?" (only when exactly one {shape} is present)
    -> "The {shape} is {color}."
  - "Describe the image." -> the shapes from left to right (by center x), e.g.
    "A red circle.", "A red circle and a blue square.",
    "A red circle, a blue square and a green triangle."

Two placement rules make every answer unambiguous: shapes keep a gap of at least
``GAP`` pixels between their bounding boxes (so they never touch or overlap), and
their center x coordinates differ by at least ``MIN_DX`` pixels (so "left to right"
has a single order).

Only NumPy and Pillow are needed; the training tool (tools/train_demo.py), the
evaluation tool (tools/eval_demo.py), the CLI and the tests all import this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS", "SHAPES", "QUESTION_COUNT", "QUESTION_DESCRIBE", "Shape",
    "random_scene", "draw_scene", "qa_pairs", "count_answer", "color_question",
    "color_answer", "describe_answer", "messages_for",
]

# Exact RGB values of the four colors (issue 7).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 160, 0),
    "blue": (0, 0, 255),
    "yellow": (230, 200, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)

MIN_SIDE, MAX_SIDE = 112, 224    # image width / height range, inclusive
MIN_SIZE, MAX_SIZE = 24, 64      # shape size range, inclusive
MARGIN = 2                       # shapes stay this many pixels inside the image
GAP = 4                          # minimum gap between two shapes' bounding boxes
MIN_DX = 6                       # minimum difference of two shapes' center x

QUESTION_COUNT = "How many shapes are there?"
QUESTION_DESCRIBE = "Describe the image."


@dataclass(frozen=True)
class Shape:
    """One drawn shape: its kind, color name and bounding box (top-left x, y and size)."""
    kind: str      # one of SHAPES
    color: str     # one of COLORS
    x: int         # left edge of the bounding box
    y: int         # top edge of the bounding box
    size: int      # bounding-box side in pixels

    @property
    def cx(self) -> float:
        """Center x of the bounding box: the key of the left-to-right order."""
        return self.x + self.size / 2.0

    @property
    def cy(self) -> float:
        return self.y + self.size / 2.0


def _fits(new: Shape, placed: list[Shape]) -> bool:
    """True if ``new`` keeps GAP pixels from every placed box and MIN_DX in center x."""
    for s in placed:
        separated = (new.x + new.size + GAP <= s.x or s.x + s.size + GAP <= new.x
                     or new.y + new.size + GAP <= s.y or s.y + s.size + GAP <= new.y)
        if not separated or abs(new.cx - s.cx) < MIN_DX:
            return False
    return True


def draw_scene(width: int, height: int, shapes: list[Shape]) -> Image.Image:
    """Render ``shapes`` filled on a white ``width`` x ``height`` RGB canvas."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in shapes:
        rgb = COLORS[s.color]
        x0, y0, x1, y1 = s.x, s.y, s.x + s.size - 1, s.y + s.size - 1
        if s.kind == "circle":
            d.ellipse([x0, y0, x1, y1], fill=rgb, outline=rgb)
        elif s.kind == "square":
            d.rectangle([x0, y0, x1, y1], fill=rgb, outline=rgb)
        elif s.kind == "triangle":  # apex up: top-center, bottom-left, bottom-right
            d.polygon([((x0 + x1) / 2.0, y0), (x0, y1), (x1, y1)], fill=rgb, outline=rgb)
        else:
            raise ValueError(f"unknown shape kind {s.kind!r}; expected one of {SHAPES}")
    return img


def random_scene(rng: np.random.Generator, n_shapes: int | None = None) -> tuple[Image.Image, list[Shape]]:
    """Draw one random scene with ``rng``; return (PIL RGB image, shapes in drawing order).

    The draws (in this order): width, height, number of shapes (unless given), then per
    shape: kind, color, size, x, y. A shape that does not fit after 200 tries restarts
    the whole scene, so the result depends only on the generator's state.
    """
    if n_shapes is not None and not 1 <= n_shapes <= 3:
        raise ValueError(f"n_shapes must be 1, 2 or 3, got {n_shapes}")
    while True:
        width = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        n = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
        placed: list[Shape] = []
        for _ in range(n):
            for _try in range(200):
                kind = SHAPES[int(rng.integers(len(SHAPES)))]
                color = list(COLORS)[int(rng.integers(len(COLORS)))]
                size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
                x = int(rng.integers(MARGIN, width - size - MARGIN + 1))
                y = int(rng.integers(MARGIN, height - size - MARGIN + 1))
                cand = Shape(kind, color, x, y, size)
                if _fits(cand, placed):
                    placed.append(cand)
                    break
            else:
                break  # could not place this shape: redraw the scene
        if len(placed) == n:
            return draw_scene(width, height, placed), placed


# ---------------------------------------------------------------- questions and answers

def count_answer(shapes: list[Shape]) -> str:
    n = len(shapes)
    return "There is 1 shape." if n == 1 else f"There are {n} shapes."


def color_question(kind: str) -> str:
    return f"What color is the {kind}?"


def color_answer(shape: Shape) -> str:
    return f"The {shape.kind} is {shape.color}."


def describe_answer(shapes: list[Shape]) -> str:
    """Shapes left to right by center x: "A red circle, a blue square and a green triangle." """
    parts = [f"{s.color} {s.kind}" for s in sorted(shapes, key=lambda s: s.cx)]
    if len(parts) == 1:
        text = parts[0]
    else:
        text = ", a ".join(parts[:-1]) + " and a " + parts[-1]
    return "A " + text + "."


def qa_pairs(shapes: list[Shape]) -> list[tuple[str, str, str]]:
    """All questions for a scene as (question, exact answer, type), type in
    {"count", "color", "describe"}. A color question is asked for every shape kind
    present exactly once, in SHAPES order."""
    out = [(QUESTION_COUNT, count_answer(shapes), "count")]
    for kind in SHAPES:
        same = [s for s in shapes if s.kind == kind]
        if len(same) == 1:
            out.append((color_question(kind), color_answer(same[0]), "color"))
    out.append((QUESTION_DESCRIBE, describe_answer(shapes), "describe"))
    return out


def messages_for(question: str) -> list[dict]:
    """The chat messages of one question about one image: the image part comes before
    the question (issue 7); the chat template adds the default system prompt."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
