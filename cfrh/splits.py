"""Retrieval protocols: which rows are queries, which the database, which train the model.

A protocol is the ``[split]`` table of a pipeline:

``method = "random"``
    ``query`` rows drawn at random (or ``query_per_label`` rows per label, as the 2,100-query
    NUS-WIDE protocol does), the database is the rest (``database = "rest"``) or everything
    (``"all"``), and ``train`` rows are drawn from the database (DCMH/DJSRH/JDSH convention).
``method = "fixed"``
    the dataset's own lists (WIKI): ``query_from``/``train_from``/``database_from`` name them.

Splits are seeded and cheap. Extraction stores the pipeline's split in the cache (and the dataset's
own lists, for ``fixed``); a stage whose ``[split]`` differs draws that split over the stored features
when it opens the cache (:meth:`cfrh.cache.FeatureCache.use_split`), so changing it never needs a
re-extraction, and every method and rerun with the same table sees the same rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CfrhError


class SplitError(CfrhError, ValueError):
    """A split protocol that cannot be met by this dataset."""


def _per_label_query(labels: np.ndarray, per_label: int, rng: np.random.Generator) -> np.ndarray:
    """``per_label`` distinct rows for each label, drawn label by label among rows not yet taken."""
    taken = np.zeros(labels.shape[0], dtype=bool)
    picked = []
    for c in range(labels.shape[1]):
        pool = np.flatnonzero((labels[:, c] > 0) & ~taken)
        if pool.size < per_label:
            raise SplitError(f"label {c} has only {pool.size} unused items, fewer than query_per_label={per_label}")
        chosen = rng.choice(pool, size=per_label, replace=False)
        taken[chosen] = True
        picked.append(chosen)
    return np.sort(np.concatenate(picked))


PROTOCOL_KEYS = {"random": ("method", "seed", "query", "query_per_label", "train", "database"),
                 "fixed": ("method", "seed", "query_from", "train_from", "database_from")}


def check_split_keys(protocol: dict[str, Any]) -> None:
    """A known method and only its keys: a misspelt key would otherwise silently fall back to a default."""
    method = protocol.get("method", "random")
    if method not in PROTOCOL_KEYS:
        raise SplitError(f"unknown split method {method!r}; use 'random' or 'fixed'")
    unknown = sorted(set(protocol) - set(PROTOCOL_KEYS[method]))
    if unknown:
        raise SplitError(f"[split] {unknown} not understood with method {method!r}; it takes "
                         f"{', '.join(PROTOCOL_KEYS[method])}")


def make_splits(n: int, protocol: dict[str, Any], labels: np.ndarray | None = None,
                fixed: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Row indices (sorted int64) for ``query``, ``train`` and ``database``."""
    check_split_keys(protocol)
    method = protocol.get("method", "random")
    seed = int(protocol.get("seed", 0))
    rng = np.random.default_rng(seed)
    if method == "fixed":
        if not fixed:
            raise SplitError("split method 'fixed' needs a dataset that ships its own lists (e.g. WIKI)")
        out = {}
        for part, default in (("query", "test"), ("train", "train"), ("database", "train")):
            names = protocol.get(f"{part}_from", default)
            names = [names] if isinstance(names, str) else list(names)
            missing = [x for x in names if x not in fixed]
            if missing:
                raise SplitError(f"split {part}_from names {missing}; the dataset's lists are {sorted(fixed)}")
            out[part] = np.unique(np.concatenate([np.asarray(fixed[x], dtype=np.int64) for x in names]))
            if not out[part].size:
                raise SplitError(f"split {part}_from = {names} selects no rows; the dataset's lists are "
                                 f"{ {k: len(v) for k, v in fixed.items()} }")
        return out
    if method != "random":
        raise SplitError(f"unknown split method {method!r}; use 'random' or 'fixed'")

    if "query_per_label" in protocol:
        if "query" in protocol:
            raise SplitError("[split] sets both query and query_per_label; keep one")
        if int(protocol["query_per_label"]) < 1:
            raise SplitError(f"query_per_label = {protocol['query_per_label']} must be at least 1")
        if labels is None:
            raise SplitError("query_per_label needs labels; this dataset has none, use query = N instead")
        query = _per_label_query(labels, int(protocol["query_per_label"]), rng)
    else:
        n_query = int(protocol.get("query", min(2000, n // 10)))
        if not 0 < n_query < n:
            raise SplitError(f"query = {n_query} must be between 1 and {n - 1} for {n} items")
        query = np.sort(rng.choice(n, size=n_query, replace=False))
    rest = np.setdiff1d(np.arange(n), query)
    database_rule = protocol.get("database", "rest")
    if database_rule not in ("rest", "all"):
        raise SplitError(f"database = {database_rule!r}; use 'rest' (all but the queries) or 'all'")
    database = rest if database_rule == "rest" else np.arange(n)
    n_train = protocol.get("train", "all")
    if n_train == "all":
        train = rest.copy()
    else:
        n_train = int(n_train)
        if n_train < 1:
            raise SplitError(f"train = {n_train} must be at least 1 (or \"all\")")
        if n_train > rest.size:
            raise SplitError(f"train = {n_train} exceeds the {rest.size} non-query items")
        train = np.sort(rng.choice(rest, size=n_train, replace=False))
    return {"query": query.astype(np.int64), "train": train.astype(np.int64),
            "database": database.astype(np.int64)}
