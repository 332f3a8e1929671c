"""An index over packed binary codes: exact Hamming top-k, and approximate search for millions.

Exact search (``kind="flat"``) is a numba kernel, parallel over tiles of queries. The database is
kept word-major in blocks of :data:`BLOCK` codes (``(blocks, words, BLOCK)`` uint64), so the XOR +
popcount over a block vectorises (VPOPCNTQ where the CPU has it) and a tile of queries reuses each
block from L1/L2 before moving on. Distances are small integers (0..bits), so top-k needs no sort:
each query keeps a threshold ``t`` (the k-th best distance so far) and a buffer of candidates
below it; a block whose minimum is not below ``t`` is skipped without looking at its items, and a
full buffer is cut back to k by a histogram over distances. The answer comes out ordered by
(distance, database position) by a counting sort.

**Tie rule:** among equal distances the item added first (smaller database position) ranks first,
so results are deterministic and equal ``numpy.argsort(distances, kind="stable")[:, :k]``.
When fewer than k items exist, the missing slots hold index -1 and distance :data:`NO_RESULT`
(int32 max, faiss' convention), keeping every row sorted by distance.

Approximate search wraps faiss: ``kind="ivf"`` (``IndexBinaryIVF``: k-means over the codes,
``nprobe`` of ``nlist`` lists visited; ``nlist`` defaults to √N, which keeps k-means on its
64·nlist-code sample to seconds at a million codes) or ``kind="hnsw"`` (``IndexBinaryHNSW``, graph search with
``ef_search``). The faiss structure is built on first search over the codes added so far (IVF
trains its lists then, on a seeded sample) and extended by later adds. :func:`recall_at_k`
measures it against exact search.

File format (``save`` / ``load``, no pickle): one ``.npz`` with ``header`` (a JSON string: format,
bits, kind, parameters, count), ``codes`` ((N, bits/8) uint8, numpy ``packbits`` rows as in
:mod:`cfrh.codes`), ``ids`` ((N,) int64, only when ids were given) and, for an approximate index
already built, ``faiss`` (the faiss structure as bytes from ``faiss.serialize_index_binary``).
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numba
import numpy as np

from .codes import as_words, popcount64
from .errors import CfrhError


FORMAT = 1
KINDS = ("flat", "ivf", "hnsw")
BLOCK = 1024  # codes per database block (16 KiB at 128 bits: stays in L1/L2 across a query tile)
QUERY_TILE = 32  # queries sharing one pass over the database
NO_RESULT = int(np.iinfo(np.int32).max)
IVF_TRAIN_PER_LIST = 64  # k-means sample size per inverted list


class HammingIndexError(CfrhError, ValueError):
    """Codes, queries or an index file that do not fit the index; the message says what was expected."""


# -- the exact kernel -------------------------------------------------------------------------------
@numba.njit(inline="always", boundscheck=False)
def _cut(buf_d: np.ndarray, fill: int, k: int, hist: np.ndarray) -> tuple[int, int]:
    """(t, quota): the k best of ``buf_d[:fill]`` are every entry below t and the first ``quota`` equal to t."""
    hist[:] = 0
    for i in range(fill):
        hist[buf_d[i]] += 1
    cum = 0
    t = 0
    while t < hist.shape[0] and cum + hist[t] < k:
        cum += hist[t]
        t += 1
    return t, k - cum


@numba.njit(parallel=True, cache=True, fastmath=True, boundscheck=False)
def _topk_kernel(queries: np.ndarray, blocks: np.ndarray, n: int, k: int, tile: int,
                 out_d: np.ndarray, out_i: np.ndarray, width: tuple) -> None:
    # ``width`` is a tuple of one element per 64-bit word: its length is a compile-time constant, so
    # the word loop unrolls and the loop over a block's codes vectorises (one compiled kernel per width).
    nw = len(width)
    nq = queries.shape[0]
    n_blocks, _, block = blocks.shape
    n_bins = nw * 64 + 2  # distances 0..bits, and bits + 1 meaning "accept anything"
    cap = min(max(2 * k, 512), n)  # never full when it can hold the whole database
    for t in numba.prange((nq + tile - 1) // tile):
        q0 = t * tile
        m = min(nq, q0 + tile) - q0
        buf_d = np.empty((m, cap), np.int32)
        buf_j = np.empty((m, cap), np.int64)
        fill = np.zeros(m, np.int64)
        thr = np.full(m, n_bins - 1, np.int64)  # accept d < thr
        hist = np.empty(n_bins, np.int64)
        dist = np.empty(block, np.int64)
        qv = np.empty(nw, np.uint64)
        for b in range(n_blocks):
            codes = blocks[b]
            base = b * block
            valid = min(block, n - base)
            for qi in range(m):
                for w in range(nw):
                    qv[w] = queries[q0 + qi, w]
                th = thr[qi]
                low = th
                for jj in range(block):
                    d = 0
                    for w in range(nw):
                        d += popcount64(qv[w] ^ codes[w, jj])
                    dist[jj] = d
                    low = min(low, d)
                if low >= th:
                    continue  # nothing in this block can enter the top k
                f = fill[qi]
                for jj in range(valid):
                    d = dist[jj]
                    if d < th:
                        if f == cap:  # cut the buffer back to the k best, in position order
                            cut, quota = _cut(buf_d[qi], f, k, hist)
                            kept = 0
                            for i in range(f):
                                di = buf_d[qi, i]
                                if di < cut or (di == cut and quota > 0):
                                    if di == cut:
                                        quota -= 1
                                    buf_d[qi, kept] = di
                                    buf_j[qi, kept] = buf_j[qi, i]
                                    kept += 1
                            f = kept
                            th = cut
                            if d >= th:
                                continue
                        buf_d[qi, f] = d
                        buf_j[qi, f] = base + jj
                        f += 1
                fill[qi] = f
                thr[qi] = th
        for qi in range(m):
            f = fill[qi]
            cut, quota = _cut(buf_d[qi], f, k, hist)
            pos = 0
            for d in range(n_bins):  # hist becomes each distance's first output slot
                c = hist[d] if d < cut else (min(hist[d], quota) if d == cut else 0)
                hist[d] = pos
                pos += c
            for i in range(f):  # buffer is in position order, so equal distances stay in it
                di = buf_d[qi, i]
                if di < cut or (di == cut and quota > 0):
                    if di == cut:
                        quota -= 1
                    p = hist[di]
                    hist[di] += 1
                    out_d[q0 + qi, p] = di
                    out_i[q0 + qi, p] = buf_j[qi, i]
            for p in range(pos, out_d.shape[1]):
                out_d[q0 + qi, p] = NO_RESULT
                out_i[q0 + qi, p] = -1


def blocked_words(packed: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """(N, bits/8) packed codes → (ceil(N/block), words, block) uint64, zero-padded: the kernel's layout."""
    words = as_words(packed)
    n, nw = words.shape
    n_blocks = max(1, -(-n // block))
    out = np.zeros((n_blocks, block, nw), dtype=np.uint64)
    out.reshape(-1, nw)[:n] = words
    return np.ascontiguousarray(out.transpose(0, 2, 1))


def recall_at_k(exact_distances: np.ndarray, approx_distances: np.ndarray) -> float:
    """Mean fraction of the exact top-k distances an approximate search recovered (ties count as found:
    any item at the k-th distance is as good as another)."""
    exact = np.asarray(exact_distances, dtype=np.int64)
    approx = np.asarray(approx_distances, dtype=np.int64)
    valid = exact != NO_RESULT
    bins = int(max(exact[valid].max(initial=0), approx[approx != NO_RESULT].max(initial=0))) + 2
    rows = np.arange(exact.shape[0])[:, None]

    def hist(d: np.ndarray) -> np.ndarray:
        h = np.zeros((d.shape[0], bins), dtype=np.int64)
        ok = d != NO_RESULT
        np.add.at(h, (np.broadcast_to(rows, d.shape)[ok], d[ok]), 1)
        return h

    found = np.minimum(hist(exact), hist(approx)).sum(axis=1)
    return float((found / np.maximum(valid.sum(axis=1), 1)).mean())


# -- the index ---------------------------------------------------------------------------------------
def _threads(threads: int | None) -> int:
    return max(1, min(int(threads or numba.config.NUMBA_NUM_THREADS), numba.config.NUMBA_NUM_THREADS))


class HammingIndex:
    """Packed binary codes with exact (``kind="flat"``) or approximate (``"ivf"``, ``"hnsw"``) top-k.

    ``add(codes, ids=None)`` appends (N, bits/8) uint8 rows; ``search(queries, k)`` returns
    (distances int32 (nq, k), indices int64 (nq, k)): database positions, or the ids given to ``add``.
    """

    def __init__(self, bits: int, kind: str = "flat", *, nlist: int | None = None, nprobe: int = 16,
                 hnsw_m: int = 32, ef_construction: int = 64, ef_search: int = 128,
                 threads: int | None = None, seed: int = 0):
        if int(bits) <= 0 or int(bits) % 8:
            raise HammingIndexError(f"bits must be a positive multiple of 8 (codes are packed bytes), got {bits}")
        if kind not in KINDS:
            raise HammingIndexError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.bits = int(bits)
        self.kind = kind
        self.params: dict[str, Any] = {"nlist": nlist, "nprobe": int(nprobe), "hnsw_m": int(hnsw_m),
                                       "ef_construction": int(ef_construction), "ef_search": int(ef_search),
                                       "seed": int(seed)}
        self.threads = threads
        self._chunks: list[np.ndarray] = []
        self._id_chunks: list[np.ndarray] = []
        self._codes = np.empty((0, self.bits // 8), dtype=np.uint8)
        self._ids: np.ndarray | None = None
        self._has_ids: bool | None = None  # decided by the first non-empty add
        self._blocks: np.ndarray | None = None
        self._ann: Any = None  # the faiss structure of an approximate index
        self._ann_count = 0  # codes already added to it

    # -- contents -----------------------------------------------------------------------------
    @property
    def nbytes_per_code(self) -> int:
        return self.bits // 8

    def __len__(self) -> int:
        return self._codes.shape[0] + sum(c.shape[0] for c in self._chunks)

    def __repr__(self) -> str:
        return f"HammingIndex(bits={self.bits}, kind={self.kind!r}, n={len(self)})"

    def _check_codes(self, codes: Any, what: str) -> np.ndarray:
        arr = np.asarray(codes)
        if arr.ndim == 1 and arr.shape[0] == self.nbytes_per_code:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.nbytes_per_code or arr.dtype != np.uint8:
            raise HammingIndexError(
                f"{what}: expected packed uint8 codes of shape (N, {self.nbytes_per_code}) for {self.bits}-bit "
                f"codes, got {arr.dtype} {arr.shape}; pack ±1 codes with cfrh.codes.pack_codes")
        return np.ascontiguousarray(arr)

    def add(self, codes: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Append codes (positions continue from ``len(self)``); ``ids`` (int64, one per code) are what
        ``search`` reports instead of positions, and must be given for every add or for none."""
        codes = self._check_codes(codes, "add")
        if ids is not None:
            ids = np.asarray(ids)
            if ids.shape != (codes.shape[0],) or ids.dtype.kind not in "iu":
                raise HammingIndexError(f"add: ids must be ({codes.shape[0]},) integers, one per code, got "
                                        f"{ids.dtype} {ids.shape}")
        if self._has_ids is not None and self._has_ids != (ids is not None):
            raise HammingIndexError(f"add: give ids with every add or with none (this index has "
                                    f"{'ids' if self._has_ids else 'no ids'})")
        if codes.shape[0] == 0:
            return
        self._has_ids = ids is not None
        self._chunks.append(codes)
        if ids is not None:
            self._id_chunks.append(ids.astype(np.int64))
        self._blocks = None

    def _consolidate(self) -> None:
        if self._chunks:
            self._codes = np.concatenate([self._codes, *self._chunks])
            self._chunks = []
        if self._id_chunks:
            self._ids = np.concatenate([x for x in (self._ids, *self._id_chunks) if x is not None])
            self._id_chunks = []

    @property
    def codes(self) -> np.ndarray:
        """All codes, (N, bits/8) uint8, in position order."""
        self._consolidate()
        return self._codes

    @property
    def ids(self) -> np.ndarray | None:
        """The ids given to ``add`` (None when positions are the ids)."""
        self._consolidate()
        return self._ids

    # -- search -------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest codes of each query: (distances int32 (nq, k), indices int64 (nq, k)), ordered
        by distance, ties by position; slots beyond the index size hold -1 / :data:`NO_RESULT`."""
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise HammingIndexError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        queries = self._check_codes(queries, "search")
        nq = queries.shape[0]
        self._consolidate()
        n = self._codes.shape[0]
        out_d = np.full((nq, k), NO_RESULT, dtype=np.int32)
        out_i = np.full((nq, k), -1, dtype=np.int64)
        if nq == 0 or n == 0:
            return out_d, out_i
        if self.kind == "flat":
            self._search_exact(queries, k, out_d, out_i)
        else:
            self._search_approx(queries, k, out_d, out_i)
        if self._ids is not None:
            found = out_i >= 0
            out_i[found] = self._ids[out_i[found]]
        return out_d, out_i

    def _search_exact(self, queries: np.ndarray, k: int, out_d: np.ndarray, out_i: np.ndarray) -> None:
        if self._blocks is None:
            self._blocks = blocked_words(self._codes)
        q = as_words(queries)
        threads = _threads(self.threads)
        tile = max(1, min(QUERY_TILE, -(-q.shape[0] // threads)))
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            _topk_kernel(q, self._blocks, self._codes.shape[0], k, tile, out_d, out_i, (0,) * q.shape[1])
        finally:
            numba.set_num_threads(previous)

    def _build_ann(self) -> Any:
        import faiss

        n = self._codes.shape[0]
        if self._ann is None:
            if self.kind == "ivf":
                nlist = self.params["nlist"] or max(1, min(int(math.sqrt(n)), n // IVF_TRAIN_PER_LIST or 1))
                if nlist > n:
                    raise HammingIndexError(f"an IVF index with nlist={nlist} needs at least {nlist} codes, has {n}; "
                                            f"lower nlist or use kind='flat'")
                self.params["nlist"] = int(nlist)
                ann = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(self.bits), self.bits, int(nlist))
                ann.cp.seed = self.params["seed"]
                rng = np.random.default_rng(self.params["seed"])
                size = min(n, IVF_TRAIN_PER_LIST * int(nlist))
                sample = self._codes if size == n else self._codes[np.sort(rng.choice(n, size, replace=False))]
                ann.train(sample)
            else:
                ann = faiss.IndexBinaryHNSW(self.bits, self.params["hnsw_m"])
                ann.hnsw.efConstruction = self.params["ef_construction"]
            self._ann, self._ann_count = ann, 0
        if self._ann_count < n:
            self._ann.add(self._codes[self._ann_count:])
            self._ann_count = n
        return self._ann

    def _search_approx(self, queries: np.ndarray, k: int, out_d: np.ndarray, out_i: np.ndarray) -> None:
        import faiss

        previous = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(_threads(self.threads))
        try:
            ann = self._build_ann()
            if self.kind == "ivf":
                ann.nprobe = self.params["nprobe"]
            else:
                ann.hnsw.efSearch = max(self.params["ef_search"], k)
            d, i = ann.search(queries, k)
        finally:
            faiss.omp_set_num_threads(previous)
        found = i >= 0
        out_d[found] = d[found]
        out_i[found] = i[found]

    # -- files --------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "bits": self.bits, "kind": self.kind, "count": len(self),
                "has_ids": self.ids is not None, "params": dict(self.params),
                "codes": "numpy packbits rows, big-endian within a byte, bit set for a +1 code"}

    def to_bytes(self) -> bytes:
        """The ``.npz`` file's bytes (see the module docstring for its members)."""
        arrays: dict[str, np.ndarray] = {"header": np.array(json.dumps(self.header())), "codes": self.codes}
        if self.ids is not None:
            arrays["ids"] = self.ids
        if self._ann is not None:
            import faiss

            self._build_ann()
            arrays["faiss"] = faiss.serialize_index_binary(self._ann)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` (a ``.npz``) atomically: a temporary name, then a rename."""
        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return path

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "index", threads: int | None = None) -> "HammingIndex":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                members = {name: npz[name] for name in npz.files}
            header = json.loads(str(members["header"]))
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise HammingIndexError(f"{where}: not a cfrh index file ({type(err).__name__}: {err}); rebuild it "
                                    f"with HammingIndex.save") from None
        if header.get("format") != FORMAT:
            raise HammingIndexError(f"{where}: index format {header.get('format')!r}, this cfrh reads {FORMAT}; "
                                    f"rebuild the index")
        params = header.get("params", {})
        index = cls(header["bits"], header["kind"], threads=threads,
                    **{k: v for k, v in params.items() if k in ("nlist", "nprobe", "hnsw_m", "ef_construction",
                                                                "ef_search", "seed")})
        codes = members.get("codes")
        if codes is None or codes.shape != (header["count"], header["bits"] // 8):
            raise HammingIndexError(f"{where}: codes do not match the header ({header['count']} × "
                                    f"{header['bits'] // 8} bytes expected); the file is damaged, rebuild it")
        index.add(codes, members.get("ids") if header.get("has_ids") else None)
        if "faiss" in members:
            import faiss

            index._consolidate()
            index._ann = faiss.deserialize_index_binary(members["faiss"])
            index._ann_count = int(index._ann.ntotal)
        return index

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> "HammingIndex":
        """Read an index written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise HammingIndexError(f"{path}: index file not found; build one with HammingIndex.save")
        return cls.from_bytes(path.read_bytes(), where=str(path), threads=threads)
