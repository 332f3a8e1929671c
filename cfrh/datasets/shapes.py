"""The demo's own image–text collection: rendered scenes of coloured shapes with tags, a caption and labels.

``generate_shapes(out_dir)`` writes, in the "folder" reader's format::

    out_dir/images/00000.jpg …        n scenes of 1–3 shapes (circle, square, triangle, star) in five
                                      colours on a white, grey or black background
    out_dir/captions.jsonl            {"id", "image", "tags", "text", "labels"} per scene, e.g.
                                      tags "red circle blue square", text "a red circle next to a blue
                                      square on a grey background", labels ["blue square", "red circle"]
    out_dir/shapes.json               the generation settings (a rerun with the same ones is a no-op)
    out_dir/.cfrh-demo                the marker: this folder was made by the demo and may be re-rendered

The demo never writes into a user's files: it renders only into a folder that is new, empty, or
carries its marker (written first, so an interrupted render is still recognised); any other folder
is refused with :class:`NotDemoFolder`. (A folder rendered before the marker existed is recognised
by its ``shapes.json`` and gets the marker on its next render.)

Scene i depends only on (seed, i), so the first k scenes are the same for every n ≥ k. Shapes are
listed left to right. Labels are the coloured shapes present ("red circle", 20 possible), so two
scenes are relevant to each other when both hold the same coloured shape: about one pair in five,
which leaves room between chance and a good ranking (with shapes and colours as separate labels,
four pairs in five share one and every method scores near chance).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .base import DatasetError

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (215, 38, 45), "green": (46, 160, 67), "blue": (40, 90, 220), "yellow": (240, 200, 30),
           "purple": (135, 60, 175)}
BACKGROUNDS = {"white": (243, 243, 240), "grey": (128, 128, 128), "black": (24, 24, 28)}
FORMAT = 2  # 2: labels are coloured shapes
ANNOTATIONS = "captions.jsonl"
MARKER = ".cfrh-demo"
_SETTINGS_KEYS = {"format", "n", "seed", "size"}
_IMAGE_NAME = re.compile(r"^\d{5,}\.jpg$")
_SUPERSAMPLE = 3


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if shape == "triangle":
        return [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
                for k in range(3)]
    points = []  # star: five outer points, five inner ones between them
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        a = angle - math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def _scene(seed: int, index: int, size: int) -> tuple[Image.Image, list[tuple[str, str]], str]:
    """One scene: the image, its (colour, shape) pairs left to right, and the background name."""
    rng = np.random.default_rng([seed, index])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    k = int(rng.integers(1, 4))
    cells = np.sort(rng.choice(4, size=k, replace=False))  # a 2 × 2 grid keeps shapes apart
    big = size * _SUPERSAMPLE
    cell = big / 2
    canvas = Image.new("RGB", (big, big), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    objects = []
    for c in cells.tolist():
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        r = cell * rng.uniform(0.28, 0.42)
        cx = (c % 2 + 0.5) * cell + rng.uniform(-0.5, 0.5) * (cell / 2 - r)
        cy = (c // 2 + 0.5) * cell + rng.uniform(-0.5, 0.5) * (cell / 2 - r)
        angle = rng.uniform(0, 2 * math.pi)
        if shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[colour])
        else:
            draw.polygon(_polygon(shape, cx, cy, r, angle), fill=COLOURS[colour])
        objects.append((c % 2, c // 2, colour, shape))
    objects.sort(key=lambda o: (o[0], o[1]))  # left column first, top to bottom
    image = canvas.resize((size, size), Image.LANCZOS)
    return image, [(colour, shape) for _, _, colour, shape in objects], background


def describe(objects: list[tuple[str, str]], background: str) -> tuple[str, str, list[str]]:
    """(tags, caption, labels) of a scene."""
    phrases = [f"a {colour} {shape}" for colour, shape in objects]
    if len(phrases) == 1:
        body = phrases[0]
    elif len(phrases) == 2:
        body = f"{phrases[0]} next to {phrases[1]}"
    else:
        body = f"{', '.join(phrases[:-1])} and {phrases[-1]}"
    tags = " ".join(f"{colour} {shape}" for colour, shape in objects)
    labels = sorted({f"{colour} {shape}" for colour, shape in objects})
    return tags, f"{body} on a {background} background", labels


class NotDemoFolder(DatasetError):
    """A folder that holds files the demo did not make: it is never written into."""


def _settings(out: Path) -> dict | None:
    try:
        settings = json.loads((out / "shapes.json").read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def is_demo_folder(folder: str | os.PathLike) -> bool:
    """True when the demo made ``folder``: it carries the marker, or (rendered before the marker existed)
    a ``shapes.json`` holding exactly the generation settings."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    settings = _settings(folder)
    return settings is not None and set(settings) == _SETTINGS_KEYS


def claim_folder(folder: str | os.PathLike) -> Path:
    """Make ``folder`` the demo's (created, or found empty, and then marked), or find it already the demo's;
    a folder holding anything else raises :class:`NotDemoFolder`. The marker goes in before any scene."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise NotDemoFolder(f"{out}: a file, not a folder; give --data a new or empty folder for the demo scenes")
    if out.is_dir() and not is_demo_folder(out) and any(out.iterdir()):
        raise NotDemoFolder(f"{out}: holds files the demo did not make (no {MARKER} marker), and the demo never "
                            f"writes into them; give --data a new or empty folder for the demo scenes")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        (out / MARKER).write_text("made by `cfrh demo`: it may re-render this folder\n")
    return out


def generate_shapes(out_dir: str | os.PathLike, n: int = 600, seed: int = 0, size: int = 96) -> Path:
    """Render the demo collection into ``out_dir`` (see the module docstring) and return ``out_dir``.

    Deterministic for (n, seed, size); when ``out_dir`` already holds exactly that generation it is
    left as it is, so rerunning the demo keeps the dataset fingerprint and the feature cache valid.
    A folder the demo did not make raises :class:`NotDemoFolder` before anything is written.
    """
    if n < 1 or size < 16:
        raise ValueError(f"generate_shapes needs n >= 1 and size >= 16 (got n={n}, size={size})")
    out = claim_folder(out_dir)
    images = out / "images"
    settings = {"format": FORMAT, "n": int(n), "seed": int(seed), "size": int(size)}
    settings_file = out / "shapes.json"
    names = [f"{i:05d}.jpg" for i in range(n)]
    if (_settings(out) == settings and (out / ANNOTATIONS).is_file()
            and images.is_dir() and set(names) <= {p.name for p in images.iterdir()}):
        return out
    images.mkdir(parents=True, exist_ok=True)
    settings_file.unlink(missing_ok=True)
    rows = []
    for i, name in enumerate(names):
        image, objects, background = _scene(seed, i, size)
        image.save(images / name, quality=92)
        tags, caption, labels = describe(objects, background)
        rows.append(json.dumps({"id": f"shapes-{i:05d}", "image": f"images/{name}", "tags": tags, "text": caption,
                                "labels": labels}))
    keep = set(names)
    for stale in images.iterdir():
        if _IMAGE_NAME.match(stale.name) and stale.name not in keep:
            stale.unlink()
    tmp = out / (ANNOTATIONS + ".partial")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, out / ANNOTATIONS)
    settings_file.write_text(json.dumps(settings))
    return out
