"""WebDataset shards, as img2dataset writes them: ``NNNNN.tar`` files in a folder or at any fsspec URL, each
holding samples as members that share a key — ``{key}.jpg|jpeg|png|webp`` (the image), ``{key}.txt`` (the
caption), ``{key}.json`` (metadata; an optional labels field).

One pass over each shard's member headers (plus the small caption and metadata members) indexes the
samples; images stay in the shards, referenced by their byte range (:class:`cfrh.features.image.ImageMember`)
and read in place by the decoders, so nothing is unpacked and a block of consecutive samples is one ranged
read. Ids are the sample keys, in shard order. A sample without an image, without a caption (or with an
empty one, or one that is not UTF-8), or with metadata that is not JSON is a counted drop, as is a shard the
pattern names that does not exist; an image that does not decode is a counted drop at extraction.

Options: ``shards`` (a brace pattern such as ``"{00000..00127}.tar"``, a list of names or patterns, relative
to the root; default every ``*.tar`` in it), ``labels_field`` (default ``labels``: a JSON list of names, or
``a|b`` / ``a,b``), ``label_sep``. The ``webdataset`` package is not needed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np

from ..features.image import ImageMember
from ..locations import join
from ._common import ids_digest
from .base import Collection, DatasetError, DropReport, register
from .folder import _names

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
_BRACES = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: ``{00000..00002}`` counts (zero-padded to the first
    number's width), ``{a,b}`` lists; several braces multiply."""
    m = _BRACES.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        first, last = span.groups()
        if int(last) < int(first):
            raise DatasetError(f"shards pattern {pattern!r}: the range {body} runs backwards")
        items = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        items = body.split(",")
    return [name for item in items for name in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) by the WebDataset rule: the key is the name up to the first '.' of its last part."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def _shard_urls(root: str, shards: str | list[str] | None, dropped: DropReport) -> list[tuple[str, str, int]]:
    """(name, url, size) of each shard that exists; a shard the pattern names that does not is a drop."""
    fs, base = fsspec.core.url_to_fs(root)
    if shards is None:
        found = sorted(fs.glob(join(base, "*.tar")))
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in found]
    else:
        patterns = [shards] if isinstance(shards, str) else list(shards)
        names = [n for pattern in patterns for n in expand_braces(pattern)]
    out = []
    for name in names:
        try:
            size = int(fs.info(join(base, name))["size"])
        except FileNotFoundError:
            dropped.add(name, "missing shard")
            continue
        out.append((name, join(root, name), size))
    if not out:
        raise DatasetError(f"{root}: no shards found ({'pattern ' + repr(shards) if shards else 'no *.tar files'}); "
                           f"point [dataset] root at the shards' folder or URL, or set dataset.shards")
    return out


def _members(url: str) -> Iterator[tuple[str, str, tarfile.TarInfo, bytes | None]]:
    """(key, extension, header, data for captions and metadata) of each file in a shard, read header by header
    (image data is skipped by seeking, never read here)."""
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = _split_name(info.name)
            data = None
            if ext in ("txt", "json"):
                member = tar.extractfile(info)
                data = member.read() if member is not None else b""
            yield key, ext, info, data


def _samples(name: str, url: str, dropped: DropReport) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {ext: header or data}) of each sample of one shard, in the order its keys first appear. A shard
    that breaks off (truncated, not a tar) keeps the samples before the break; the break is a drop."""
    samples: dict[str, dict[str, Any]] = {}
    try:
        for key, ext, info, data in _members(url):
            samples.setdefault(key, {})[ext] = data if data is not None else info
    except (tarfile.TarError, OSError, EOFError) as e:
        dropped.add(name, f"shard unreadable after {len(samples)} samples ({type(e).__name__})")
    yield from samples.items()


def _caption(data: bytes | None) -> str | None:
    if data is None:
        return None
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None


@register("webdataset")
def read_webdataset(root: str | Path, shards: str | list[str] | None = None, labels_field: str = "labels",
                    label_sep: str | None = None) -> Collection:
    """Read WebDataset / img2dataset shards under ``root`` (a folder or fsspec URL; the module docstring)."""
    root = str(root).rstrip("/")
    dropped = DropReport()
    ids: list[str] = []
    texts: list[str] = []
    images: list[ImageMember] = []
    labels: list[list[str]] = []
    seen: dict[str, str] = {}
    shard_list = _shard_urls(root, shards, dropped)
    for name, url, _ in shard_list:
        for key, parts in _samples(name, url, dropped):
            image_ext = next((e for e in IMAGE_EXTENSIONS if isinstance(parts.get(e), tarfile.TarInfo)), None)
            caption = _caption(parts.get("txt"))
            item = f"{name}/{key}"
            if key in seen:
                dropped.add(item, f"duplicate key (first in {seen[key]})")
                continue
            if image_ext is None:
                dropped.add(item, "no image in the sample")
                continue
            if "txt" not in parts or caption == "":
                dropped.add(item, "no caption")
                continue
            if caption is None:
                dropped.add(item, "caption not valid UTF-8")
                continue
            try:
                meta = json.loads(parts["json"]) if "json" in parts else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                dropped.add(item, "metadata not valid JSON")
                continue
            info = parts[image_ext]
            seen[key] = name
            ids.append(key)
            texts.append(caption)
            images.append(ImageMember(url, info.name, int(info.offset_data), int(info.size)))
            labels.append(_names(meta.get(labels_field) if isinstance(meta, dict) else None, label_sep))
    label_matrix, label_names = _label_matrix(labels)
    log.info("webdataset %s: %d samples kept from %d shards", root, len(ids), len(shard_list))
    collection = Collection(name=root.rsplit("/", 1)[-1], root=root, ids=ids, texts=texts,  # type: ignore[arg-type]
                            image_paths=images, labels=label_matrix, label_names=label_names,  # type: ignore[arg-type]
                            text_kind="captions", dropped=dropped)
    collection.fingerprint_extra = _fingerprint(collection, shard_list, shards, labels_field)
    return collection


read_webdataset.reads_urls = True  # type: ignore[attr-defined]  # root may be an fsspec URL


def _label_matrix(per_item: list[list[str]]) -> tuple[np.ndarray | None, list[str]]:
    """Multi-hot labels in sorted name order (None when no sample has any)."""
    if not any(per_item):
        return None, []
    names, col = np.unique(np.array([n for names in per_item for n in names], dtype=str), return_inverse=True)
    out = np.zeros((len(per_item), len(names)), dtype=np.uint8)
    out[np.repeat(np.arange(len(per_item)), [len(x) for x in per_item]), col.ravel()] = 1
    return out, names.tolist()


def _fingerprint(c: Collection, shards: list[tuple[str, str, int]], pattern: Any, labels_field: str) -> dict:
    """What identifies the shards' contents for the cache manifest: shard names and sizes, the options, and
    digests of the ids, captions and labels kept (no image is read for it)."""
    h = hashlib.sha256("".join(f"{name}|{size}\n" for name, _, size in shards).encode())
    out = {"shards": len(shards), "shards_fingerprint": h.hexdigest()[:16],
           "options": {"shards": pattern, "labels_field": labels_field},
           "n_items": len(c), "ids": ids_digest(c.ids), "texts": ids_digest(c.texts)}
    if c.labels is not None:
        out["labels"] = hashlib.sha256(str(c.labels.shape).encode() + c.labels.tobytes()).hexdigest()[:16]
    return out
