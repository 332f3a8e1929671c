"""Retrieval metrics: the fused kernel against a plain per-query reference (float distances + stable
argsort, DJSRH/JDSH's calc_map_k written out), and the tie-aware values against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.special import gammaln

from cfrh.codes import hamming_distances, pack_codes, unpack_codes
from cfrh.metrics import (MetricError, mean_average_precision, pr_curve_hamming, precision_at_k,
                          retrieval_metrics, topn_precision)


# -- the reference: one query at a time, float Hamming distances, a stable argsort -------------------
def reference_query(dist: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict:
    """Every metric of one query from its distances and relevance flags, by sorting (stable)."""
    order = np.argsort(dist, kind="stable")
    gnd = relevant[order]
    n_rel = int(gnd.sum())
    ranks = np.flatnonzero(gnd) + 1.0
    hits = np.arange(1, n_rel + 1, dtype=np.float64)
    out = {"R": n_rel, "ap": float(np.mean(hits / ranks)) if n_rel else 0.0,
           "p": [gnd[:k].sum() / k for k in ks], "djsrh": [], "standard": [], "retrieved": []}
    for k in ks:
        m = min(k, n_rel)
        top = ranks <= k
        out["djsrh"].append(float(np.mean(hits[:m] / ranks[:m])) if m else 0.0)
        out["standard"].append(float(np.sum(hits[top] / ranks[top]) / m) if m else 0.0)
        out["retrieved"].append(float(np.mean(hits[top] / ranks[top])) if top.any() else 0.0)
    return out


def reference_metrics(qc: np.ndarray, dc: np.ndarray, ql: np.ndarray, dl: np.ndarray, ks: list[int]) -> list[dict]:
    """The per-query reference loop (what the field's calc_map does, with float distances)."""
    qf, df = unpack_codes(qc).astype(np.float64), unpack_codes(dc).astype(np.float64)
    qlf, dlf = ql.astype(np.float64), dl.astype(np.float64)
    bits = qf.shape[1]
    out = []
    for i in range(qf.shape[0]):
        dist = 0.5 * (bits - df @ qf[i])
        relevant = (dlf @ qlf[i]) > 0
        out.append(reference_query(dist, relevant, ks))
    return out


def brute_force_expected(dist: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict:
    """Mean of the stable-rule metrics over every permutation of the database (so over every order of
    equal-distance items, each equally often)."""
    runs = [reference_query(dist[list(p)], relevant[list(p)], ks) for p in itertools.permutations(range(len(dist)))]
    return {key: np.mean([r[key] for r in runs], axis=0) for key in ("ap", "p", "djsrh", "standard")}


def random_problem(seed: int, nq: int, ndb: int, bits: int, classes: int, density: float):
    rng = np.random.default_rng(seed)
    qc = pack_codes(rng.standard_normal((nq, bits)))
    dc = pack_codes(rng.standard_normal((ndb, bits)))
    ql = (rng.random((nq, classes)) < density).astype(np.uint8)
    dl = (rng.random((ndb, classes)) < density).astype(np.uint8)
    return qc, dc, ql, dl


# -- exactness against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("bits,ndb,classes,density", [(8, 300, 5, 0.2), (16, 500, 24, 0.08),
                                                      (64, 400, 10, 0.1), (72, 257, 3, 0.3)])
