"""Retrieval metrics: the fused kernel against the plain per-query definition (cfrh.metrics.reference_metrics:
float distances + a stable argsort), the default mAP@K against a hand-worked example and a transcription of the
field's calculate_top_map, and the tie-aware values against brute force."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.special import gammaln
from scipy.stats import hypergeom

from cfrh.codes import hamming_distances, pack_codes, unpack_codes
from cfrh.metrics import (RULES, MetricError, map_k_rule, mean_average_precision, pr_curve_hamming, precision_at_k,
                          reference_metrics, reference_query, retrieval_metrics, topn_precision)


def brute_force_expected(dist: np.ndarray, relevant: np.ndarray, ks: list[int]) -> dict:
    """Mean of the stable-rule metrics over every permutation of the database (so over every order of
    equal-distance items, each equally often)."""
    runs = [reference_query(dist[list(p)], relevant[list(p)], ks) for p in itertools.permutations(range(len(dist)))]
    return {key: np.mean([r[key] for r in runs], axis=0) for key in ("ap", "p", *RULES)}


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
        for rule in RULES:
            np.testing.assert_allclose(res.average_precision(k, rule=rule), [r[rule][j] for r in ref],
                                       rtol=0, atol=1e-12, err_msg=f"{rule} AP@{k}")
        assert res.precision_at(k) == pytest.approx(np.mean([r["p"][j] for r in ref]), abs=1e-12)
    # the wrappers agree with the one pass
    assert mean_average_precision(qc, dc, ql, dl) == pytest.approx(np.mean([r["ap"] for r in ref]), abs=1e-12)
    assert mean_average_precision(qc, dc, ql, dl, topk=50) == pytest.approx(
        np.mean([r["hits-in-top-k"][2] for r in ref]), abs=1e-12)
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
    assert res.average_precision(2, rule="first-k-relevant")[0] == pytest.approx((1 + 2 / 3) / 2)
    assert res.average_precision(2, rule="min-k-relevant")[0] == pytest.approx(1 / 2)
    assert res.average_precision(2, rule="hits-in-top-k")[0] == pytest.approx(1.0)
    assert res.average_precision(2)[0] == pytest.approx(1.0)  # the default
    # the old names of the last two are aliases; the old "djsrh" is refused with the story
    assert res.average_precision(2, rule="standard")[0] == pytest.approx(1 / 2)
    assert res.average_precision(2, rule="retrieved")[0] == pytest.approx(1.0)
    with pytest.raises(MetricError, match="first-k-relevant.*hits-in-top-k"):
        res.average_precision(2, rule="djsrh")


# -- the field's mAP@K, by hand and as its code computes it --------------------------------------
def top_map_as_the_field_computes_it(query_pm1: np.ndarray, db_pm1: np.ndarray, query_labels: np.ndarray,
                                     db_labels: np.ndarray, topk: int) -> float:
    """The arithmetic of calculate_top_map (DJSRH metric.py, UCMFH evaluate.py; ADSH's calc_topMap is the
    same), restated: per query, relevance = a shared label, Hamming distance = (bits − ⟨q, b⟩) / 2 over ±1
    codes, rank by distance, keep the first ``topk``; with h hits among them at positions t_1 < … < t_h,
    the query scores mean(j / t_j) (0 when h = 0, and it still counts); the result is the mean over queries.
    Their sort is np.argsort's default, which is not stable; a stable one is used here, which is the tie
    order cfrh fixes (database order)."""
    bits = db_pm1.shape[1]
    total = 0.0
    for code, labels in zip(query_pm1, query_labels):
        relevant = (db_labels @ labels) > 0
        distance = 0.5 * (bits - db_pm1 @ code)
        in_top = relevant[np.argsort(distance, kind="stable")][:topk]
        hits = int(in_top.sum())
        if hits:
            total += np.mean(np.arange(1, hits + 1) / (np.flatnonzero(in_top) + 1.0))
    return total / len(query_pm1)


def test_default_map_at_k_is_the_fields_calculate_top_map_on_a_hand_worked_example():
    # One query code, all +1 (8 bits); database row j has d_j of its first bits flipped, so its distance is d_j.
    # Ranked by (distance, row): row1 (d 0), row0 and row3 (d 1, tied), row2 and row5 (d 2, tied), row4 (d 3),
    # i.e. ranks row1:1, row0:2, row3:3, row2:4, row5:5, row4:6.
    d = [1, 0, 2, 1, 3, 2]
    db_pm1 = np.array([[-1] * dj + [1] * (8 - dj) for dj in d])
    db_labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0]], np.uint8)
    # A: relevant rows 0, 2, 4 (ranks 2, 4, 6); B: rows 1, 5 (ranks 1, 5); C: row 4 only (rank 6: none in the top 4)
    query_labels = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.uint8)
    query_pm1 = np.ones((3, 8))
    k = 4
    res = retrieval_metrics(pack_codes(query_pm1), pack_codes(db_pm1), query_labels, db_labels, map_ks=[k])

    # by hand, the field's rule: mean of j / t_j over the hits in the top 4
    by_hand = {"A": (1 / 2 + 2 / 4) / 2, "B": 1 / 1, "C": 0.0}
    np.testing.assert_allclose(res.average_precision(k), list(by_hand.values()), rtol=0, atol=1e-15)
    assert res.mean_average_precision(k) == pytest.approx(1 / 2, abs=1e-15)
    # ... equals the field's code, restated
    field = top_map_as_the_field_computes_it(query_pm1, db_pm1, query_labels, db_labels, k)
    assert field == pytest.approx(1 / 2, abs=1e-15)
    assert res.mean_average_precision(k) == pytest.approx(field, abs=1e-15)

    # the other two rules, by hand: they are not the field's mAP@K
    first_k = {"A": (1 / 2 + 2 / 4 + 3 / 6) / 3, "B": (1 / 1 + 2 / 5) / 2, "C": (1 / 6) / 1}
    min_k = {"A": (1 / 2 + 2 / 4) / 3, "B": (1 / 1) / 2, "C": 0.0}
    np.testing.assert_allclose(res.average_precision(k, rule="first-k-relevant"), list(first_k.values()), atol=1e-15)
    np.testing.assert_allclose(res.average_precision(k, rule="min-k-relevant"), list(min_k.values()), atol=1e-15)
    assert res.mean_average_precision(k, rule="first-k-relevant") == pytest.approx(41 / 90)  # the old "djsrh": .456

    # tie-aware: every order of the two ties, equally likely. A: row0 at rank 2 or 3, row2 at rank 4 or 5 →
    # (1/2+2/4)/2, 1/2, (1/3+2/4)/2, 1/3; B: row5 at rank 5 or 4 → 1, (1+2/4)/2; C: no tie it could win.
    tie_aware = {"A": ((1 / 2 + 2 / 4) / 2 + 1 / 2 + (1 / 3 + 2 / 4) / 2 + 1 / 3) / 4, "B": (1 + (1 + 2 / 4) / 2) / 2,
                 "C": 0.0}
    np.testing.assert_allclose(res.average_precision(k, ties="expected"), list(tie_aware.values()), atol=1e-15)
    assert res.mean_average_precision(k, ties="expected") == pytest.approx(7 / 16, abs=1e-15)


def test_reference_and_kernel_agree_with_the_fields_code_on_random_codes():
    qc, dc, ql, dl = random_problem(21, 30, 400, 16, 6, 0.15)
    qpm, dpm = unpack_codes(qc).astype(float), unpack_codes(dc).astype(float)
    for k in (1, 10, 50):
        field = top_map_as_the_field_computes_it(qpm, dpm, ql.astype(float), dl.astype(float), k)
        assert mean_average_precision(qc, dc, ql, dl, topk=k) == pytest.approx(field, abs=1e-12)
        assert np.mean([r["hits-in-top-k"][0] for r in reference_metrics(qc, dc, ql, dl, [k])]) == \
            pytest.approx(field, abs=1e-12)


def test_rule_names_and_aliases():
    assert [map_k_rule(r) for r in RULES] == list(RULES)
    assert map_k_rule("retrieved") == "hits-in-top-k" and map_k_rule("standard") == "min-k-relevant"
    with pytest.raises(MetricError, match="misnomer"):
        map_k_rule("djsrh")


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
            for rule in RULES:
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


def test_expected_first_k_relevant_ap_at_k_in_a_large_bucket():
    # one query, every database item at distance 0: the K-th hit falls inside one 400-item bucket
    n, r, k = 400, 37, 10
    dl = np.zeros((n, 1), np.uint8)
    dl[np.random.default_rng(0).choice(n, r, replace=False)] = 1
    codes = np.zeros((n, 1), np.uint8)
    res = retrieval_metrics(codes[:1], codes, np.ones((1, 1), np.uint8), dl, map_ks=[k])
    want = _negative_hypergeometric_first_hits(0, 0, n, r, k) / k
    assert res.average_precision(k, "expected", "first-k-relevant")[0] == pytest.approx(want, rel=1e-12)
    # the field's "hits-in-top-k" AP@300 of the same random order (300 > 256: the harmonic-number path): h hits
    # in the top 300 are hypergeometric, and given h they are a uniform h-subset of the 300 positions
    k_top = 300
    res = retrieval_metrics(codes[:1], codes, np.ones((1, 1), np.uint8), dl, map_ks=[k_top])
    hits = np.arange(1, r + 1)
    want = np.sum(hypergeom(n, r, k_top).pmf(hits)
                  * [_negative_hypergeometric_first_hits(0, 0, k_top, h, h) / h for h in hits])
    assert res.average_precision(k_top, "expected")[0] == pytest.approx(want, rel=1e-11)
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
    with pytest.raises(MetricError, match="not computed"):
        res.average_precision(10, ties="expected", rule="first-k-relevant")
    with pytest.raises(MetricError, match="not computed"):
        res.average_precision(10, ties="expected")
    with pytest.raises(MetricError, match="choose one of hits-in-top-k"):
        res.average_precision(5, rule="mean")
    with pytest.raises(MetricError, match="was not computed"):
        res.average_precision(7)
    with pytest.raises(MetricError, match="choose one of"):
        res.average_precision(ties="random")


# -- the rule in the [evaluate] table ----------------------------------------------------------------
def test_evaluate_config_takes_rule_names_and_old_aliases_and_explains_djsrh():
    from cfrh.config import ConfigError
    from cfrh.evaluation import EvaluateConfig

    assert EvaluateConfig.from_dict({}).map_k_rule == "hits-in-top-k"
    assert EvaluateConfig.from_dict({"map_k_rule": "standard"}).map_k_rule == "min-k-relevant"
    assert EvaluateConfig.from_dict({"map_k_rule": "first-k-relevant"}).map_k_rule == "first-k-relevant"
    with pytest.raises(ConfigError, match=r"\[evaluate\]: evaluate.map_k_rule 'djsrh' was a misnomer"):
        EvaluateConfig.from_dict({"map_k_rule": "djsrh"})
    with pytest.raises(ConfigError, match="choose one of hits-in-top-k"):
        EvaluateConfig.from_dict({"map_k_rule": ["hits-in-top-k"]})


@pytest.mark.parametrize("name", ["coco", "mirflickr25k", "nuswide", "wiki", "uci-mfeat"])
def test_packaged_pipelines_use_the_fields_rule(name):
    from cfrh.config import load_pipeline
    from cfrh.evaluation import EvaluateConfig

    assert EvaluateConfig.from_dict(load_pipeline(name).evaluate).map_k_rule == "hits-in-top-k"
