"""The search service behind ``cfrh serve``: everything a request needs, loaded once.

Loading a run's model, reading its codes and building a :class:`~cfrh.index.HammingIndex` per modality
take seconds; a search over them takes milliseconds. A :class:`SearchService` does the first once, at
start, and keeps in memory what every answer describes (ids, texts, label names, image paths), so a
request never reads the cache: cache reads check block digests, which is right for a stage and far too
slow per query. It knows no web framework: :mod:`cfrh.serve.app` puts it behind HTTP, and tests and
benchmarks call it directly.

Safety: only item ids come from outside. An id is looked up in the cache's id table; the file read for
its thumbnail is that item's stored relative path under the dataset root, refused if it resolves
outside the root. Uploaded images are written to a private temporary file only to be hashed.

Threads: every method may run in several threads at once (the app runs them in a thread pool). The
model is loaded once and only read; lazy state (the index's blocked layout, numba's compiled kernel,
the image tower) is built by :meth:`SearchService.warm_up` before the first request.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ..cache import FeatureCache, open_pipeline_cache
from ..config import Pipeline
from ..encode import CodeEncoder, is_precomputed
from ..errors import CfrhError
from ..index import HammingIndex
from ..runs import RunStore, open_run
from ..search import database_index

MODALITIES = ("image", "text")
MAX_K = 1000
MAX_TEXT_CHARS = 2000
DEFAULT_MAX_UPLOAD = 10 * 2**20
THUMB_EDGE = 256  # px: the page shows ~180 px cards; twice that would double the bytes for no visible gain
THUMB_CACHE_BYTES = 64 * 2**20  # ~5,000 thumbnails of ~12 KB
# Threads per index search. A request searches one code, a single tile of the exact kernel, so a second
# thread has nothing to do but must still join: on a busy machine waiting for it cost 30x (1M codes: 8 ms
# against 0.23 ms). Requests run side by side instead, one thread each.
SEARCH_THREADS = 1


class ServeError(CfrhError):
    """A request the service cannot answer; ``status`` is the HTTP status the app answers with."""

    status = 400


class UnknownItem(ServeError):
    status = 404


class NoImage(ServeError):
    status = 404


class NotAnImage(ServeError):
    status = 415


class TooLarge(ServeError):
    status = 413


def other(modality: str) -> str:
    return "text" if modality == "image" else "image"


def parse_k(value: Any, default: int = 10) -> int:
    """The ``k`` of a request: an integer from 1 to :data:`MAX_K` (the default when absent)."""
    if value is None or value == "":
        return default
    try:
        k = int(str(value))
    except ValueError:
        k = 0
    if not 1 <= k <= MAX_K:
        raise ServeError(f"k must be an integer from 1 to {MAX_K}, got {str(value)[:20]!r}")
    return k


def images_root(cache: FeatureCache, pipeline: Pipeline | None = None, given: str | os.PathLike | None = None
                ) -> Path | None:
    """The folder the cache's image paths are relative to: ``given``, else the folder the cache was
    extracted from (``found.dataset.root``: exactly the images behind the features), else the pipeline's
    ``dataset.root`` (a local copy of a shared cache's dataset); None when none of them is a folder here."""
    found = cache.manifest.get("found", {}).get("dataset", {}).get("root")
    configured = pipeline.resolve_path(pipeline.dataset["root"]) if pipeline and pipeline.dataset.get("root") \
        else None
    for candidate in (given, found, configured):
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    return None


def make_thumbnail(path: Path, edge: int = THUMB_EDGE) -> bytes:
    """A JPEG no larger than ``edge`` px on its long side, upright (EXIF), transparency on white."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.draft("RGB", (edge, edge))  # JPEG: decode at a reduced scale, far fewer pixels
        im = ImageOps.exif_transpose(im)
        im.thumbnail((edge, edge))
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            flat = Image.new("RGB", im.size, (255, 255, 255))
            flat.paste(im, mask=im.getchannel("A"))
            im = flat
        buf = io.BytesIO()
        im.convert("RGB").save(buf, "JPEG", quality=82, optimize=True)
    return buf.getvalue()


class ByteLRU:
    """A thread-safe least-recently-used map of bytes, bounded by their total size."""

    def __init__(self, budget: int):
        self.budget, self.size = int(budget), 0
        self._items: OrderedDict[Any, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: Any, data: bytes) -> None:
        with self._lock:
            if key in self._items or len(data) > self.budget:
                return
            self._items[key] = data
            self.size += len(data)
            while self.size > self.budget:
                self.size -= len(self._items.popitem(last=False)[1])


def _search_guard() -> contextlib.AbstractContextManager:
    """A lock for the index search when numba's threading layer cannot run kernels from several threads at
    once (``workqueue``: it aborts the process); none for ``omp`` and ``tbb``, which can."""
    import numba

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: assume the worst
        layer = "workqueue"
    return threading.Lock() if layer == "workqueue" else contextlib.nullcontext()


class SearchService:
    """A trained run's codes, indexes and model plus the cache's item descriptions, ready to answer.

    ``indexes`` replaces the database index of a modality (benchmarks: a synthetic million codes whose
    ids are cache rows; give it ``threads=SEARCH_THREADS``); by default each is the run's codes of the
    cache's database split."""

    def __init__(self, cache: FeatureCache, store: RunStore, bits: int, *, images: Path | None = None,
                 image_model: str | None = None, device: str = "auto",
                 indexes: dict[str, HammingIndex] | None = None, max_upload: int = DEFAULT_MAX_UPLOAD):
        self.cache, self.store, self.bits = cache, store, int(bits)
        self.images, self.max_upload = images, int(max_upload)
        n = cache.n_items
        self.ids = [str(x) for x in cache.read("ids").tolist()]
        self.row_of = {item: row for row, item in enumerate(self.ids)}
        self.texts = cache.strings("texts") or [""] * n
        self.paths = cache.strings("paths") if cache.has("paths") else []
        self.label_names = cache.strings("label_names")
        self.labels = cache.read("labels") if cache.has("labels") else None
        self.database = cache.split("database")
        self.codes = {m: store.read_codes(self.bits, m, n) for m in MODALITIES}
        given = indexes or {}
        self.indexes = {m: given[m] if m in given else
                        database_index(cache, store, self.bits, m, threads=SEARCH_THREADS) for m in MODALITIES}
        self.encodable = {m: not is_precomputed(cache, m) for m in MODALITIES}
        self.unavailable: dict[str, str] = {}  # modality → why its new inputs cannot be hashed here
        self.encoder = CodeEncoder(cache, store, self.bits, image_model=image_model, device=device) \
            if any(self.encodable.values()) else None
        self.thumbnails = ByteLRU(THUMB_CACHE_BYTES)
        self._guard: contextlib.AbstractContextManager = threading.Lock()

    @classmethod
    def open(cls, pipeline: Pipeline, cache_root: str | None = None, runs_root: str | None = None,
             run: str = "cfrh", bits: int = 64, *, model: str | None = None, images: str | None = None,
             **kwargs: Any) -> "SearchService":
        """The service for a pipeline's cache and one of its runs (errors: the stages' one-line ones)."""
        cache = open_pipeline_cache(pipeline, cache_root, model=model)
        store = open_run(runs_root, cache, run)
        return cls(cache, store, bits, images=images_root(cache, pipeline, images), **kwargs)

    def warm_up(self) -> None:
        """Build what the first request would otherwise build, possibly in several threads at once: each
        index's search layout and compiled kernel, the text vectoriser and the image tower. An image tower
        that cannot be loaded turns image queries off (``unavailable`` says why) rather than the service."""
        for m in MODALITIES:
            self.indexes[m].search(self.codes[m][:1], 1)
        self._guard = _search_guard()
        if self.encodable["text"]:
            self.encoder.encode_texts(["warm up"])
        if self.encodable["image"]:
            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (128, 128, 128)).save(buf, "PNG")
            try:
                self.search_image(buf.getvalue(), k=1)
            except CfrhError as e:  # e.g. a shared cache's CLIP checkpoint is not on this machine
                self.encodable["image"] = False
                self.unavailable["image"] = str(e).splitlines()[0]

    # -- describing items ---------------------------------------------------------------------
    @property
    def has_images(self) -> bool:
        return self.images is not None and any(self.paths[:1])

    def row(self, item_id: str) -> int:
        row = self.row_of.get(str(item_id))
        if row is None:
            raise UnknownItem(f"no item with id {str(item_id)[:80]!r} in this collection")
        return row

    def labels_of(self, row: int) -> list[str]:
        if self.labels is None:
            return []
        return [self.label_names[j] if j < len(self.label_names) else str(j)
                for j in np.flatnonzero(self.labels[row]).tolist()]

    def image_url(self, row: int) -> str | None:
        return "/images/" + quote(self.ids[row], safe="") if self.has_images and self.paths[row] else None

    def describe(self, row: int) -> dict[str, Any]:
        return {"id": self.ids[row], "text": self.texts[row], "labels": self.labels_of(row),
                "image_url": self.image_url(row)}

    def item(self, item_id: str) -> dict[str, Any]:
        """An item's id, text, label names and thumbnail url, and whether it is in the searched database."""
        row = self.row(item_id)
        return {**self.describe(row), "database": bool(np.isin(row, self.database))}

    def info(self) -> dict[str, Any]:
        """What the page needs to know before its first search."""
        queries = self.cache.split("query")
        return {"pipeline": self.cache.dataset, "run": self.store.name, "bits": self.bits,
                "items": len(self.ids), "database": int(len(self.indexes["image"])),
                "queries": dict(self.encodable), "images": self.has_images, "labels": self.labels is not None,
                "warnings": self.cache.warnings(), "examples": [self.ids[r] for r in queries[:8].tolist()],
                "max_k": MAX_K, "max_upload_bytes": self.max_upload}

    # -- searching ----------------------------------------------------------------------------
    def _search(self, code: np.ndarray, target: str, k: int, skip: int | None = None) -> list[dict[str, Any]]:
        """The k nearest database items of ``target`` for one packed code (``skip``: a row left out)."""
        with self._guard:
            dist, rows = self.indexes[target].search(code, k + (skip is not None))
        hits = [(d, r) for d, r in zip(dist[0].tolist(), rows[0].tolist()) if r >= 0 and r != skip][:k]
        return [{"rank": rank, "distance": d, **self.describe(r)} for rank, (d, r) in enumerate(hits, 1)]

    def _answer(self, query: dict[str, Any], code: np.ndarray, target: str, k: int) -> dict[str, Any]:
        return {"query": {**query, "code": code[0].tobytes().hex(), "bits": self.bits}, "target": target,
                "results": self._search(code, target, k)}

    def _require_encodable(self, modality: str) -> CodeEncoder:
        if modality in self.unavailable:
            raise ServeError(f"new {modality}s cannot be hashed here: {self.unavailable[modality]}")
        if not self.encodable[modality] or self.encoder is None:
            raise ServeError(f"this collection's {modality} features were shipped precomputed with the dataset, "
                             f"so a new {modality} cannot be hashed; search with an item's id instead")
        return self.encoder

    def search_text(self, text: str, k: int = 10) -> dict[str, Any]:
        """A text → the nearest images."""
        text = str(text).strip()
        if not text:
            raise ServeError("empty text: type a few words to search the images with")
        if len(text) > MAX_TEXT_CHARS:
            raise ServeError(f"text of {len(text):,} characters; give at most {MAX_TEXT_CHARS:,}")
        encoded = self._require_encodable("text").encode_texts([text])
        if encoded.empty:
            raise ServeError(f"no word of {text[:80]!r} is in this collection's vocabulary, so the query says "
                             f"nothing; try other words")
        return self._answer({"text": text}, encoded.codes, "image", k)

    def search_image(self, data: bytes, k: int = 10, name: str = "upload") -> dict[str, Any]:
        """An image file's bytes → the nearest texts."""
        encoder = self._require_encodable("image")
        if not data:
            raise ServeError(f"{name}: empty upload; choose an image file")
        if len(data) > self.max_upload:
            raise TooLarge(f"{name}: {len(data):,} bytes; uploads are limited to {self.max_upload:,} bytes")
        _check_image(data, name)
        fd, path = tempfile.mkstemp(prefix="cfrh-serve-", suffix=".img")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            encoded = encoder.encode_images([path])
        finally:
            os.unlink(path)
        if encoded.skipped:
            raise NotAnImage(f"{name}: {encoded.skipped[0][1]}")
        return self._answer({"image": name}, encoded.codes, "text", k)

    def search_item(self, item_id: str, modality: str = "image", k: int = 10) -> dict[str, Any]:
        """A stored item's ``modality`` code → the nearest items of the other modality (``results``) and of
        its own (``same_modality``, the item itself left out)."""
        if modality not in MODALITIES:
            raise ServeError(f"modality must be 'image' or 'text', got {str(modality)[:20]!r}")
        row = self.row(item_id)
        code = self.codes[modality][row:row + 1]
        answer = self._answer({"id": self.ids[row], "modality": modality, "item": self.describe(row)}, code,
                              other(modality), k)
        answer["same_modality"] = self._search(code, modality, k, skip=row)
        return answer

    # -- thumbnails ---------------------------------------------------------------------------
    def image_file(self, item_id: str) -> Path:
        """The dataset image of an item: its stored relative path under the images root, never outside it."""
        row = self.row(item_id)
        if not self.has_images or not self.paths[row]:
            raise NoImage(f"{item_id[:80]!r}: no image file for this item here (the cache stores no image paths, "
                          f"or its dataset folder is not on this machine: pass --images-root)")
        path = (self.images / self.paths[row]).resolve()
        if not path.is_relative_to(self.images):
            raise NoImage(f"{item_id[:80]!r}: its image path leaves the dataset folder; refused")
        if not path.is_file():
            raise NoImage(f"{item_id[:80]!r}: its image file is missing from {self.images}")
        return path

    def thumbnail(self, item_id: str) -> bytes:
        """The item's image as a small JPEG, made once and kept in memory (least recently used go first)."""
        path = self.image_file(item_id)
        data = self.thumbnails.get(path)
        if data is None:
            try:
                data = make_thumbnail(path)
            except (OSError, ValueError) as e:
                raise NoImage(f"{item_id[:80]!r}: its image file does not decode ({type(e).__name__})") from None
            self.thumbnails.put(path, data)
        return data


def _check_image(data: bytes, name: str) -> None:
    """Refuse bytes Pillow cannot identify as an image, before anything is written or decoded in full."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Image.DecompressionBombError:
        raise TooLarge(f"{name}: too many pixels; upload a smaller image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise NotAnImage(f"{name}: not an image ({type(e).__name__}); upload a JPEG, PNG or other image file") \
            from None