def test_stable_metrics_equal_the_reference(bits, ndb, classes, density):
    qc, dc, ql, dl = random_problem(bits, 40, ndb, bits, classes, density)
    ks = [1, 7, 50, 100, ndb]
    res = retrieval_metrics(qc, dc, ql, dl, map_ks=[50, 100], precision_ks=ks, batch_size=7)
    ref = reference_metrics(qc, dc, ql, dl, ks)
    np.testing.assert_array_equal(res.relevant, [r["R"] for r in ref])
    np.testing.assert_allclose(res.average_precision(), [r["ap"] for r in ref], rtol=0, atol=1e-12)
    for j, k in enumerate(ks):
        for rule in ("djsrh", "standard", "retrieved"):
            np.testing.assert_allclose(res.average_precision(k, rule=rule), [r[rule][j] for r in ref],
                                       rtol=0, atol=1e-12, err_msg=f"{rule} AP@{k}")
        assert res.precision_at(k) == pytest.approx(np.mean([r["p"][j] for r in ref]), abs=1e-12)
    # the wrappers agree with the one pass
    assert mean_average_precision(qc, dc, ql, dl) == pytest.approx(np.mean([r["ap"] for r in ref]), abs=1e-12)
    assert mean_average_precision(qc, dc, ql, dl, topk=50) == pytest.approx(
        np.mean([r["djsrh"][2] for r in ref]), abs=1e-12)
    assert precision_at_k(qc, dc, ql, dl, 7) == pytest.approx(np.mean([r["p"][1] for r in ref]), abs=1e-12)
    np.testing.assert_allclose(topn_precision(qc, dc, ql, dl, [100, 1]),
                               [np.mean([r["p"][3] for r in ref]), np.mean([r["p"][0] for r in ref])], atol=1e-12)


def test_histograms_and_pr_curve_match_the_distance_matrix():
    qc, dc, ql, dl = random_problem(3, 30, 200, 16, 6, 0.2)
    res = retrieval_metrics(qc, dc, ql, dl)
    dist = hamming_distances(qc, dc)
    rel = (ql.astype(int) @ dl.T.astype(int)) > 0
    for t in (0, 5, 8, 16):
        np.testing.assert_array_equal(res.hist_all[:, t], (dist == t).sum(1))
        np.testing.assert_array_equal(res.hist_rel[:, t], ((dist == t) & rel).sum(1))
    curve = pr_curve_hamming(qc, dc, ql, dl)
    within = dist[:, :, None] <= np.arange(17)
    retrieved, hits = within.sum(1), (within & rel[:, :, None]).sum(1)
    some = retrieved > 0
    expected_p = np.array([np.mean(hits[some[:, t], t] / retrieved[some[:, t], t]) if some[:, t].any() else np.nan
                           for t in range(17)])
    np.testing.assert_allclose(curve.precision, expected_p, atol=1e-12)
    has = rel.any(1)
    assert not has.all()  # a query without relevant items is left out of the recall average
    np.testing.assert_allclose(curve.recall, (hits[has] / rel[has].sum(1, keepdims=True)).mean(0), atol=1e-12)
    np.testing.assert_allclose(curve.coverage, some.mean(0))
    assert curve.recall[-1] == pytest.approx(1.0) and curve.coverage[-1] == 1.0


def test_known_answer_with_a_tie():
    # database distances 0, 1, 1, 2 from the query; rows 0 and 2 relevant.
    q = pack_codes(np.ones((1, 8)))
    db = pack_codes(np.array([[1] * 8, [-1] + [1] * 7, [1] * 7 + [-1], [-1, -1] + [1] * 6]))
    ql = np.array([[1, 0]], np.uint8)
    dl = np.array([[1, 0], [0, 1], [1, 1], [0, 1]], np.uint8)
    res = retrieval_metrics(q, db, ql, dl, map_ks=[2], precision_ks=[2])
    # stable order: rows 0, 1, 2, 3 → hits at ranks 1 and 3
    assert res.average_precision()[0] == pytest.approx((1 + 2 / 3) / 2)
    # the tie of rows 1 and 2 falls either way with probability 1/2: the second hit at rank 2 or 3
    assert res.average_precision(ties="expected")[0] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    assert res.precision_at(2) == 0.5 and res.precision_at(2, ties="expected") == pytest.approx(0.75)
    assert res.average_precision(2, rule="djsrh")[0] == pytest.approx((1 + 2 / 3) / 2)
    assert res.average_precision(2, rule="standard")[0] == pytest.approx(1 / 2)
    assert res.average_precision(2, rule="retrieved")[0] == pytest.approx(1.0)


