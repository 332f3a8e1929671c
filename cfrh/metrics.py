"""Retrieval metrics over packed codes: mAP@all, mAP@K, precision@K, top-N precision, PR over Hamming radius.

Everything comes from one fused numba pass per query (parallel over queries), which never
materialises a query × database distance matrix, so a 2,100 × 190,000 evaluation needs a few
MB besides the codes. Per query:

1. one pass over the database in row order: Hamming distance (XOR + popcount,
   :func:`cfrh.codes.popcount64`), relevance (the query and item share a label: AND of packed
   label words), a per-distance histogram of all and of relevant items;
2. a second pass in row order with per-distance running counters gives every relevant item's
   exact rank and hit number without sorting: rank = (items at smaller distances) + (items at
   the same distance up to this row), hit = the same count over relevant items (counted in a
   third pass over the relevant items alone, which the second lists without branching).

**Tie rule** (``ties="stable"``): items at equal Hamming distance keep database order, i.e. the
ranking is by (distance, database row). This is what a stable sort gives; the field's
``np.argsort`` (``calculate_top_map``, ``calc_map``) and ``torch.sort`` (``calc_map_k``) are not
stable, so their ties fall in an implementation-defined order and their numbers can move with it.
``ties="expected"`` gives the tie-aware value instead: the expectation over all orders of
equal-distance items (McSherry & Najork, ECIR 2008), in closed form from the per-distance counts.
For a bucket of ``n`` items, ``r`` relevant, after ``A`` items of which ``B`` relevant, position ``p``
of the bucket holds a relevant item with probability r/n, and then the expected number of hits up to
it is ``B + 1 + (p-1)(r-1)/(n-1)`` (hypergeometric), so the bucket adds
``(r/n) Σ_p (B + 1 + (p-1)(r-1)/(n-1)) / (A + p)`` to AP's numerator (a harmonic-number difference).
The "hits-in-top-k" AP@K divides by a count that the tie order changes only in the bucket holding
rank K: given h relevant items among that bucket's ``take`` positions inside the top K (h is
hypergeometric), they are spread uniformly over those positions, so the expectation is a sum over h
of P(h) · (the expected sum so far + the bucket's share for h hits) / (B + h).

**Definitions** (relevant = shares at least one label; R = relevant items in the database):

* AP@all = (1/R) Σ over relevant items of hit/rank. A query with R = 0 scores 0 and still counts
  in the mean, as DCMH/DJSRH/JDSH's ``calc_map``/``calculate_map`` do.
* AP@K has three conventions in the field, each named after what it computes (``rule``;
  :data:`RULE_DEFINITIONS` holds the one-line text the reports print):

  - ``"hits-in-top-k"`` (default): Σ over the relevant items ranked ≤ K of hit/rank, divided by the
    number of them (a query with none in the top K scores 0 and counts). This is the field's
    ``calculate_top_map(qu_B, re_B, qu_L, re_L, topk)``, read in DJSRH's ``metric.py``
    (zzs1994/DJSRH) and UCMFH's ``evaluate.py`` and called with ``topk=50`` by DJSRH's ``train.py``,
    JDSH's ``JDSH.py`` and DGCPN's training script, and ADSH's ``calc_topMap``
    (jiangqy/ADSH-AAAI2018, ``ADSH_pytorch/utils/calc_hr.py``): what their mAP@50 tables report;
  - ``"first-k-relevant"``: the mean of hit/rank over the first min(K, R) relevant items, wherever
    they rank: ``calc_map_k(qB, rB, query_L, retrieval_L, k)`` of the PyTorch DCMH-style utilities
    (e.g. DarrenZZhang/MM23-MITH ``utils/calc_utils.py``). It was cfrh's default under the name
    "djsrh" until it turned out not to be DJSRH's rule. The two are far apart: mAP@50 of
    random-projection codes, image→image, is .526 against .445 on UCI Multiple Features (16 bits),
    .208 against .150 on WIKI (64 bits);
  - ``"min-k-relevant"``: Σ over the relevant items ranked ≤ K of hit/rank, divided by min(K, R): the
    IR textbook AP@K (e.g. Hamner's ``ml_metrics.apk``).

  The old names ``"retrieved"`` (= "hits-in-top-k") and ``"standard"`` (= "min-k-relevant") are
  accepted as aliases; ``"djsrh"`` is refused with an explanation (:func:`map_k_rule`).

* P@K = relevant items among the top K / K; top-N precision is P@N over a list of N.
* PR over Hamming radius t = 0..bits: precision(t) = hits within radius t / items within radius t,
  averaged over the queries that retrieve something at that radius; recall(t) = hits within t / R,
  averaged over queries with R > 0.

:func:`reference_metrics` is the plain definition of all of these, one query at a time (float
distances, a stable argsort): slow, kept for checks (the tests and ``benchmarks/evaluate.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numba
import numpy as np
from scipy.special import digamma

from .codes import as_words, popcount64, unpack_codes
from .errors import CfrhError

RULES = ("hits-in-top-k", "first-k-relevant", "min-k-relevant")  # the first is the default everywhere
RULE_ALIASES = {"retrieved": "hits-in-top-k", "standard": "min-k-relevant"}  # the names they had before
RULE_DEFINITIONS = {
    "hits-in-top-k": "sum of hit/rank over the relevant items in the top K, / the number of them (0 when none): "
                     "the field's calculate_top_map (DJSRH metric.py, UCMFH evaluate.py; used by DJSRH, JDSH, "
                     "DGCPN, UCMFH for mAP@50) and ADSH's calc_topMap",
    "first-k-relevant": "mean hit/rank over the first min(K, R) relevant items, wherever they rank: calc_map_k "
                        "(PyTorch DCMH-style utilities, e.g. MITH utils/calc_utils.py)",
    "min-k-relevant": "sum of hit/rank over the relevant items in the top K, / min(K, R): the IR textbook AP@K "
                      "(ml_metrics apk)",
}
TIES = ("stable", "expected")
_DIRECT_SUM = 256  # bucket sums over at most this many positions are summed term by term (exact)
_MAX_BITS = 2**15 - 1  # distances and the relevance bit share a uint16 per database item


class MetricError(CfrhError, ValueError):
    """Codes, labels or cut-offs that do not fit together; the message says which and how."""


# -- the fused kernel ------------------------------------------------------------------------------
@numba.njit(cache=True, inline="always")
def _bucket_sum(a: int, b: int, n: int, r: int, m: int, harmonic: np.ndarray) -> float:
    """Σ_{p=1..m} (r/n)(b + 1 + (p-1)(r-1)/(n-1)) / (a + p): the tie-aware precision sum of the first m
    positions of a bucket of n items (r relevant) that follows a items (b relevant)."""
    if r == 0 or m <= 0:
        return 0.0
    c1 = (r - 1) / (n - 1) if n > 1 else 0.0
    c0 = b + 1.0 - c1
    if m <= _DIRECT_SUM:
        s = 0.0
        for p in range(1, m + 1):
            s += (c0 + c1 * p) / (a + p)
    else:
        s = c1 * m + (c0 - c1 * a) * (harmonic[a + m] - harmonic[a])
    return s * r / n


@numba.njit(cache=True)
def _first_hits_partial(a: int, b: int, n: int, r: int, mp: int) -> float:
    """E[Σ_{j=1..mp} (b + j) / (a + pos_j)] where pos_j is the position of the j-th relevant item of a
    bucket of n items (r relevant, mp < r) in a uniformly random order: the tie-aware share of the
    bucket in which the "first-k-relevant" AP@K stops counting. A Markov chain over hits-so-far (< mp): O(mp) per
    position until the mp-th hit is (almost surely) found, about mp·n/r positions — so O(n·K) at worst,
    for a huge tie holding few relevant items (e.g. collapsed codes)."""
    prob = np.zeros(mp)
    prob[0] = 1.0
    total = 0.0
    for p in range(1, n - r + mp + 1):
        remaining = n - p + 1
        s = 0.0
        for l in range(min(mp - 1, p - 1), -1, -1):
            move = prob[l] * (r - l) / remaining
            s += move * (b + l + 1)
            prob[l] -= move
            if l + 1 < mp:
                prob[l + 1] += move
        total += s / (a + p)
        # Stop once the chance of fewer than mp hits so far is negligible: each later step adds at most that
        # chance (a precision is <= 1), and summing it (not 1 − absorbed mass) keeps it accurate near zero.
        alive = 0.0
        for l in range(min(mp, p + 1)):
            alive += prob[l]
        if alive < 1e-17 / mp:
            break
    return total


@numba.njit(cache=True)
def _hits_in_top_k_expected(a: int, b: int, n: int, r: int, take: int, before: float, harmonic: np.ndarray) -> float:
    """E[AP@K] under the "hits-in-top-k" rule when rank K falls in a bucket of n items (r relevant) that
    follows a items (b relevant) whose expected hit/rank sum is ``before``, and ``take`` = K − a of its
    positions are in the top K. The bucket's hits h among those positions are hypergeometric; given h,
    they are spread uniformly over the ``take`` positions (:func:`_bucket_sum` with n = take, r = h), and
    the order of the earlier buckets does not depend on h. P(h) comes from the ratio of consecutive
    terms, summed in log space and normalised, so no binomial coefficient of a large n is ever formed."""
    lo, hi = max(0, take - (n - r)), min(r, take)
    logp = np.zeros(hi - lo + 1)
    for x in range(lo, hi):
        logp[x - lo + 1] = logp[x - lo] + np.log((r - x) * (take - x)) - np.log((x + 1) * (n - r - take + x + 1))
    top = logp.max()
    weights = np.exp(logp - top)
    weights /= weights.sum()
    total = 0.0
    for x in range(lo, hi + 1):
        if b + x > 0:
            total += weights[x - lo] * (before + _bucket_sum(a, b, take, x, take, harmonic)) / (b + x)
    return total


@numba.njit(cache=True)
def _distance_relevance(qc, dc, ql, dl, buf):
    """buf[j] = 2 · Hamming distance + relevance of database item j (a loop LLVM vectorises)."""
    ndb, nw, nlw = dc.shape[0], dc.shape[1], dl.shape[1]
    if nw == 1 and nlw == 1:  # codes of <= 64 bits and <= 64 classes: the common case, one word each
        q0, l0 = qc[0], ql[0]
        for j in range(ndb):
            buf[j] = np.uint16(popcount64(q0 ^ dc[j, 0]) * 2 + ((l0 & dl[j, 0]) != 0))
    else:  # word by word over the whole database: each inner loop vectorises like the one-word case
        for j in range(ndb):
            buf[j] = np.uint16((ql[0] & dl[j, 0]) != 0)
        for w in range(1, nlw):
            lw = ql[w]
            for j in range(ndb):
                buf[j] |= np.uint16((lw & dl[j, w]) != 0)
        for w in range(nw):
            qw = qc[w]
            for j in range(ndb):
                buf[j] += np.uint16(popcount64(qw ^ dc[j, w]) * 2)


@numba.njit(cache=True)
def _histogram(buf, nv):
    """Counts of each value of buf; four interleaved tables keep increments from waiting on each other."""
    h = np.zeros((4, nv), np.int64)
    n4 = buf.shape[0] // 4 * 4
    for j in range(0, n4, 4):
        h[0, buf[j]] += 1
        h[1, buf[j + 1]] += 1
        h[2, buf[j + 2]] += 1
        h[3, buf[j + 3]] += 1
    for j in range(n4, buf.shape[0]):
        h[0, buf[j]] += 1
    return h[0] + h[1] + h[2] + h[3]


@numba.njit(parallel=True, cache=True)
def _retrieval_kernel(q_codes, db_codes, q_labels, db_labels, ks, is_map_k, harmonic,
                      n_rel, ap, ap_exp, hits_k, rank_sum_k, hit_sum_k, hits_k_exp, std_sum_k_exp, first_sum_k_exp,
                      top_ap_k_exp, hist_all, hist_rel, n_threads):  # pragma: no cover - compiled
    nq = q_codes.shape[0]
    ndb = db_codes.shape[0]
    nb = hist_all.shape[1]
    nk = ks.shape[0]
    kmax = ks[nk - 1] if nk > 0 else 0
    # one pair of database-sized buffers per thread, reused across its queries (no allocation per query)
    nt = max(1, min(nq, n_threads))
    for t in numba.prange(nt):
        buf = np.empty(ndb, np.uint16)
        found = np.empty(ndb, np.int64)
        for i in range(t * nq // nt, (t + 1) * nq // nt):
            # pass 1: v = 2 · distance + relevance for every database item, and the histogram of v
            _distance_relevance(q_codes[i], db_codes, q_labels[i], db_labels, buf)
            h = _histogram(buf, 2 * nb)
            cnt = h[0::2] + h[1::2]
            rel = h[1::2].copy()
            before = np.zeros(nb, np.int64)
            before_rel = np.zeros(nb, np.int64)
            for d in range(1, nb):
                before[d] = before[d - 1] + cnt[d - 1]
                before_rel[d] = before_rel[d - 1] + rel[d - 1]
            total_rel = before_rel[nb - 1] + rel[nb - 1]
            hist_all[i] = cnt
            hist_rel[i] = rel
            n_rel[i] = total_rel
            if total_rel == 0:
                continue  # outputs were zeroed by the caller

            # pass 2, in database order: a running count per distance gives every item its position among the
            # items at its distance; relevant items append (distance, position) to a list, without a branch
            seen = np.zeros(nb, np.int64)
            n_found = 0
            for j in range(ndb):
                v = buf[j]
                d = v >> 1
                seen[d] += 1
                found[n_found] = (np.int64(d) << 48) | seen[d]
                n_found += v & 1
            # pass 3, over the relevant items in database order: exact rank and hit number under the stable rule
            seen_rel = np.zeros(nb, np.int64)
            k_hits = np.zeros(nk + 1, np.int64)
            k_rank_sum = np.zeros(nk + 1)
            k_hit_sum = np.zeros(nk + 1)
            s = 0.0
            for f in range(n_found):
                d = found[f] >> 48
                seen_rel[d] += 1
                hit = before_rel[d] + seen_rel[d]
                rank = before[d] + (found[f] & 0xFFFFFFFFFFFF)
                prec = hit / rank
                s += prec
                if rank <= kmax:  # first K with K >= rank
                    lo = 0
                    while ks[lo] < rank:
                        lo += 1
                    k_hits[lo] += 1
                    k_rank_sum[lo] += prec
                if hit <= kmax:
                    lo = 0
                    while ks[lo] < hit:
                        lo += 1
                    k_hit_sum[lo] += prec
            ap[i] = s / total_rel
            acc_h = 0
            acc_r = 0.0
            acc_f = 0.0
            for k in range(nk):
                acc_h += k_hits[k]
                acc_r += k_rank_sum[k]
                acc_f += k_hit_sum[k]
                hits_k[i, k] = acc_h
                rank_sum_k[i, k] = acc_r
                hit_sum_k[i, k] = acc_f

            # tie-aware expectations from the histograms alone
            full = np.zeros(nb)
            e = 0.0
            for d in range(nb):
                full[d] = _bucket_sum(before[d], before_rel[d], cnt[d], rel[d], cnt[d], harmonic)
                e += full[d]
            ap_exp[i] = e / total_rel
            for k in range(nk):
                kk = ks[k]
                m = min(kk, total_rel)
                h = 0.0
                std = 0.0
                first = 0.0
                top = 0.0
                for d in range(nb):
                    a, b, n, r = before[d], before_rel[d], cnt[d], rel[d]
                    if n == 0:
                        continue
                    if a < kk:  # this bucket reaches into the top K
                        take = min(n, kk - a)
                        if is_map_k[k] and a + n >= kk:  # ... and holds rank K: std is the sum before it
                            top = _hits_in_top_k_expected(a, b, n, r, take, std, harmonic)
                        h += take * r / n
                        std += full[d] if take == n else _bucket_sum(a, b, n, r, take, harmonic)
                    if is_map_k[k] and b < m:  # this bucket holds some of the first m hits
                        first += full[d] if b + r <= m else _first_hits_partial(a, b, n, r, m - b)
                hits_k_exp[i, k] = h
                std_sum_k_exp[i, k] = std
                first_sum_k_exp[i, k] = first if is_map_k[k] else np.nan
                top_ap_k_exp[i, k] = top if is_map_k[k] else np.nan


# -- results ---------------------------------------------------------------------------------------
@dataclass
class PRCurve:
    """Precision and recall at every Hamming radius 0..bits (see the module docstring for the averaging)."""

    radius: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    coverage: np.ndarray  # fraction of queries that retrieve at least one item within the radius

    def to_dict(self) -> dict[str, list]:
        """Plain lists for JSON; an undefined precision (no query retrieves anything) becomes None."""
        return {k: [None if v != v else v for v in getattr(self, k).tolist()]
                for k in ("radius", "precision", "recall", "coverage")}


@dataclass
class RetrievalResult:
    """Per-query outcomes of one fused pass; methods reduce them to the field's numbers.

    ``ks`` holds every cut-off asked for (sorted); columns of the ``*_k`` arrays follow it."""

    ks: np.ndarray
    relevant: np.ndarray          # (nq,) relevant database items per query (R)
    ap: np.ndarray                # (nq,) AP@all, stable tie rule
    ap_expected: np.ndarray       # (nq,) AP@all, tie-aware
    hits_k: np.ndarray            # (nq, nk) relevant items in the top K, stable
    rank_sum_k: np.ndarray        # (nq, nk) Σ hit/rank over relevant items ranked <= K, stable
    hit_sum_k: np.ndarray         # (nq, nk) Σ hit/rank over the first K hits, stable
    hits_k_expected: np.ndarray   # (nq, nk) tie-aware hits in the top K
    rank_sum_k_expected: np.ndarray
    hit_sum_k_expected: np.ndarray  # NaN for cut-offs not asked for as mAP@K (it costs a Markov chain)
    hits_in_top_k_ap_expected: np.ndarray  # (nq, nk) tie-aware "hits-in-top-k" AP@K; NaN as above
    hist_all: np.ndarray          # (nq, bits + 1) items at each Hamming distance
    hist_rel: np.ndarray          # (nq, bits + 1) relevant items at each Hamming distance

    @property
    def n_queries(self) -> int:
        return int(self.relevant.shape[0])

    def _column(self, k: int) -> int:
        where = np.flatnonzero(self.ks == k)
        if not where.size:
            raise MetricError(f"K = {k} was not computed; pass it in ks (have {self.ks.tolist()})")
        return int(where[0])

    def average_precision(self, k: int | None = None, ties: str = "stable", rule: str = RULES[0]) -> np.ndarray:
        """(nq,) AP@all (``k=None``) or AP@K under ``rule`` (see :data:`RULES`); queries without relevant items
        score 0."""
        _check_choice("ties", ties, TIES)
        rule = map_k_rule(rule)
        expected = ties == "expected"
        if k is None:
            return self.ap_expected if expected else self.ap
        c = self._column(k)
        if expected:
            column = {"hits-in-top-k": self.hits_in_top_k_ap_expected, "first-k-relevant": self.hit_sum_k_expected}
            if rule in column and np.isnan(column[rule][:, c]).any():
                raise MetricError(f"the tie-aware {rule!r} AP@{k} was not computed; pass K in map_ks")
            if rule == "hits-in-top-k":
                return self.hits_in_top_k_ap_expected[:, c].copy()
        if rule == "hits-in-top-k":
            num, denominator = self.rank_sum_k[:, c], self.hits_k[:, c].astype(np.float64)
        else:
            denominator = np.minimum(k, self.relevant).astype(np.float64)
            sums = {"first-k-relevant": (self.hit_sum_k, self.hit_sum_k_expected),
                    "min-k-relevant": (self.rank_sum_k, self.rank_sum_k_expected)}[rule]
            num = sums[expected][:, c]
        return np.divide(num, denominator, out=np.zeros(self.n_queries), where=denominator > 0)

    def mean_average_precision(self, k: int | None = None, ties: str = "stable", rule: str = RULES[0]) -> float:
        return float(self.average_precision(k, ties, rule).mean()) if self.n_queries else 0.0

    def precision_at(self, ks: Iterable[int] | int, ties: str = "stable") -> np.ndarray | float:
        """Mean P@K for one K (a float) or a list of them (an array)."""
        _check_choice("ties", ties, TIES)
        single = np.isscalar(ks)
        cols = [self._column(int(k)) for k in np.atleast_1d(ks)]
        hits = (self.hits_k_expected if ties == "expected" else self.hits_k)[:, cols]
        p = (hits / self.ks[cols][None, :]).mean(axis=0) if self.n_queries else np.zeros(len(cols))
        return float(p[0]) if single else p

    def pr_curve(self) -> PRCurve:
        retrieved = np.cumsum(self.hist_all, axis=1)
        hits = np.cumsum(self.hist_rel, axis=1)
        some = retrieved > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            per_query_p = np.where(some, hits / np.maximum(retrieved, 1), 0.0)
            n_some = some.sum(axis=0)
            precision = np.where(n_some > 0, per_query_p.sum(axis=0) / np.maximum(n_some, 1), np.nan)
            has_rel = self.relevant > 0
            recall = (hits[has_rel] / self.relevant[has_rel, None]).mean(axis=0) if has_rel.any() \
                else np.zeros(hits.shape[1])
        return PRCurve(radius=np.arange(hits.shape[1]), precision=precision, recall=recall,
                       coverage=n_some / max(1, self.n_queries))


# -- entry points ----------------------------------------------------------------------------------
def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise MetricError(f"{name} = {value!r}; choose one of {', '.join(allowed)}")


def map_k_rule(name: str) -> str:
    """The mAP@K rule ``name`` stands for (one of :data:`RULES`): a rule's name, or an old alias. The old
    name "djsrh" is refused rather than mapped, because it named a rule (now "first-k-relevant") that is
    not what DJSRH computes, so either mapping would silently change someone's numbers."""
    if not isinstance(name, str):
        raise MetricError(f"map_k_rule = {name!r}; choose one of {', '.join(RULES)}")
    if name in RULES:
        return name
    if name in RULE_ALIASES:
        return RULE_ALIASES[name]
    if name == "djsrh":
        raise MetricError("map_k_rule 'djsrh' was a misnomer and is gone: it computed 'first-k-relevant' (calc_map_k), "
                          "while DJSRH/JDSH/DGCPN/UCMFH report 'hits-in-top-k' (their calculate_top_map, now the "
                          "default); set map_k_rule to one of " + ", ".join(RULES))
    raise MetricError(f"map_k_rule = {name!r}; choose one of {', '.join(RULES)}")


