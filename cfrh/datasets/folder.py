"""A user's own collection: a folder of images plus a CSV or JSONL file describing them.

Each row (a CSV line with a header, or a JSON object per line) has ``image`` (a path relative to the
dataset root, or to ``image_dir`` under it) and a text: ``text`` / ``caption`` (free text, BoW over
words) or ``tags`` (space-separated, or a JSON list). An optional ``labels`` field lists label names,
``|``- or ``,``-separated (or a JSON list); they become multi-hot columns in sorted name order.
Rows naming the same item (same ``id`` field, else the same image) are merged: captions joined by
newlines, tags and labels united. Items keep the order of their first row; ids are the ``id``
field when present, else the image path as written.

Options: ``annotations`` (file name; default the one of captions/annotations/metadata.{jsonl,csv}
present, or the only .jsonl/.csv in the root), ``image_field``, ``text_field`` (default: the
first of text, caption, tags present), ``labels_field``, ``id_field``, ``label_sep``, ``image_dir``,
``encoding`` (default UTF-8, a byte-order mark allowed; any codec Python knows, e.g. ``cp1252``).

Text is decoded strictly: a line (a CSV record, a JSONL line) holding a byte that is not valid in the
encoding is dropped and counted (``<file>:<line>``, "text not valid utf-8 (set dataset.encoding)"),
every other line is kept exactly; nothing is re-decoded by guess.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ._common import (FOLDER_ENCODING_FIX, apply_drops, locate_files, read_text_lenient, undecodable,
                      undecodable_reason, with_fingerprint)
from .base import Collection, DatasetError, DropReport, register

log = logging.getLogger(__name__)

DEFAULT_FILES = tuple(f"{stem}.{ext}" for stem in ("captions", "annotations", "metadata") for ext in ("jsonl", "csv"))
TEXT_FIELDS = ("text", "caption", "tags")


def find_annotations(root: Path, name: str | None) -> Path:
    """The annotation file: ``name`` under ``root``, else the first default name present, else the only
    CSV/JSONL in ``root``; none or several raise :class:`DatasetError` with the fix."""
    if name:
        path = root / name
        if not path.is_file():
            raise DatasetError(f"{path}: annotation file not found; fix dataset.annotations")
        return path
    for f in DEFAULT_FILES:
        if (root / f).is_file():
            return root / f
    found = sorted(p for p in root.iterdir() if p.suffix.lower() in (".csv", ".jsonl") and p.is_file())
    if len(found) == 1:
        return found[0]
    raise DatasetError(f"{root}: {'several' if found else 'no'} CSV/JSONL annotation files "
                       f"({', '.join(p.name for p in found) or 'expected e.g. ' + DEFAULT_FILES[0]}); "
                       f"name one with --set dataset.annotations=FILE")


def _rows(path: Path, dropped: DropReport, encoding: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV (with header) or JSONL file; a line that is not a JSON object is
    dropped as "unreadable line", one with bytes that do not decode as "text not valid <encoding>"."""
    text = read_text_lenient(path, encoding)
    bad_text = undecodable_reason(encoding)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames:
            raise DatasetError(f"{path}: empty CSV; the first line must be a header such as image,text,labels")
        if undecodable(*reader.fieldnames):
            raise DatasetError(f"{path}:1: the header is not valid {encoding} text; {FOLDER_ENCODING_FIX}")
        for row in reader:
            if undecodable(*row.values(), *(row.get(None) or ())):  # None: the fields past the header's
                dropped.add(f"{path.name}:{reader.line_num}", bad_text)
                continue
            yield reader.line_num, {k.strip(): v for k, v in row.items() if k}
        return
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if undecodable(line):
            dropped.add(f"{path.name}:{no}", bad_text)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            dropped.add(f"{path.name}:{no}", "unreadable line")
            continue
        yield no, row


def _names(value: Any, sep: str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    value = str(value)
    sep = sep or ("|" if "|" in value else ",")
    return [v.strip() for v in value.split(sep) if v.strip()]


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(str(v).strip() for v in value if str(v).strip())
    return "" if value is None else str(value).strip()


@register("folder")
def read_folder(root: Path, annotations: str | None = None, image_field: str = "image",
                text_field: str | None = None, labels_field: str = "labels", id_field: str = "id",
                label_sep: str | None = None, image_dir: str = "", encoding: str = "utf-8") -> Collection:
    """Read a folder of images described by a CSV or JSONL file (see the module docstring)."""
    root = Path(root)
    path = find_annotations(root, annotations)
    dropped = DropReport()
    items: dict[str, dict[str, Any]] = {}
    field = text_field
    for no, row in _rows(path, dropped, encoding):
        if field is None or not items:
            if image_field not in row:
                raise DatasetError(f"{path}: no {image_field!r} field (found {sorted(row)}); each row needs the "
                                   f"image path (or set dataset.image_field)")
            field = field or next((f for f in TEXT_FIELDS if f in row), None)
            if field not in row:
                raise DatasetError(f"{path}: no {field or 'text'!r} field (found {sorted(row)}); give 'text', "
                                   f"'caption' or 'tags' (or set dataset.text_field)")
        image = _text(row.get(image_field))
        if not image:
            dropped.add(f"{path.name}:{no}", "no image named")
            continue
        key = _text(row.get(id_field)) or image
        item = items.setdefault(key, {"image": image, "texts": [], "labels": []})
        if item["image"] != image:
            dropped.add(f"{path.name}:{no}", "id already used for another image")
            continue
        text = _text(row.get(field))
        if text:
            item["texts"].append(text)
        item["labels"] += _names(row.get(labels_field), label_sep)
    if field is None:
        if dropped:
            raise DatasetError(f"{path}: no usable rows (dropped: {dropped.counts}); fix those lines, or set "
                               f"dataset.encoding if the file is not UTF-8")
        raise DatasetError(f"{path}: no rows; add one line per image (image, text or tags, labels)")

    kind = "tags" if field == "tags" else "captions"
    ids = list(items)
    joiner = " " if kind == "tags" else "\n"
    texts = [joiner.join(dict.fromkeys(items[k]["texts"])) for k in ids]
    has_labels = any(items[k]["labels"] for k in ids)
    rows = apply_drops(ids, dropped, [(np.array([not t for t in texts], dtype=bool), "empty text")])
    prefix = f"{image_dir.strip('/')}/" if image_dir else ""
    found, paths = locate_files(root, [prefix + items[ids[i]]["image"] for i in rows], [ids[i] for i in rows],
                                dropped)
    rows = rows[found]

    labels, label_names = None, []
    if has_labels:
        per_row = [items[ids[i]]["labels"] for i in rows]
        flat = np.array([n for names in per_row for n in names], dtype=str)
        label_names_arr, col = np.unique(flat, return_inverse=True)
        labels = np.zeros((len(rows), len(label_names_arr)), dtype=np.uint8)
        labels[np.repeat(np.arange(len(rows)), [len(x) for x in per_row]), col.ravel()] = 1
        label_names = label_names_arr.tolist()
    kept_ids = [ids[i] for i in rows]
    log.info("folder %s: %d items kept from %s", root, len(kept_ids), path.name)
    collection = Collection(
        name=root.name, root=root, ids=kept_ids, texts=[texts[i] for i in rows],
        image_paths=[p for p in paths if p is not None], labels=labels, label_names=label_names, text_kind=kind,
        dropped=dropped)
    return with_fingerprint(collection, [path], reader="folder", text_field=field, labels_field=labels_field,
                            image_dir=image_dir)
