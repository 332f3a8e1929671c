"""Binary codes: packing ±1 codes into bits, and Hamming distances by XOR + popcount.

The packed layout is numpy's ``packbits`` (big-endian within a byte, bit = 1 for a +1
code), one row of ``bits // 8`` uint8 per item; it is byte-compatible with faiss'
``IndexBinary*`` inputs. Distances never unpack: rows are viewed as uint64 words (when
``bits % 64 == 0``) and compared with a numba kernel parallel over queries.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(N, bits) real or ±1 codes → (N, bits/8) uint8, bit set where the code is > 0."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] % 8:
        raise ValueError(f"codes must be (N, bits) with bits a multiple of 8, got shape {codes.shape}")
    return np.packbits(codes > 0, axis=1)


def unpack_codes(packed: np.ndarray, bits: int | None = None) -> np.ndarray:
    """(N, bits/8) uint8 → (N, bits) int8 in {-1, +1}."""
    packed = np.asarray(packed, dtype=np.uint8)
    bits = packed.shape[1] * 8 if bits is None else bits
    return (np.unpackbits(packed, axis=1, count=bits).astype(np.int8) * 2 - 1)


def as_words(packed: np.ndarray) -> np.ndarray:
    """View packed rows as uint64 words (bytes padded with zeros to a multiple of 8; padding never differs)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.ascontiguousarray(np.pad(packed, ((0, 0), (0, pad))))
    return packed.view(np.uint64)


@intrinsic
def popcount64(typingctx, x):  # type: ignore[no-untyped-def]
    """Set bits of a uint64, as LLVM's ctpop: one POPCNT, and VPOPCNTQ when a loop over it vectorises."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@numba.njit(parallel=True, cache=True, fastmath=True)
def _hamming_words(q: np.ndarray, db: np.ndarray, out: np.ndarray) -> None:
    nq, nw = q.shape
    ndb = db.shape[0]
    for i in numba.prange(nq):
        for j in range(ndb):
            d = 0
            for w in range(nw):
                d += popcount64(q[i, w] ^ db[j, w])
            out[i, j] = d


def hamming_distances(query: np.ndarray, database: np.ndarray) -> np.ndarray:
    """(nq, B) and (ndb, B) packed uint8 codes → (nq, ndb) int32 Hamming distances."""
    if query.shape[1] != database.shape[1]:
        raise ValueError(f"code lengths differ: {query.shape[1] * 8} vs {database.shape[1] * 8} bits")
    q, db = as_words(query), as_words(database)
    out = np.empty((q.shape[0], db.shape[0]), dtype=np.int32)
    _hamming_words(q, db, out)
    return out