def _packed(codes: np.ndarray, what: str) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.dtype != np.uint8:
        raise MetricError(f"{what} must be packed codes, a 2-D uint8 array (cfrh.codes.pack_codes); "
                          f"got {codes.dtype} {codes.shape}")
    return codes


def _label_words(labels: np.ndarray, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] != n:
        raise MetricError(f"{what} must be (N, C) multi-hot with one row per code ({n}), got {labels.shape}")
    return as_words(np.packbits(labels > 0, axis=1))


_HARMONIC: dict[int, np.ndarray] = {}


def _harmonic(n: int) -> np.ndarray:
    """H[0..n] (H[k] = Σ_{i<=k} 1/i) from the digamma function: accurate to an ulp, unlike a running sum."""
    size = 1 << max(10, int(n).bit_length())
    if size not in _HARMONIC:
        _HARMONIC[size] = digamma(np.arange(1, size + 2, dtype=np.float64)) + np.euler_gamma
    return _HARMONIC[size]


def retrieval_metrics(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                      db_labels: np.ndarray, map_ks: Iterable[int] = (), precision_ks: Iterable[int] = (),
                      batch_size: int = 512,
                      on_batch: Callable[[int, int], None] | None = None) -> RetrievalResult:
    """Every metric of one retrieval direction in one fused pass (the direction is which codes go in:
    image query codes against text database codes is image→text, and so on).

    ``map_ks`` are the K of mAP@K (their tie-aware values are computed too), ``precision_ks``
    the K of P@K / top-N precision. Queries are processed ``batch_size`` at a time (``on_batch(done,
    total)`` after each); memory is O(database) per worker thread, never queries × database."""
    q, db = _packed(query_codes, "query codes"), _packed(db_codes, "database codes")
    if q.shape[1] != db.shape[1]:
        raise MetricError(f"query codes have {q.shape[1] * 8} bits, database codes {db.shape[1] * 8}")
    bits = q.shape[1] * 8
    if bits > _MAX_BITS:
        raise MetricError(f"{bits}-bit codes exceed the {_MAX_BITS}-bit limit of the metric kernel")
    ql, dl = _label_words(query_labels, q.shape[0], "query labels"), _label_words(db_labels, db.shape[0],
                                                                                "database labels")
    if ql.shape[1] != dl.shape[1] or np.shape(query_labels)[1] != np.shape(db_labels)[1]:
        raise MetricError(f"query labels have {np.shape(query_labels)[1]} classes, database labels "
                          f"{np.shape(db_labels)[1]}")
    map_ks, precision_ks = [int(k) for k in map_ks], [int(k) for k in precision_ks]
    ks = np.unique(np.asarray(map_ks + precision_ks, dtype=np.int64))
    if ks.size and (ks[0] < 1 or ks[-1] > db.shape[0]):
        raise MetricError(f"cut-offs K must lie in 1..{db.shape[0]} (the database size), got {ks.tolist()}")
    is_map_k = np.isin(ks, map_ks)
    qw, dw = as_words(q), as_words(db)
    harmonic = _harmonic(db.shape[0])
    nq, nk = q.shape[0], ks.size
    out = dict(n_rel=np.zeros(nq, np.int64), ap=np.zeros(nq), ap_exp=np.zeros(nq),
               hits_k=np.zeros((nq, nk), np.int64), rank_sum_k=np.zeros((nq, nk)), hit_sum_k=np.zeros((nq, nk)),
               hits_k_exp=np.zeros((nq, nk)), std_sum_k_exp=np.zeros((nq, nk)),
               first_sum_k_exp=np.where(is_map_k, 0.0, np.nan)[None, :].repeat(nq, axis=0),
               top_ap_k_exp=np.where(is_map_k, 0.0, np.nan)[None, :].repeat(nq, axis=0),
               hist_all=np.zeros((nq, bits + 1), np.int64), hist_rel=np.zeros((nq, bits + 1), np.int64))
    step = max(1, int(batch_size))
    for start in range(0, nq, step):
        sl = slice(start, min(nq, start + step))
        _retrieval_kernel(qw[sl], dw, ql[sl], dl, ks, is_map_k, harmonic, *(a[sl] for a in out.values()),
                          numba.get_num_threads())
        if on_batch is not None:
            on_batch(sl.stop, nq)
    return RetrievalResult(ks=ks, relevant=out["n_rel"], ap=out["ap"], ap_expected=out["ap_exp"],
                           hits_k=out["hits_k"], rank_sum_k=out["rank_sum_k"], hit_sum_k=out["hit_sum_k"],
                           hits_k_expected=out["hits_k_exp"], rank_sum_k_expected=out["std_sum_k_exp"],
                           hit_sum_k_expected=out["first_sum_k_exp"],
                           hits_in_top_k_ap_expected=out["top_ap_k_exp"], hist_all=out["hist_all"],
                           hist_rel=out["hist_rel"])


