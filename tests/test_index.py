"""HammingIndex: exact top-k equals brute force (ties by position), ids, files, approximate recall."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cfrh.codes import hamming_distances, pack_codes
from cfrh.index import BLOCK, NO_RESULT, HammingIndex, HammingIndexError, blocked_words, recall_at_k


def random_codes(rng: np.random.Generator, n: int, bits: int, duplicates: bool = True) -> np.ndarray:
    codes = rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    if duplicates and n > 4:  # many exact ties, so the tie rule is exercised
        codes[::4] = codes[1]
    return codes


def brute_force(queries: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    full = hamming_distances(queries, db)
    order = np.argsort(full, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(full, order, axis=1), order


@pytest.mark.parametrize("bits", [8, 24, 64, 72, 128, 200])
@pytest.mark.parametrize("n", [1, 7, BLOCK, BLOCK + 1, 2500])
def test_exact_search_equals_stable_brute_force(bits, n):
    rng = np.random.default_rng(bits * 10_007 + n)
    db = random_codes(rng, n, bits)
    queries = np.concatenate([random_codes(rng, 9, bits, duplicates=False), db[:2]])
    index = HammingIndex(bits)
    index.add(db)
    for k in (1, 10, 300, n, n + 5):
        d, i = index.search(queries, k)
        assert d.shape == (len(queries), k) and d.dtype == np.int32
        assert i.shape == (len(queries), k) and i.dtype == np.int64
        ref_d, ref_i = brute_force(queries, db, k)
        m = ref_i.shape[1]
        np.testing.assert_array_equal(i[:, :m], ref_i)
        np.testing.assert_array_equal(d[:, :m], ref_d)
        # k > n: the missing slots are marked, and rows stay sorted by distance
        assert (i[:, m:] == -1).all() and (d[:, m:] == NO_RESULT).all()
        assert (np.diff(d.astype(np.int64), axis=1) >= 0).all()
    # a database code finds itself first at distance 0 (its first copy, by the tie rule)
    d, i = index.search(db[:1], 1)
    assert d[0, 0] == 0 and i[0, 0] == 0


def test_compaction_with_many_equal_distances():
    """Every code equal: the k answers are the first k positions, across block and buffer cuts."""
    db = np.full((3 * BLOCK + 17, 16), 0xA5, dtype=np.uint8)
    index = HammingIndex(128)
    index.add(db)
    d, i = index.search(db[:3], 700)
    np.testing.assert_array_equal(i, np.broadcast_to(np.arange(700), (3, 700)))
    assert (d == 0).all()


def test_known_distances_from_sign_codes():
    """±1 codes through pack_codes: distance = number of disagreeing signs."""
    base = np.ones((1, 16))
    db = np.repeat(base, 5, axis=0)
    for r in range(5):
        db[r, :r * 3] = -1  # row r differs from the query in 3r bits
    index = HammingIndex(16)
    index.add(pack_codes(db[::-1]))  # positions 0..4 hold distances 12, 9, 6, 3, 0
    d, i = index.search(pack_codes(base), 5)
    np.testing.assert_array_equal(d, [[0, 3, 6, 9, 12]])
    np.testing.assert_array_equal(i, [[4, 3, 2, 1, 0]])


def test_ids_incremental_adds_and_threads():
    rng = np.random.default_rng(3)
    a, b = random_codes(rng, 700, 64), random_codes(rng, 900, 64)
    ids = rng.permutation(10_000)[:1600].astype(np.int64) + 5
    index = HammingIndex(64, threads=1)
    index.add(a, ids[:700])
    index.add(b, ids[700:])
    assert len(index) == 1600
    queries = random_codes(rng, 20, 64, duplicates=False)
    d, i = index.search(queries, 15)
    ref_d, ref_pos = brute_force(queries, np.concatenate([a, b]), 15)
    np.testing.assert_array_equal(i, ids[ref_pos])
    np.testing.assert_array_equal(d, ref_d)
    index.threads = 2
    np.testing.assert_array_equal(index.search(queries, 15)[1], i)


def test_bad_input_is_a_clear_error():
    index = HammingIndex(64)
    with pytest.raises(HammingIndexError, match=r"shape \(N, 8\)"):
        index.add(np.zeros((3, 16), dtype=np.uint8))
    with pytest.raises(HammingIndexError, match="uint8"):
        index.add(np.zeros((3, 8), dtype=np.int64))
    index.add(np.zeros((3, 8), dtype=np.uint8))
    with pytest.raises(HammingIndexError, match="ids with every add or with none"):
        index.add(np.zeros((2, 8), dtype=np.uint8), ids=np.array([1, 2]))
    with pytest.raises(HammingIndexError, match="positive integer"):
        index.search(np.zeros((1, 8), dtype=np.uint8), 0)
    with pytest.raises(HammingIndexError, match="multiple of 8"):
        HammingIndex(12)
    with pytest.raises(HammingIndexError, match="unknown index kind"):
        HammingIndex(64, kind="lsh")
    empty = HammingIndex(32)
    d, i = empty.search(np.zeros((2, 4), dtype=np.uint8), 3)
    assert (i == -1).all() and (d == NO_RESULT).all()


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    db = random_codes(rng, 1500, 72)
    ids = np.arange(1500, dtype=np.int64) * 3
    index = HammingIndex(72)
    index.add(db, ids)
    path = index.save(tmp_path / "db.npz")
    assert not list(tmp_path.glob("*.partial"))
    with np.load(path, allow_pickle=False) as npz:  # plain arrays, no pickle
        header = json.loads(str(npz["header"]))
        np.testing.assert_array_equal(npz["codes"], db)
        np.testing.assert_array_equal(npz["ids"], ids)
    assert header["bits"] == 72 and header["count"] == 1500 and header["kind"] == "flat"
    loaded = HammingIndex.load(path)
    assert len(loaded) == 1500 and loaded.bits == 72
    queries = random_codes(rng, 10, 72, duplicates=False)
    for got, want in zip(loaded.search(queries, 20), index.search(queries, 20)):
        np.testing.assert_array_equal(got, want)


def test_load_rejects_damaged_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an index")
    with pytest.raises(HammingIndexError, match="not a cfrh index file"):
        HammingIndex.load(bad)
    with pytest.raises(HammingIndexError, match="not found"):
        HammingIndex.load(tmp_path / "missing.npz")
    index = HammingIndex(16)
    index.add(np.zeros((4, 2), dtype=np.uint8))
    good = index.save(tmp_path / "good.npz")
    with np.load(good) as npz:
        members = dict(npz)
    members["codes"] = members["codes"][:3]
    np.savez(tmp_path / "short.npz", **members)
    with pytest.raises(HammingIndexError, match="do not match the header"):
        HammingIndex.load(tmp_path / "short.npz")


def test_blocked_layout_is_word_major():
    db = np.arange(3 * 16, dtype=np.uint8).reshape(3, 16)
    blocks = blocked_words(db, block=4)
    words = db.view(np.uint64)
    assert blocks.shape == (1, 2, 4)
    np.testing.assert_array_equal(blocks[0, :, :3], words.T)
    assert (blocks[0, :, 3] == 0).all()


def clustered(rng: np.random.Generator, n: int, bits: int, centres: np.ndarray, flip: float) -> np.ndarray:
    raw = centres[rng.integers(0, len(centres), n)] ^ (rng.random((n, bits)) < flip)
    return np.packbits(raw, axis=1)


def test_recall_at_k_known_answers():
    exact = np.array([[0, 1, 1, 2], [3, 3, 4, NO_RESULT]])
    assert recall_at_k(exact, exact) == 1.0
    # another item at an equal distance counts as found; a worse one does not
    approx = np.array([[0, 1, 1, 3], [3, 4, 5, NO_RESULT]])
    assert recall_at_k(exact, approx) == pytest.approx((3 / 4 + 2 / 3) / 2)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_search_recall_and_round_trip(kind, tmp_path):
    rng = np.random.default_rng(11)
    bits = 64
    centres = rng.integers(0, 2, (40, bits), dtype=np.uint8)
    db = clustered(rng, 4000, bits, centres, 0.08)
    queries = clustered(rng, 50, bits, centres, 0.08)
    exact = HammingIndex(bits)
    exact.add(db)
    exact_d, _ = exact.search(queries, 10)
    ann = HammingIndex(bits, kind, nlist=16, nprobe=4, ef_search=64)
    ann.add(db[:3000])
    ann.search(queries[:1], 10)  # builds (and trains) on the first 3,000
    ann.add(db[3000:])  # later adds extend the built structure
    d, i = ann.search(queries, 10)
    assert recall_at_k(exact_d, d) >= 0.9
    # whatever it returns is a real item at its true distance
    full = hamming_distances(queries, db)
    np.testing.assert_array_equal(np.take_along_axis(full, i, axis=1), d)
    if kind == "ivf":  # every list probed: exact distances
        ann.params["nprobe"] = 16
        assert recall_at_k(exact_d, ann.search(queries, 10)[0]) == 1.0
    loaded = HammingIndex.load(ann.save(tmp_path / f"{kind}.npz"))
    assert loaded.kind == kind and len(loaded) == 4000
    for got, want in zip(loaded.search(queries, 10), ann.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
