"""Evaluate a training run on its pipeline's protocol: the mAP table, a JSON/Markdown report and plots.

Reads from the pipeline's cache (:func:`cfrh.cache.open_pipeline_cache`): ``labels``, the stored
``splits/query`` and ``splits/database`` (the same rows for every method and rerun), and from the
training runs (:func:`cfrh.runs.open_run`, refused when trained on another cache) their codes: by default
every run of the cache — one per method when they were trained with ``cfrh train --method`` — side by side,
each labelled with its method; ``run=`` picks one or several. Every bit length is scored in every direction
(image→text, text→image, image→image, text→text: which codes are queries, which the database)
with :func:`cfrh.metrics.retrieval_metrics`, next to two references that make the numbers
trustworthy: a baseline scored the same way on the same splits (``random-projection``: the sign of
a seeded Gaussian projection of the cached features, centred on the training mean, at the same
bits) and the chance level (the expected score of a random ranking). Writes
``report/{report.json, report.md, pr_curves.png, topn_precision.png}`` into the first run (``cfrh`` when
it is among them).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .cache import FeatureCache, open_pipeline_cache
from .codes import pack_codes
from .config import ConfigError, Pipeline
from .data import feature_blocks, feature_stats
from .errors import CfrhError
from .metrics import RULE_DEFINITIONS, RULES, MetricError, RetrievalResult, map_k_rule, retrieval_metrics
from .plots import Series, line_panels
from .runs import RunError, RunStore, list_runs, open_run

log = logging.getLogger(__name__)

REPORT_FORMAT = 1
DIRECTIONS = {"i2t": ("image", "text", "image→text"), "t2i": ("text", "image", "text→image"),
              "i2i": ("image", "image", "image→image"), "t2t": ("text", "text", "text→text")}
BASELINES = ("random-projection", "none")
TIE_RULE = ("stable: items at equal Hamming distance keep database order (ranking by (distance, database row)); "
            "'tie-aware' columns are the expectation over every order of equal-distance items")


class EvaluateError(CfrhError, RuntimeError):
    """Nothing to evaluate as asked (no labels, no codes for a bit length); the message says what to run."""


@dataclass
class EvaluateConfig:
    """The ``[evaluate]`` table. Defaults follow DJSRH/JDSH/UCMFH/CFRH's reporting."""

    directions: list[str] = field(default_factory=lambda: list(DIRECTIONS))
    map_k: list[int] = field(default_factory=lambda: [50])    # mAP@50, as DJSRH/JDSH/UCMFH report
    map_k_rule: str = RULES[0]          # "hits-in-top-k", the field's mAP@K; all rules: cfrh.metrics.RULE_DEFINITIONS
    precision_k: list[int] = field(default_factory=lambda: [100, 1000])
    topn: list[int] = field(default_factory=lambda: [1, *range(50, 1001, 50)])  # the top-N precision curve
    baseline: str = "random-projection"                        # "random-projection" | "none"
    baseline_seed: int = 0
    batch_size: int = 512                                      # queries per kernel call

    @classmethod
    def from_dict(cls, table: dict[str, Any], where: str = "[evaluate]") -> "EvaluateConfig":
        """Check names, types and values; every problem names the setting and what it accepts."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(table) - set(known))
        if unknown:
            raise ConfigError(f"{where}: unknown evaluate settings {unknown}; known: {', '.join(known)}")
        config = cls(**table)
        for name in ("map_k", "precision_k", "topn"):
            value = getattr(config, name)
            if isinstance(value, int) and not isinstance(value, bool):  # `--set evaluate.map_k=100`
                value = [value]
                setattr(config, name, value)
            if not isinstance(value, list) or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0
                                                      for k in value):
                raise ConfigError(f"{where}: evaluate.{name} = {value!r} should be a list of positive integers")
        for name in ("baseline_seed", "batch_size"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "batch_size" else 0):
                raise ConfigError(f"{where}: evaluate.{name} = {value!r} should be a non-negative integer"
                                  + (" (at least 1)" if name == "batch_size" else ""))
        bad = [d for d in (config.directions if isinstance(config.directions, list) else [config.directions])
               if d not in DIRECTIONS]
        if bad or not isinstance(config.directions, list) or not config.directions:
            raise ConfigError(f"{where}: evaluate.directions = {config.directions!r}; use a list of "
                              f"{', '.join(DIRECTIONS)}")
        try:
            config.map_k_rule = map_k_rule(config.map_k_rule)  # an old alias becomes the rule's name
        except MetricError as e:
            raise ConfigError(f"{where}: evaluate.{e}") from None
        for name, allowed in (("map_k_rule", RULES), ("baseline", BASELINES)):
            if getattr(config, name) not in allowed:
                raise ConfigError(f"{where}: evaluate.{name} = {getattr(config, name)!r}; choose one of "
                                  f"{', '.join(allowed)}")
        return config


# -- reading what the training stage wrote --------------------------------------------------------
def load_codes(store: RunStore, cache: FeatureCache, bits: int) -> dict[str, np.ndarray]:
    """A run's packed image and text codes for every item of the cache, checked against the cache's size."""
    return {m: store.read_codes(bits, m, cache.n_items) for m in ("image", "text")}


def random_projection_codes(cache: FeatureCache, bits: int, train_rows: np.ndarray, seed: int = 0,
                            block_mb: float = 64) -> dict[str, np.ndarray]:
    """The baseline: sign((x − training mean) · W), W Gaussian (seeded per modality and bit length), packed.

    Random projections of two modalities share no axes, so its cross-modal scores sit near chance: what a
    learned method must beat; within a modality it is the classic sign-random-projection LSH."""
    codes = {}
    for m, modality in enumerate(("image", "text")):
        dim = cache.array(modality).shape[1]
        w = np.random.default_rng([seed, bits, m]).standard_normal((dim, bits)).astype(np.float32)
        mean = feature_stats(cache, modality, train_rows).mean
        out = np.empty((cache.n_items, bits // 8), np.uint8)
        block_rows = max(256, int(block_mb * 2**20 // (4 * dim)))
        for start, block in feature_blocks(cache, modality, block_rows):
            out[start:start + block.shape[0]] = pack_codes((block - mean) @ w)
        codes[modality] = out
    return codes


# -- scoring ---------------------------------------------------------------------------------------
def summarise(result: RetrievalResult, config: EvaluateConfig, map_k: list[int], precision_k: list[int]) -> dict:
    """The table's numbers for one (method, bits, direction)."""
    row: dict[str, Any] = {"map_all": result.mean_average_precision(),
                           "map_all_tie_aware": result.mean_average_precision(ties="expected")}
    for k in map_k:
        row[f"map@{k}"] = result.mean_average_precision(k, rule=config.map_k_rule)
        row[f"map@{k}_tie_aware"] = result.mean_average_precision(k, ties="expected", rule=config.map_k_rule)
    for k in precision_k:
        row[f"p@{k}"] = float(result.precision_at(k))
        row[f"p@{k}_tie_aware"] = float(result.precision_at(k, ties="expected"))
    row["queries_without_relevant"] = int((result.relevant == 0).sum())
    return row