def average_precision(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                      db_labels: np.ndarray, topk: int | None = None, ties: str = "stable",
                      rule: str = RULES[0]) -> np.ndarray:
    """(nq,) AP@all, or AP@``topk`` under ``rule``, per query (0 for a query with no relevant item)."""
    ks = () if topk is None else (topk,)
    return retrieval_metrics(query_codes, db_codes, query_labels, db_labels, map_ks=ks).average_precision(
        topk, ties, rule)


def mean_average_precision(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                           db_labels: np.ndarray, topk: int | None = None, ties: str = "stable",
                           rule: str = RULES[0]) -> float:
    """mAP@all, or mAP@``topk`` (by default the field's "hits-in-top-k" rule); see the module docstring."""
    ap = average_precision(query_codes, db_codes, query_labels, db_labels, topk, ties, rule)
    return float(ap.mean()) if ap.size else 0.0


def precision_at_k(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                   db_labels: np.ndarray, k: int, ties: str = "stable") -> float:
    """Mean fraction of relevant items among the top ``k``."""
    return float(topn_precision(query_codes, db_codes, query_labels, db_labels, [k], ties)[0])


def topn_precision(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                   db_labels: np.ndarray, ns: Iterable[int], ties: str = "stable") -> np.ndarray:
    """Mean P@N for every N in ``ns`` (in that order): the top-N precision curve papers plot."""
    ns = [int(n) for n in ns]
    result = retrieval_metrics(query_codes, db_codes, query_labels, db_labels, precision_ks=ns)
    return np.atleast_1d(result.precision_at(ns, ties))


