"""Synthetic vision tasks that need both local detail and long-range context, generated from a seed.

* ``pathfinder``: are the two marked dots joined by one dashed path? (distractor paths,
  crossings allowed) — after Linsley et al. 2018 and the Long Range Arena.
* ``match``: do two small glyphs (one of four) far apart on the image match?
* ``cue-seg``: segment a shape whose class (1 or 2) is given by a cue in the far corner;
  background is class 0. Scored by mIoU over the three classes.

Each generator returns ``(images (N, 1, S, S) float32, labels)`` and is deterministic in
its seed; labels are balanced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Task", "TASKS", "pathfinder", "match", "cue_segmentation"]


def _stamp(img, y, x, r, value):
    s = img.shape[-1]
    img[max(0, y - r) : min(s, y + r + 1), max(0, x - r) : min(s, x + r + 1)] = value


def _path(gen, size, length, dash=(3, 1)):
    """A smooth random walk: (list of integer points, drawn-points mask of dashes), kept inside the image."""
    margin = 3
    y = torch.randint(margin, size - margin, (), generator=gen).item() + 0.5
    x = torch.randint(margin, size - margin, (), generator=gen).item() + 0.5
    angle = torch.rand((), generator=gen).item() * 2 * math.pi
    points = []
    for _ in range(length):
        angle += (torch.rand((), generator=gen).item() - 0.5) * 0.8
        ny, nx = y + math.sin(angle), x + math.cos(angle)
        if not (margin <= ny < size - margin and margin <= nx < size - margin):
            angle += math.pi / 2 + torch.rand((), generator=gen).item() * math.pi
            continue
        y, x = ny, nx
        points.append((int(y), int(x)))
    on, off = dash
    drawn = [p for i, p in enumerate(points) if i % (on + off) < on]
    return points, drawn


def pathfinder(count: int, size: int = 32, seed: int = 0, paths: int = 2, length: int = None):
    """Connectivity: label 1 when both dots sit on the two ends of the same dashed path."""
    gen = torch.Generator().manual_seed(seed)
    length = length or int(1.4 * size)
    images = torch.zeros(count, 1, size, size)
    labels = torch.arange(count) % 2
    labels = labels[torch.randperm(count, generator=gen)]
    for i in range(count):
        curves = []
        while len(curves) < paths:
            pts, drawn = _path(gen, size, length)
            if len(pts) > length // 2 and abs(pts[0][0] - pts[-1][0]) + abs(pts[0][1] - pts[-1][1]) > size // 3:
                curves.append((pts, drawn))
        img = images[i, 0]
        for _, drawn in curves:
            for y, x in drawn:
                img[y, x] = 0.6
        first = curves[0][0]
        end = first[-1] if labels[i] else curves[1][0][-1]
        for y, x in (first[0], end):
            _stamp(img, y, x, 1, 1.0)
    return images, labels


#: the four 3×3 glyphs of ``match``: a plus, a ring, a diagonal, four corners
GLYPHS = torch.tensor([
    [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
    [[1, 1, 1], [1, 0, 1], [1, 1, 1]],
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    [[1, 0, 1], [0, 0, 0], [1, 0, 1]],
], dtype=torch.float32)


def match(count: int, size: int = 32, seed: int = 0, scale: int = 1):
    """Long-range comparison: label 1 when the glyph in the left third equals the glyph in the right third.

    ``scale`` draws each glyph pixel as a ``scale × scale`` square at coordinates that are multiples of ``scale``
    (glyphs aligned with a stride-``scale`` stem).
    """
    gen = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(count, 1, size, size, generator=gen)
    labels = (torch.arange(count) % 2)[torch.randperm(count, generator=gen)]
    glyphs = GLYPHS.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    third, g = size // 3, glyphs.shape[-1]
    first_b = -(-(size - third) // scale)  # the first multiple of scale in the right third
    for i in range(count):
        a = torch.randint(0, len(GLYPHS), (), generator=gen).item()
        b = a if labels[i] else (a + torch.randint(1, len(GLYPHS), (), generator=gen).item()) % len(GLYPHS)
        ya, yb = (torch.randint(0, (size - g) // scale + 1, (2,), generator=gen) * scale).tolist()
        xa = torch.randint(0, (third - g) // scale + 1, (), generator=gen).item() * scale
        xb = (first_b + torch.randint(0, (size - g) // scale - first_b + 1, (), generator=gen).item()) * scale
        images[i, 0, ya : ya + g, xa : xa + g] = 0.2 + 0.8 * glyphs[a]
        images[i, 0, yb : yb + g, xb : xb + g] = 0.2 + 0.8 * glyphs[b]
    return images, labels


def cue_segmentation(count: int, size: int = 32, seed: int = 0):
    """Dense: pixels of the shape get class 1 or 2 by the cue in the opposite corner; background 0."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 1, size, size)
    masks = torch.zeros(count, size, size, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cls = (torch.arange(count) % 2)[torch.randperm(count, generator=gen)] + 1
    half = size // 2
    for i in range(count):
        r = torch.randint(size // 8, size // 5 + 1, (), generator=gen).item()
        cy, cx = (torch.randint(r, half - 1, (2,), generator=gen) + torch.randint(0, 2, (2,), generator=gen) * half).tolist()
        cy, cx = min(cy, size - r - 1), min(cx, size - r - 1)
        if torch.rand((), generator=gen).item() < 0.5:
            shape = (yy - cy).abs().maximum((xx - cx).abs()) <= r
        else:
            shape = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        images[i, 0][shape] = 0.5
        masks[i][shape] = cls[i]
        # the cue: a 4×4 checker (class 1) or a solid square (class 2) in the corner farthest from the shape
        qy, qx = (0 if cy >= half else size - 4), (0 if cx >= half else size - 4)
        cue = torch.ones(4, 4) if cls[i] == 2 else ((torch.arange(4)[:, None] + torch.arange(4)) % 2).float()
        images[i, 0, qy : qy + 4, qx : qx + 4] = cue
    return images, masks


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classify" or "segment"
    num_classes: int
    make: object
    description: str


TASKS = {
    "pathfinder": Task("pathfinder", "classify", 2, pathfinder, "are the two dots joined by one dashed path?"),
    "match": Task("match", "classify", 2, match, "do two glyphs a third of the image apart match?"),
    "cue-seg": Task("cue-seg", "segment", 3, cue_segmentation, "segment a shape; its class is a cue in the far corner"),
}