def curves(result: RetrievalResult, topn: list[int]) -> dict:
    return {"pr": result.pr_curve().to_dict(),
            "topn": {"n": topn, "precision": np.atleast_1d(result.precision_at(topn)).tolist()}}


@dataclass
class Protocol:
    """The rows and labels every method is scored on."""

    query: np.ndarray
    database: np.ndarray
    labels: np.ndarray
    map_k: list[int]
    precision_k: list[int]
    topn: list[int]


def score_codes(codes: dict[str, np.ndarray], protocol: Protocol, config: EvaluateConfig,
                on_batch: Callable[[str, int, int], None] | None = None, task: str = "") -> tuple[dict, dict]:
    """Rows and curves, per direction, of one set of codes (one method at one bit length)."""
    rows, plots = {}, {}
    ql, dl = protocol.labels[protocol.query], protocol.labels[protocol.database]
    for direction in config.directions:
        src, dst, _ = DIRECTIONS[direction]
        t0 = time.perf_counter()
        callback = None if on_batch is None else (lambda done, total, d=direction: on_batch(f"{task} {d}", done, total))
        result = retrieval_metrics(codes[src][protocol.query], codes[dst][protocol.database], ql, dl,
                                   map_ks=protocol.map_k, precision_ks=protocol.precision_k + protocol.topn,
                                   batch_size=config.batch_size, on_batch=callback)
        rows[direction] = {**summarise(result, config, protocol.map_k, protocol.precision_k),
                           "seconds": round(time.perf_counter() - t0, 3)}
        plots[direction] = curves(result, protocol.topn)
    return rows, plots


