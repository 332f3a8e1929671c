"""A pipeline for a user's own collection, in one step (``cfrh init DIR``, and the demo's ``--data DIR``).

Copying a packaged pipeline and editing it finds its errors one at a time (model path, text field, split
sizes, batch size). Here they are worked out from the folder itself, cheaply (no image is decoded):

* the reader: the COCO layout (``annotations/captions_*.json``), else images with one captions CSV/JSONL
  (the ``folder`` reader);
* for CSV/JSONL, which column holds the image paths (the one whose values name image files that exist),
  the text (``text``/``caption``/``tags`` by name, else the wordiest remaining column) and the labels
  (``labels``/``label``/``category``/``class``... by name; optional, used only to evaluate);
* the split scaled to the number of items the reader keeps (a tenth as queries, at most 2,000, the rest
  as training set and database) and a batch no larger than the training rows;
* evaluation cut-offs no larger than the database.

The result is a plain pipeline file; nothing is written into the collection's folder.
"""
from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from .datasets._common import IMAGE_SUFFIXES
from .datasets.base import Collection, DatasetError, read_dataset
from .datasets.folder import TEXT_FIELDS, find_annotations

LABEL_FIELDS = ("labels", "label", "categories", "category", "classes", "class")
SAMPLE_ROWS = 200
MAX_QUERIES = 2000


def collection_reader(folder: Path) -> str | None:
    """The reader for a collection in ``folder``: "coco" for the COCO layout (annotations/captions_*.json),
    "folder" for images with one captions CSV/JSONL, else None."""
    if any((folder / "annotations").glob("captions_*.json")):
        return "coco"
    try:
        find_annotations(folder, None)
    except DatasetError:
        return None
    return "folder"


def _sample_rows(path: Path, encoding: str = "utf-8-sig") -> list[dict[str, Any]]:
    """The first rows of a CSV (with header) or JSONL file; undecodable or malformed lines are skipped here
    (the reader counts them properly)."""
    text = path.read_bytes()[:2 ** 20].decode(encoding, errors="replace")
    if path.suffix.lower() == ".csv":
        return [dict(r) for r, _ in zip(csv.DictReader(io.StringIO(text)), range(SAMPLE_ROWS))]
    rows = []
    for line in text.splitlines()[:SAMPLE_ROWS]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _as_text(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else ("" if value is None else str(value))


def detect_columns(folder: Path) -> dict[str, Any]:
    """The folder reader's options for the annotation file in ``folder`` (see the module docstring)."""
    path = find_annotations(folder, None)
    rows = _sample_rows(path)
    if not rows:
        raise DatasetError(f"{path}: no readable rows; one line per image with its path and text is expected")
    fields = list(dict.fromkeys(k for r in rows for k in r))

    def share(field: str, test: Any) -> float:
        return sum(bool(test(r.get(field))) for r in rows) / len(rows)

    def names_image(value: Any) -> bool:
        v = _as_text(value).strip()
        return Path(v).suffix.lower() in IMAGE_SUFFIXES and (folder / v).is_file()

    image = max(fields, key=lambda f: share(f, names_image))
    if share(image, names_image) < 0.5:
        raise DatasetError(f"{path}: no column names image files under {folder} (columns {fields}); add one with "
                           f"paths relative to the folder, e.g. images/0001.jpg")
    rest = [f for f in fields if f != image]
    text = next((f for f in TEXT_FIELDS if f in rest), None)
    if text is None:
        wordy = [f for f in rest if f.lower() not in LABEL_FIELDS and f != "id"]
        if not wordy:
            raise DatasetError(f"{path}: no text column besides the images (columns {fields})")
        text = max(wordy, key=lambda f: sum(len(_as_text(r.get(f)).split()) for r in rows))
    labels = next((f for f in rest if f.lower() in LABEL_FIELDS), None)
    options: dict[str, Any] = {"annotations": path.name, "image_field": image, "text_field": text}
    if labels is not None:
        options["labels_field"] = labels
    if "id" in rest:
        options["id_field"] = "id"
    return options


def split_for(n: int) -> dict[str, Any]:
    """A tenth of the items as queries (at least 1, at most 2,000), the rest the training set and database."""
    if n < 3:
        raise DatasetError(f"{n} usable items; a retrieval split needs at least 3")
    return {"method": "random", "query": max(1, min(MAX_QUERIES, n // 10)), "train": "all", "database": "rest",
            "seed": 0}


def _cut_offs(values: list[int], n_database: int) -> list[int]:
    """Evaluation cut-offs no larger than the database."""
    return sorted({min(int(k), n_database) for k in values})


def collection_tables(folder: Path, features: dict[str, Any], train: dict[str, Any] | None = None,
                      evaluate: dict[str, Any] | None = None) -> tuple[dict[str, dict[str, Any]], Collection]:
    """The pipeline tables for the collection in ``folder`` (read, not embedded) and the collection read."""
    folder = Path(folder).resolve()
    reader = collection_reader(folder) if folder.is_dir() else None
    if reader is None:
        raise DatasetError(f"{folder}: no collection cfrh can read here; expected images with one captions CSV/JSONL "
                           f"(columns: image path, text or tags, optional labels) or the COCO layout "
                           f"(annotations/captions_*.json)")
    dataset: dict[str, Any] = {"reader": reader, "root": str(folder)}
    if reader == "folder":
        dataset.update(detect_columns(folder))
    collection = read_dataset(reader, folder, **{k: v for k, v in dataset.items() if k not in ("reader", "root")})
    split = split_for(len(collection))
    n_rest = len(collection) - split["query"]
    train = dict(train or {})
    train["batch_size"] = min(int(train.get("batch_size", 128)), max(2, n_rest))
    evaluate = dict(evaluate or {})
    for key, default in (("map_k", [50]), ("precision_k", [100, 1000])):
        evaluate[key] = _cut_offs(evaluate.get(key, default), n_rest)
    return ({"dataset": dataset, "features": dict(features), "split": split, "train": train, "evaluate": evaluate},
            collection)


def pipeline_text(tables: dict[str, dict[str, Any]], name: str, header: str = "") -> str:
    """A pipeline file's text from plain values (strings, numbers, booleans, lists of them)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else repr(v)

    lines = [f"# {line}" for line in header.splitlines()] + [f"name = {value(name)}"]
    for table, entries in tables.items():
        if entries:
            lines += ["", f"[{table}]"] + [f"{k} = {value(v)}" for k, v in entries.items()]
    return "\n".join(lines) + "\n"


def pipeline_name(folder: Path) -> str:
    """A pipeline (and cache folder) name from a folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(folder).resolve().name).strip("-.") or "collection"
