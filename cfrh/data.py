"""Training batches straight from the Zarr cache.

A training split that fits in ``in_memory_mb`` is read once and shuffled as a whole every
epoch. A larger one is streamed: the rows are grouped by the storage block (chunk) they live
in, each epoch visits the blocks in a fresh random order, reads ``window_blocks`` of them at a
time (one orthogonal read per array, the next window prefetched in a thread while the current
one trains), shuffles rows within the window, and cuts full batches, carrying the remainder
into the next window. Every row is visited once per epoch either way; the order depends only
on (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from .cache import FeatureCache, iter_row_blocks
from .model import FeatureStats


def feature_blocks(cache: FeatureCache, name: str, block_rows: int = 16384,
                   rows: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(offset, float32 block) over an array's rows (all, or ``rows`` in their order), bounded memory."""
    n = cache.array(name).shape[0] if rows is None else len(rows)
    for _, start, stop in iter_row_blocks(n, block_rows):
        sel = slice(start, stop) if rows is None else rows[start:stop]
        yield start, cache.read(name, sel).astype(np.float32, copy=False)


def feature_stats(cache: FeatureCache, name: str, rows: np.ndarray, block_rows: int = 16384) -> FeatureStats:
    """Mean (float64 accumulation, float32 result) and per-column non-zero counts over ``rows``, bounded memory."""
    dim = cache.array(name).shape[1]
    total, nonzero = np.zeros(dim, dtype=np.float64), np.zeros(dim, dtype=np.int64)
    for _, block in feature_blocks(cache, name, block_rows, rows=rows):
        total += block.sum(axis=0, dtype=np.float64)
        nonzero += np.count_nonzero(block, axis=0)
    return FeatureStats((total / max(1, len(rows))).astype(np.float32), nonzero, int(len(rows)))


class PairBatches:
    """Shuffled (image, text) float32 batches of the training rows, one pass per :meth:`epoch`."""

    def __init__(self, cache: FeatureCache | None, rows: np.ndarray, batch_size: int, seed: int = 0,
                 in_memory_mb: float = 2048, window_blocks: int = 8, drop_last: bool = True):
        self.cache = cache
        self.rows = np.sort(np.asarray(rows, dtype=np.int64))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = drop_last
        self.window_blocks = max(1, int(window_blocks))
        image, text = cache.array("image"), cache.array("text")
        self.image_dim, self.text_dim = int(image.shape[1]), int(text.shape[1])
        needed_mb = len(self.rows) * (self.image_dim + self.text_dim) * 4 / 2**20
        self.in_memory = needed_mb <= in_memory_mb
        if self.in_memory:
            self.image = torch.from_numpy(cache.read("image", self.rows).astype(np.float32))
            self.text = torch.from_numpy(cache.read("text", self.rows).astype(np.float32))
        else:
            # Rows of one storage block stay together; a block is the larger of the two arrays' chunks.
            block_rows = max(int(image.chunks[0]), int(text.chunks[0]))
            block_of = self.rows // block_rows
            starts = np.flatnonzero(np.r_[True, block_of[1:] != block_of[:-1]])
            self.block_rows = np.split(self.rows, starts[1:])

    @classmethod
    def from_arrays(cls, image: np.ndarray, text: np.ndarray, batch_size: int, seed: int = 0,
                    drop_last: bool = True) -> "PairBatches":
        """Batches of paired in-memory arrays (the estimator's ``fit``): the in-memory path, no cache."""
        self = cls.__new__(cls)
        self.cache, self.rows = None, np.arange(len(image), dtype=np.int64)
        self.batch_size, self.seed, self.drop_last, self.window_blocks = int(batch_size), int(seed), drop_last, 1
        self.image_dim, self.text_dim = int(image.shape[1]), int(text.shape[1])
        self.in_memory = True
        self.image = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        self.text = torch.from_numpy(np.ascontiguousarray(text, dtype=np.float32))
        return self

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch])

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one (0-based) epoch, in an order fixed by (seed, epoch)."""
        if self.in_memory:
            yield from self._cut(self._rng(epoch).permutation(len(self.rows)), self.image, self.text)
            return
        yield from self._stream(self._rng(epoch))

    def _cut(self, order: np.ndarray, image: torch.Tensor, text: torch.Tensor,
             final: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order_t = torch.from_numpy(order)
        n_full = len(order) // self.batch_size * self.batch_size
        for start in range(0, n_full, self.batch_size):
            idx = order_t[start:start + self.batch_size]
            yield image.index_select(0, idx), text.index_select(0, idx)
        if final and not self.drop_last and n_full < len(order):
            idx = order_t[n_full:]
            yield image.index_select(0, idx), text.index_select(0, idx)

    def _read(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.cache.read("image", rows).astype(np.float32)),
                torch.from_numpy(self.cache.read("text", rows).astype(np.float32)))

    def _stream(self, rng: np.random.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        blocks = rng.permutation(len(self.block_rows))
        windows = [np.concatenate([self.block_rows[b] for b in blocks[i:i + self.window_blocks]])
                   for i in range(0, len(blocks), self.window_blocks)]
        carry_i = torch.empty(0, self.image_dim)
        carry_t = torch.empty(0, self.text_dim)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfrh-prefetch") as pool:
            pending = pool.submit(self._read, windows[0]) if windows else None
            for w in range(len(windows)):
                image, text = pending.result()
                if w + 1 < len(windows):
                    pending = pool.submit(self._read, windows[w + 1])
                image, text = torch.cat([carry_i, image]), torch.cat([carry_t, text])
                # Carried rows were already shuffled; shuffle them in with the new window's rows.
                order = rng.permutation(image.shape[0])
                last = w + 1 == len(windows)
                yield from self._cut(order, image, text, final=last)
                rest = torch.from_numpy(order[len(order) // self.batch_size * self.batch_size:])
                carry_i, carry_t = image.index_select(0, rest), text.index_select(0, rest)