def chance_level(protocol: Protocol, config: EvaluateConfig) -> dict:
    """Expected scores of a random ranking: every item tied at distance 0, tie-aware values."""
    n_q, n_db = len(protocol.query), len(protocol.database)
    result = retrieval_metrics(np.zeros((n_q, 1), np.uint8), np.zeros((n_db, 1), np.uint8),
                               protocol.labels[protocol.query], protocol.labels[protocol.database],
                               map_ks=protocol.map_k, precision_ks=protocol.precision_k, batch_size=config.batch_size)
    out = {"map_all": result.mean_average_precision(ties="expected")}
    out.update({f"map@{k}": result.mean_average_precision(k, "expected", config.map_k_rule) for k in protocol.map_k})
    out.update({f"p@{k}": float(result.precision_at(k, "expected")) for k in protocol.precision_k})
    return out


# -- the report ------------------------------------------------------------------------------------
def table_columns(report: dict) -> list[tuple[str, str]]:
    """(row key, column title) of the summary table, shared by the terminal and Markdown tables."""
    cols = [("map_all", "mAP@all"), ("map_all_tie_aware", "mAP@all tie-aware")]
    for k in report["settings"]["map_k"]:
        cols.append((f"map@{k}", f"mAP@{k}"))
        if f"map@{k}_tie_aware" in (report["results"][0] if report["results"] else {}):
            cols.append((f"map@{k}_tie_aware", f"mAP@{k} tie-aware"))
    cols += [(f"p@{k}", f"P@{k}") for k in report["settings"]["precision_k"]]
    return cols


def table_rows(report: dict) -> list[list[str]]:
    """Method, bits, direction and the column values, formatted, one list per row."""
    cols = table_columns(report)
    return [[r["method"], str(r["bits"]), DIRECTIONS[r["direction"]][2], *(f"{r[k]:.4f}" for k, _ in cols)]
            for r in report["results"]]


