"""Search a run's database: a HammingIndex over the stored codes, results described from the cache.

The index (:class:`cfrh.index.HammingIndex`) knows packed codes and positions only; this module joins
it with a run (:class:`cfrh.runs.RunStore`: the codes) and a cache (the database split, ids, texts,
image paths), which is what ``cfrh search`` and ``cfrh serve`` need.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .cache import FeatureCache
from .index import HammingIndex
from .runs import RunStore


def database_index(cache: FeatureCache, run: RunStore, bits: int, modality: str, kind: str = "flat",
                   **params: Any) -> HammingIndex:
    """A HammingIndex over the ``modality`` codes of the cache's database split; ids are cache rows.

    Built from the stored codes each time: reading them is the whole cost of a flat index (a saved
    one would be read just the same), and a rebuilt index can never be stale after a retraining."""
    rows = cache.split("database")
    index = HammingIndex(int(bits), kind, **params)
    index.add(run.read_codes(bits, modality, cache.n_items)[rows], ids=rows)
    return index


def describe_rows(cache: FeatureCache, rows: np.ndarray, target: str) -> tuple[dict[int, str], str, dict[int, str]]:
    """(row → id, the describing field, row → its value) for cache rows: an image's path, else the text."""
    uniq = np.unique(rows[rows >= 0])
    ids = dict(zip(uniq.tolist(), cache.read("ids", uniq).tolist())) if uniq.size else {}
    field = "path" if target == "image" and cache.has("paths") else "text"
    names = dict(zip(uniq.tolist(), cache.read(field + "s", uniq).tolist())) if uniq.size else {}
    return ids, field, names


def search_cache(cache: FeatureCache, run: RunStore, queries: np.ndarray, target: str, bits: int = 64,
                 k: int = 10, index: HammingIndex | None = None) -> list[list[dict[str, Any]]]:
    """Top-k database items of modality ``target`` for each packed query code: per query a list of
    ``{rank, row, id, distance}`` plus ``path`` (image targets, when the cache has paths) or ``text``."""
    index = index or database_index(cache, run, bits, target)
    dist, rows = index.search(queries, k)
    ids, field, names = describe_rows(cache, rows, target)
    return [[{"rank": r + 1, "row": int(j), "id": str(ids[j]), field: str(names[j]), "distance": int(d)}
             for r, (d, j) in enumerate(zip(drow.tolist(), rrow.tolist())) if j >= 0]
            for drow, rrow in zip(dist, rows)]