def pr_curve_hamming(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                     db_labels: np.ndarray) -> PRCurve:
    """Precision and recall of Hamming-ball retrieval at every radius 0..bits."""
    return retrieval_metrics(query_codes, db_codes, query_labels, db_labels).pr_curve()


# -- the plain definition, for checks --------------------------------------------------------------
def reference_query(distances: np.ndarray, relevant: np.ndarray, ks: Sequence[int]) -> dict:
    """Every metric of one query, straight from the definitions: rank the database by a stable sort of
    ``distances`` (so ties keep database order, as the kernel's rule), then read hits and ranks off it.

    Returns ``{"R", "ap", "p": [P@K], <rule>: [AP@K] for each of RULES}``, lists in the order of ``ks``."""
    order = np.argsort(distances, kind="stable")
    gnd = np.asarray(relevant, dtype=bool)[order]
    n_rel = int(gnd.sum())
    ranks = np.flatnonzero(gnd) + 1.0
    hits = np.arange(1, n_rel + 1, dtype=np.float64)
    out: dict = {"R": n_rel, "ap": float(np.mean(hits / ranks)) if n_rel else 0.0,
                 "p": [gnd[:k].sum() / k for k in ks], **{rule: [] for rule in RULES}}
    for k in ks:
        m, top = min(k, n_rel), ranks <= k
        out["hits-in-top-k"].append(float(np.mean(hits[top] / ranks[top])) if top.any() else 0.0)
        out["first-k-relevant"].append(float(np.mean(hits[:m] / ranks[:m])) if m else 0.0)
        out["min-k-relevant"].append(float(np.sum(hits[top] / ranks[top]) / m) if m else 0.0)
    return out


def reference_metrics(query_codes: np.ndarray, db_codes: np.ndarray, query_labels: np.ndarray,
                      db_labels: np.ndarray, ks: Sequence[int] = ()) -> list[dict]:
    """:func:`reference_query` for every query of packed codes, the way the field's evaluation loops do
    it: ±1 codes as floats, distances 0.5·(bits − B·q), relevance from a label product.

    The plain per-query definition the fused kernel is held to (tests, ``benchmarks/evaluate.py``): it
    sorts the whole database for every query, so it is slow; use :func:`retrieval_metrics` to evaluate."""
    qf, df = unpack_codes(query_codes).astype(np.float64), unpack_codes(db_codes).astype(np.float64)
    qlf, dlf = np.asarray(query_labels, np.float64), np.asarray(db_labels, np.float64)
    bits = qf.shape[1]
    return [reference_query(0.5 * (bits - df @ qf[i]), (dlf @ qlf[i]) > 0, ks) for i in range(qf.shape[0])]