def markdown(report: dict) -> str:
    """report.md: protocol, definitions, the full table, a paper-layout table (bits as columns), the plots."""
    s, p = report["settings"], report["protocol"]
    cols = table_columns(report)
    head = ["method", "bits", "direction", *(title for _, title in cols)]
    runs = [r["label"] for r in report.get("runs", [])] or [report["run"]]
    lines = [f"# Evaluation of `{report['pipeline']}`, run{'s' if len(runs) > 1 else ''} "
             + ", ".join(f"`{r}`" for r in runs), "",
             *[f"> **WARNING: {w}**\n" for w in report.get("warnings", [])],
             f"- cache: `{report['cache']}`", f"- created: {report['created']}",
             f"- protocol: {p['n_query']:,} queries, {p['n_database']:,} database items, {p['n_labels']} labels; "
             f"split `{json.dumps(p['split'], sort_keys=True)}`",
             f"- relevant: shares at least one label; ties: {report['definitions']['ties']}",
             f"- mAP@K rule `{s['map_k_rule']}`: {report['definitions']['map_k']}",
             f"- queries without any relevant item score 0 and count in the mean", ""]
    if report.get("notes"):
        lines += [f"- note: {n}" for n in report["notes"]] + [""]
    lines += ["## Results", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    chance = report["chance"]
    lines += ["", "Chance level (expected score of a random ranking): "
              + ", ".join(f"{title} {chance[k]:.4f}" for k, title in cols if k in chance), ""]
    key = f"map@{s['map_k'][0]}" if s["map_k"] else "map_all"
    title = dict(cols)[key]
    bits = sorted({r["bits"] for r in report["results"]})
    lines += [f"## {title}, paper layout", "", "| direction | method | " + " | ".join(f"{b} bits" for b in bits) + " |",
              "|" + "---|" * (len(bits) + 2)]
    for direction in s["directions"]:
        for method in dict.fromkeys(r["method"] for r in report["results"]):
            vals = {r["bits"]: r[key] for r in report["results"] if r["method"] == method and r["direction"] == direction}
            lines.append(f"| {DIRECTIONS[direction][2]} | {method} | "
                         + " | ".join(f"{vals[b]:.4f}" if b in vals else "–" for b in bits) + " |")
    lines += ["", "![PR curves over Hamming radius](pr_curves.png)", "",
              "![Top-N precision](topn_precision.png)", ""]
    return "\n".join(lines)


def figures(report: dict) -> dict[str, bytes]:
    """pr_curves.png and topn_precision.png: a panel per direction, a colour per bit length, baselines dashed."""
    pr: dict[str, list[Series]] = {}
    topn: dict[str, list[Series]] = {}
    for method, by_bits in report["curves"].items():
        dashed = method != report["method"]
        for bits, by_direction in by_bits.items():
            for direction, c in by_direction.items():
                name, label = DIRECTIONS[direction][2], f"{method} {bits} bits"
                pr.setdefault(name, []).append(Series(label, c["pr"]["recall"], c["pr"]["precision"], bits, dashed))
                topn.setdefault(name, []).append(Series(label, c["topn"]["n"], c["topn"]["precision"], bits, dashed))
    title = f"{report['pipeline']} · run {report['run']}"
    return {"pr_curves.png": line_panels(pr, "recall", "precision", f"PR over Hamming radius — {title}",
                                         xlim=(0.0, 1.0)),
            "topn_precision.png": line_panels(topn, "N (top-N retrieved)", "precision", f"Top-N precision — {title}",
                                              markers=False)}


def run_label(run: str, info: dict) -> str:
    """How a run is named in the report: its name, with its method when the name is not the method's."""
    method = info.get("method") or info.get("config", {}).get("method", "cfrh")
    return run if run == method else f"{run} ({method})"


def select_runs(runs_root: str | None, cache: FeatureCache, run: str | list[str] | tuple[str, ...] | None
                ) -> tuple[list[RunStore], list[str]]:
    """(the runs to score, notes). ``run`` None: every run of this cache (``cfrh`` first), skipping with a note
    any trained on another cache or split, unless none is left; a name or names: exactly those."""
    if run is not None:
        names = [run] if isinstance(run, str) else list(dict.fromkeys(run))
        return [open_run(runs_root, cache, name) for name in names], []
    names = sorted(list_runs(runs_root, cache), key=lambda name: (name != "cfrh", name)) or ["cfrh"]
    stores, notes, errors = [], [], []
    for name in names:
        try:
            stores.append(open_run(runs_root, cache, name))
        except RunError as e:
            errors.append(e)
            notes.append(f"run {name!r} left out: {e}")
    if not stores:
        raise errors[0]
    return stores, notes


def evaluate(pipeline: Pipeline, cache_root: str | None = None, run: str | list[str] | None = None,
             bits: list[int] | None = None, map_k: list[int] | None = None, baseline: str | None = None,
             directions: list[str] | None = None, write: bool = True,
             on_batch: Callable[[str, int, int], None] | None = None, *,
             runs_root: str | None = None, model: str | None = None) -> dict:
    """Score runs' codes (and the baseline) on the pipeline's protocol; write and return the report.

    ``run``: None scores every run of the pipeline's cache side by side (each method's run after ``cfrh train
    --method``), a name or a list of names those runs; the report goes into the first (``cfrh`` by default).
    ``bits`` defaults to every bit length some run completed (the first run must have every one asked for);
    ``map_k``, ``baseline`` and ``directions`` override the pipeline's ``[evaluate]`` table."""
    where = f"{pipeline.path or pipeline.name} [evaluate]"
    config = EvaluateConfig.from_dict(pipeline.evaluate, where)
    overrides = {k: v for k, v in (("map_k", map_k), ("baseline", baseline), ("directions", directions)) if v}
    if overrides:
        config = EvaluateConfig.from_dict({**dataclasses.asdict(config), **overrides}, where)
    t_start = time.perf_counter()
    cache = open_pipeline_cache(pipeline, cache_root, model=model)
    if not cache.has("labels"):
        raise EvaluateError(f"{cache.url}: the cache has no labels, and retrieval metrics need them; evaluate a "
                            f"labelled dataset (or use `cfrh search` to look at results)")
    stores, notes = select_runs(runs_root, cache, run)
    store = stores[0]
    complete = {s.name: s.complete_bits() for s in stores}
    have = complete[store.name]
    wanted = sorted(set(bits)) if bits else sorted(set().union(*complete.values()))
    missing = [b for b in wanted if b not in have] if bits else ([] if have else wanted)
    if missing or not wanted:
        raise EvaluateError(f"{store.url}: run {store.name!r} has no complete codes for {missing or 'any bit length'} "
                            f"(complete: {have or 'none'}); run `cfrh train {pipeline.name}"
                            + (f" --bits {','.join(map(str, missing))}" if missing else "")
                            + (f" --run {store.name}" if store.name != "cfrh" else "") + "` first")
    query, database = cache.split("query"), cache.split("database")
    if not len(query) or not len(database):
        raise EvaluateError(f"{cache.url}: the stored split has {len(query)} queries and {len(database)} database "
                            f"items; re-extract with a [split] that has both")
    ks = {}
    for name in ("map_k", "precision_k", "topn"):
        value = getattr(config, name)
        ks[name] = [k for k in value if k <= len(database)]
        if len(ks[name]) < len(value):
            notes.append(f"evaluate.{name}: dropped {sorted(set(value) - set(ks[name]))}, larger than the "
                         f"{len(database):,}-item database")
    protocol = Protocol(query=query, database=database, labels=cache.read("labels"), **ks)
    config = dataclasses.replace(config, map_k=ks["map_k"], precision_k=ks["precision_k"], topn=ks["topn"])

    results, curve_data = [], {}
    infos = {s.name: s.info() for s in stores}
    labels = {s.name: run_label(s.name, infos[s.name]) for s in stores}
    methods = []
    for s in stores:
        lacking = [b for b in wanted if b not in complete[s.name]]
        if lacking and s is not store:
            notes.append(f"run {s.name!r} has no complete codes for {lacking} bits")
        methods.append((labels[s.name], [b for b in wanted if b in complete[s.name]],
                        lambda b, s=s: load_codes(s, cache, b)))
    if config.baseline == "random-projection":
        train_rows = cache.split("train")
        methods.append((config.baseline, wanted,
                        lambda b: random_projection_codes(cache, b, train_rows, config.baseline_seed)))
    for method, method_bits, get_codes in methods:
        for b in method_bits:
            rows, plots = score_codes(get_codes(b), protocol, config, on_batch, task=f"{method} {b} bits")
            results += [{"method": method, "bits": b, "direction": d, **r} for d, r in rows.items()]
            curve_data.setdefault(method, {})[str(b)] = plots

    run_info = infos[store.name]
    report = {
        "format": REPORT_FORMAT, "pipeline": pipeline.name, "run": store.name, "method": labels[store.name],
        "runs": [{"run": s.name, "label": labels[s.name], "method": infos[s.name].get("method", "cfrh"),
                  "url": s.url, "bits": complete[s.name]} for s in stores],
        "cache": cache.url,
        "run_url": store.url, "cache_fingerprint": cache.fingerprint,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "protocol": {"split": pipeline.split, "n_query": int(len(query)), "n_database": int(len(database)),
                     "n_train": int(len(cache.split("train"))), "n_labels": int(protocol.labels.shape[1])},
        "settings": dataclasses.asdict(config), "bits": wanted,
        "definitions": {"relevance": "shares at least one label", "ties": TIE_RULE,
                        "map_k": RULE_DEFINITIONS[config.map_k_rule],
                        "pr": "precision averaged over queries retrieving something within the radius; "
                              "recall over queries with a relevant item"},
        "features": {"image": cache.request.get("image", {}), "text": cache.request.get("text", {})},
        "warnings": cache.warnings(),
        "train_config": run_info.get("config", {}),
        "train_configs": {labels[s.name]: infos[s.name].get("config", {}) for s in stores}, "notes": notes,
        "chance": chance_level(protocol, config), "results": results, "curves": curve_data,
    }
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    if write:
        files = {"report.md": markdown(report).encode(), **figures(report)}
        report["files"] = {name: store.url_of(f"report/{name}") for name in ["report.json", *files]}
        for name, data in files.items():
            store.write_bytes(f"report/{name}", data)
        store.write_bytes("report/report.json", json.dumps(report, indent=1).encode())
    return report