def test_queries_without_relevant_items_score_zero_and_count():
    qc, dc, ql, dl = random_problem(5, 6, 50, 16, 4, 0.4)
    ql[2] = 0
    res = retrieval_metrics(qc, dc, ql, dl, map_ks=[10])
    assert res.relevant[2] == 0 and res.ap[2] == 0 and res.ap_expected[2] == 0
    assert res.mean_average_precision() == pytest.approx(res.ap.sum() / 6)
    assert res.average_precision(10, ties="expected")[2] == 0


def test_more_than_64_classes_use_several_label_words():
    rng = np.random.default_rng(0)
    qc, dc = pack_codes(rng.standard_normal((4, 16))), pack_codes(rng.standard_normal((40, 16)))
    ql, dl = np.zeros((4, 70), np.uint8), np.zeros((40, 70), np.uint8)
    ql[:, 68] = 1
    dl[::3, 68] = 1
    dl[1::3, 3] = 1
    res = retrieval_metrics(qc, dc, ql, dl)
    np.testing.assert_array_equal(res.relevant, [14] * 4)


def test_batching_does_not_change_results():
    qc, dc, ql, dl = random_problem(9, 50, 300, 32, 8, 0.15)
    a = retrieval_metrics(qc, dc, ql, dl, map_ks=[20], precision_ks=[5, 100], batch_size=4)
    b = retrieval_metrics(qc, dc, ql, dl, map_ks=[20], precision_ks=[5, 100], batch_size=1000)
    for name in ("ap", "ap_expected", "hits_k", "hit_sum_k_expected", "hist_all"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


# -- tie-aware expectations ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_expected_metrics_equal_brute_force_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    ndb, bits = 6, 8
    # few distinct codes, so the database has large ties
    base = rng.standard_normal((3, bits))
    dc = pack_codes(base[rng.integers(0, 3, ndb)])
    qc = pack_codes(np.vstack([base[:1], rng.standard_normal((2, bits))]))
    ql = (rng.random((3, 3)) < 0.5).astype(np.uint8)
    ql[:, 0] = 1
    dl = (rng.random((ndb, 3)) < 0.4).astype(np.uint8)
    ks = [1, 2, 3, 5, 6]
    res = retrieval_metrics(qc, dc, ql, dl, map_ks=ks, precision_ks=ks)
    dist = hamming_distances(qc, dc)
    for i in range(3):
        rel = (dl.astype(int) @ ql[i].astype(int)) > 0
        want = brute_force_expected(dist[i].astype(float), rel, ks)
        assert res.ap_expected[i] == pytest.approx(want["ap"], abs=1e-12)
        for j, k in enumerate(ks):
            assert res.precision_at(k, "expected") is not None
            assert res.hits_k_expected[i, j] / k == pytest.approx(want["p"][j], abs=1e-12)
            for rule in ("djsrh", "standard"):
                assert res.average_precision(k, "expected", rule)[i] == pytest.approx(want[rule][j], abs=1e-12), \
                    (rule, k)


def _direct_expected_ap(dist: np.ndarray, rel: np.ndarray) -> float:
    """Tie-aware AP@all by the per-position formula summed term by term (no harmonic numbers)."""
    total, a, b = 0.0, 0, 0
    for d in np.unique(dist):
        n, r = int((dist == d).sum()), int(rel[dist == d].sum())
        if r:
            p = np.arange(1, n + 1, dtype=np.float64)
            c1 = (r - 1) / (n - 1) if n > 1 else 0.0
            total += r / n * np.sum((b + 1 + (p - 1) * c1) / (a + p))
        a, b = a + n, b + r
    return total / rel.sum()


def test_expected_ap_on_large_buckets_uses_harmonic_numbers_correctly():
    # 4-bit codes over 3,000 items: buckets of hundreds of items take the harmonic-number path
    qc, dc, ql, dl = random_problem(11, 5, 3000, 8, 5, 0.2)
    dc = pack_codes(np.where(unpack_codes(dc)[:, :8] * np.array([1, 1, 1, 1, 0, 0, 0, 0]) > 0, 1, -1))
    res = retrieval_metrics(qc, dc, ql, dl)
    dist = hamming_distances(qc, dc)
    assert np.bincount(dist.ravel()).max() > 256
    for i in range(5):
        rel = (dl.astype(int) @ ql[i].astype(int)) > 0
        assert res.ap_expected[i] == pytest.approx(_direct_expected_ap(dist[i], rel), rel=1e-11)


def _negative_hypergeometric_first_hits(a: int, b: int, n: int, r: int, m: int) -> float:
    """E[Σ_{j<=m} (b + j) / (a + pos_j)] from the distribution of the j-th hit's position."""
    p = np.arange(1, n + 1)
    lchoose = lambda x, y: gammaln(x + 1) - gammaln(y + 1) - gammaln(x - y + 1)  # noqa: E731
    total = 0.0
    for j in range(1, m + 1):
        ok = (p >= j) & (n - p >= r - j)
        pmf = np.zeros(n)
        pmf[ok] = np.exp(lchoose(p[ok] - 1, j - 1) + lchoose(n - p[ok], r - j) - lchoose(n, r))
        total += (b + j) * np.sum(pmf / (a + p))
    return total


def test_expected_djsrh_ap_at_k_in_a_large_bucket():
    # one query, every database item at distance 0: the K-th hit falls inside one 400-item bucket
    n, r, k = 400, 37, 10
    dl = np.zeros((n, 1), np.uint8)
    dl[np.random.default_rng(0).choice(n, r, replace=False)] = 1
    codes = np.zeros((n, 1), np.uint8)
    res = retrieval_metrics(codes[:1], codes, np.ones((1, 1), np.uint8), dl, map_ks=[k])
    want = _negative_hypergeometric_first_hits(0, 0, n, r, k) / k
    assert res.average_precision(k, "expected", "djsrh")[0] == pytest.approx(want, rel=1e-12)
    # and AP@all of a random order: the chance level
    assert res.ap_expected[0] == pytest.approx(_direct_expected_ap(np.zeros(n), dl[:, 0] > 0), rel=1e-12)


def test_expected_equals_stable_without_ties():
    # 3 database items at distances 0, 1, 2: nothing to break
    q = pack_codes(np.ones((1, 8)))
    db = pack_codes(np.array([[1] * 8, [-1] + [1] * 7, [-1, -1] + [1] * 6]))
    res = retrieval_metrics(q, db, np.ones((1, 1), np.uint8), np.array([[0], [1], [1]], np.uint8), map_ks=[2])
    assert res.ap_expected[0] == pytest.approx(res.ap[0]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert res.average_precision(2, "expected") == pytest.approx(res.average_precision(2))


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input_fails_with_a_clear_message():
    qc, dc, ql, dl = random_problem(1, 3, 20, 16, 4, 0.3)
    with pytest.raises(MetricError, match="bits"):
        retrieval_metrics(qc, dc[:, :1], ql, dl)
    with pytest.raises(MetricError, match="classes"):
        retrieval_metrics(qc, dc, ql[:, :3], dl)
    with pytest.raises(MetricError, match="one row per code"):
        retrieval_metrics(qc, dc, ql[:2], dl)
    with pytest.raises(MetricError, match="packed codes"):
        retrieval_metrics(unpack_codes(qc), dc, ql, dl)
    with pytest.raises(MetricError, match="1..20"):
        retrieval_metrics(qc, dc, ql, dl, precision_ks=[21])
    res = retrieval_metrics(qc, dc, ql, dl, map_ks=[5], precision_ks=[10])
    with pytest.raises(MetricError, match="no closed-form"):
        res.average_precision(5, ties="expected", rule="retrieved")
    with pytest.raises(MetricError, match="not computed"):
        res.average_precision(10, ties="expected", rule="djsrh")
    with pytest.raises(MetricError, match="was not computed"):
        res.average_precision(7)
    with pytest.raises(MetricError, match="choose one of"):
        res.average_precision(ties="random")
