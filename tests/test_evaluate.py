"""`cfrh evaluate`: codes read from a cache built here, scored on the stored splits, report files written."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cfrh.cache import FeatureCache, feature_key
from cfrh.cli import cli
from cfrh.codes import pack_codes
from cfrh.config import ConfigError, load_pipeline
from cfrh.datasets import read_dataset
from cfrh.evaluation import EvaluateConfig, EvaluateError, evaluate
from cfrh.metrics import mean_average_precision, precision_at_k
from cfrh.runs import RunError, RunStore
from cfrh.splits import make_splits

PIPELINE = """name = "{name}"
[dataset]
reader = "precomputed"
[split]
{split}
[evaluate]
{evaluate}
"""


def write_pipeline(tmp_path: Path, name: str, split: str = "method = \"random\"\nquery = 60\nseed = 0",
                   evaluate_section: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(PIPELINE.format(name=name, split=split, evaluate=evaluate_section))
    return path


def build_cache(root: Path, name: str, labels: np.ndarray, image: np.ndarray, text: np.ndarray,
                splits: dict[str, np.ndarray], runs: dict[int, tuple[np.ndarray, np.ndarray]] | None,
                run: str = "cfrh") -> FeatureCache:
    """A finished cache as the extractor leaves it, plus a run's packed codes as the trainer leaves them."""
    cache, _ = FeatureCache.create(root, name, feature_key("precomputed"), request={"test": name})
    cache.write("image", image.astype(np.float16))
    cache.write("text", text.astype(np.float16))
    if labels is not None:
        cache.write("labels", labels.astype(np.uint8))
    cache.write("ids", [f"item{i}" for i in range(len(image))])
    for part, rows in splits.items():
        cache.write(f"splits/{part}", rows.astype(np.int64))
    cache.finalize()
    if runs:   # as the trainer leaves them, under the default runs root ($CFRH_RUNS, set per test)
        store = RunStore.of(None, cache, run)
        for bits, (img, txt) in runs.items():
            store.write_codes(bits, "image", img)
            store.write_codes(bits, "text", txt)
        store.update_info(cache={"url": cache.url, "fingerprint": cache.fingerprint}, bits=sorted(runs),
                          complete={str(b): True for b in runs})
    return FeatureCache.open(root, name, feature_key("precomputed"))


def label_codes(labels: np.ndarray, bits: int, noise: float, seed: int) -> np.ndarray:
    """Codes that carry the labels (a fixed projection of them) plus modality noise."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).standard_normal((labels.shape[1], bits))
    return pack_codes(labels @ w + noise * rng.standard_normal((len(labels), bits)))


@pytest.fixture
def synthetic(tmp_path):
    rng = np.random.default_rng(0)
    n, c = 400, 5
    labels = (rng.random((n, c)) < 0.25).astype(np.uint8)
    labels[np.arange(n), rng.integers(0, c, n)] = 1
    image, text = rng.standard_normal((n, 24)), rng.random((n, 12))
    splits = make_splits(n, {"query": 60, "train": 200, "seed": 0})
    runs = {b: (label_codes(labels, b, 0.8, b), label_codes(labels, b, 0.8, b + 1)) for b in (16, 32)}
    cache = build_cache(tmp_path / "cache", "synth", labels, image, text, splits, runs)
    pipe = write_pipeline(tmp_path, "synth", evaluate_section="map_k = [10, 50]\nprecision_k = [20]\n"
                                                              "topn = [1, 10, 100, 500]")
    return tmp_path / "cache", load_pipeline(pipe), cache, labels, splits, runs


def test_report_numbers_are_the_metrics_of_the_stored_rows_and_directions(synthetic):
    root, pipe, cache, labels, splits, runs = synthetic
    report = evaluate(pipe, root)
    q, db = splits["query"], splits["database"]
    assert report["protocol"]["n_query"] == 60 and report["protocol"]["n_database"] == 340
    assert len(report["results"]) == 2 * 2 * 4  # (run, baseline) × bits × directions
    assert report["notes"] == ["evaluate.topn: dropped [500], larger than the 340-item database"]
    modality = {"image": 0, "text": 1}
    from cfrh.evaluation import DIRECTIONS
    for row in report["results"]:
        if row["method"] != "cfrh":
            continue
        src, dst, _ = DIRECTIONS[row["direction"]]
        qc, dc = runs[row["bits"]][modality[src]][q], runs[row["bits"]][modality[dst]][db]
        assert row["map_all"] == pytest.approx(mean_average_precision(qc, dc, labels[q], labels[db]), abs=1e-12)
        assert row["map@50"] == pytest.approx(mean_average_precision(qc, dc, labels[q], labels[db], topk=50), abs=1e-12)
        assert row["map_all_tie_aware"] == pytest.approx(
            mean_average_precision(qc, dc, labels[q], labels[db], ties="expected"), abs=1e-12)
        assert row["p@20"] == pytest.approx(precision_at_k(qc, dc, labels[q], labels[db], 20), abs=1e-12)
    # codes that carry the labels beat the baseline and chance in every direction
    by = {(r["method"], r["bits"], r["direction"]): r for r in report["results"]}
    for (method, bits, direction), r in by.items():
        if method == "cfrh":
            assert r["map_all"] > by[("random-projection", bits, direction)]["map_all"] + 0.1
            assert r["map_all"] > report["chance"]["map_all"] + 0.1
    # cross-modal random projections share no axes: chance level, within a modality a little above
    rp = by[("random-projection", 32, "i2t")]["map_all"]
    assert abs(rp - report["chance"]["map_all"]) < 0.05


def test_report_files_are_written_next_to_the_codes(synthetic):
    root, pipe, cache, *_ = synthetic
    report = evaluate(pipe, root, bits=[32], baseline="none", directions=["i2t", "t2i"])
    base = Path(RunStore.of(None, cache, "cfrh").url) / "report"
    assert report["files"]["report.json"] == str(base / "report.json")
    assert sorted(p.name for p in base.iterdir()) == ["pr_curves.png", "report.json", "report.md",
                                                      "topn_precision.png"]
    stored = json.loads((base / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert stored["results"] == report["results"] and stored["bits"] == [32]
    assert [r["method"] for r in stored["results"]] == ["cfrh", "cfrh"]
    curve = stored["curves"]["cfrh"]["32"]["i2t"]
    assert len(curve["pr"]["precision"]) == 33 and curve["pr"]["recall"][-1] == pytest.approx(1.0)
    assert curve["topn"]["n"] == [1, 10, 100]
    md = (base / "report.md").read_text()
    assert "| cfrh | 32 | image→text |" in md and "mAP@50 tie-aware" in md and "![PR curves" in md
    for png in ("pr_curves.png", "topn_precision.png"):
        assert (base / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_codes_labels_and_bad_settings_fail_clearly(synthetic, tmp_path):
    root, pipe, cache, labels, splits, runs = synthetic
    with pytest.raises(EvaluateError, match=r"no complete codes for \[64\].*cfrh train synth --bits 64"):
        evaluate(pipe, root, bits=[64])
    with pytest.raises(Exception, match="no training run 'other'"):
        evaluate(pipe, root, run="other")
    with pytest.raises(ConfigError, match="unknown evaluate settings"):
        EvaluateConfig.from_dict({"mapk": [50]})
    with pytest.raises(ConfigError, match="map_k_rule"):
        EvaluateConfig.from_dict({"map_k_rule": "mean"})
    with pytest.raises(ConfigError, match="directions"):
        EvaluateConfig.from_dict({"directions": ["i2x"]})
    assert EvaluateConfig.from_dict({"map_k": 100}).map_k == [100]
    unlabelled = build_cache(tmp_path / "c2", "nolabels", None, np.zeros((50, 4)), np.zeros((50, 3)),
                             make_splits(50, {"query": 5}), {16: (np.zeros((50, 2), np.uint8),) * 2})
    with pytest.raises(EvaluateError, match="no labels"):
        evaluate(load_pipeline(write_pipeline(tmp_path, "nolabels", split="query = 5")), tmp_path / "c2")
    assert unlabelled.n_items == 50
    RunStore.of(None, cache, "cfrh").remove("16/text_codes.npy")
    with pytest.raises(RunError, match="no complete 16-bit codes.*cfrh train synth --bits 16"):
        evaluate(pipe, root, bits=[16])


def test_cli_prints_the_table_and_json(synthetic):
    root, pipe, *_ = synthetic
    runner = CliRunner()
    out = runner.invoke(cli, ["evaluate", str(pipe.path), "--cache", str(root), "--bits", "16", "--topk", "10"])
    assert out.exit_code == 0, out.output
    assert "image→text" in out.output and "mAP@10" in out.output and "random-projection" in out.output
    assert "chance level" in out.output and "report.json" in out.output
    out = runner.invoke(cli, ["evaluate", str(pipe.path), "--cache", str(root), "--bits", "16,32", "--json",
                              "--baseline", "none", "--direction", "t2i"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)       # stdout holds the JSON alone (progress goes to stderr)
    assert [(r["bits"], r["direction"]) for r in report["results"]] == [(16, "t2i"), (32, "t2i")]
    assert "curves" not in report


# -- real data: the WIKI protocol --------------------------------------------------------------------
def test_wiki_protocol_perfect_codes_and_chance(wiki_dir, tmp_path):
    """WIKI's own lists as the split (693 queries, 2,173 database items), its real labels and features:
    codes that are a function of the class score exactly 1; the baseline scores near chance cross-modally."""
    c = read_dataset("wiki-mat", wiki_dir)
    pipe = load_pipeline(write_pipeline(tmp_path, "wiki", split='method = "fixed"\nquery_from = "test"\n'
                                                                 'train_from = "train"\ndatabase_from = "train"'))
    splits = make_splits(len(c), pipe.split, labels=c.labels, fixed=c.fixed_splits)
    perfect = label_codes(c.labels.astype(float), 16, 0.0, 0)
    build_cache(tmp_path / "cache", "wiki", c.labels, c.image_features, c.text_features, splits,
                {16: (perfect, perfect)})
    report = evaluate(pipe, tmp_path / "cache", directions=["i2t", "t2i"])
    assert report["protocol"] == {"split": pipe.split, "n_query": 693, "n_database": 2173, "n_train": 2173,
                                  "n_labels": 10}
    by = {(r["method"], r["direction"]): r for r in report["results"]}
    for d in ("i2t", "t2i"):
        row = by[("cfrh", d)]
        assert row["map_all"] == pytest.approx(1.0) and row["map_all_tie_aware"] == pytest.approx(1.0)
        assert row["map@50"] == pytest.approx(1.0) and row["p@100"] == pytest.approx(1.0)
    # chance: for single-label data, the expected AP of a random ranking is known per class size
    db_counts = c.labels[splits["database"]].sum(0)
    q_classes = c.labels[splits["query"]].argmax(1)
    n = len(splits["database"])
    p = np.arange(1, n + 1)
    per_class = [np.mean((1 + (p - 1) * (r - 1) / (n - 1)) / p) for r in db_counts]
    assert report["chance"]["map_all"] == pytest.approx(np.mean([per_class[k] for k in q_classes]), rel=1e-9)
    assert abs(by[("random-projection", "i2t")]["map_all"] - report["chance"]["map_all"]) < 0.05


# -- protocols: the [split] tables of the shipped pipelines --------------------------------------------
def test_mirflickr_protocol_on_the_real_labels(mirflickr_dir):
    """DJSRH/JDSH/CFRH on the 20,015 cleaned pairs: 2,000 queries, 5,000 training pairs drawn from the
    18,015-pair database (all but the queries); seeded, so every run and method sees the same rows."""
    import scipy.io

    labels = scipy.io.loadmat(mirflickr_dir / "mirflickr25k-lall.mat")["LAll"]
    protocol = load_pipeline("mirflickr25k").split
    s = make_splits(len(labels), protocol, labels=labels)
    assert [len(s[k]) for k in ("query", "train", "database")] == [2000, 5000, 18015]
    assert not np.intersect1d(s["query"], s["database"]).size and np.isin(s["train"], s["database"]).all()
    np.testing.assert_array_equal(make_splits(len(labels), protocol, labels=labels)["query"], s["query"])
    assert labels[s["query"]].any(1).all()  # the cleaned set: every pair has a concept


def test_nuswide_and_coco_protocols():
    rng = np.random.default_rng(0)
    n = 186_577  # NUS-WIDE TC-10 pairs
    labels = (rng.random((n, 10)) < 0.15).astype(np.uint8)
    labels[np.arange(n), rng.integers(0, 10, n)] = 1
    s = make_splits(n, load_pipeline("nuswide").split, labels=labels)
    assert [len(s[k]) for k in ("query", "train", "database")] == [2000, 5000, n - 2000]
    assert (labels[s["query"]].sum(0) >= 200).all()
    assert not np.intersect1d(s["query"], s["database"]).size
    s = make_splits(123_287, load_pipeline("coco").split)
    assert [len(s[k]) for k in ("query", "train", "database")] == [5000, 10000, 118_287]


def test_misspelt_or_contradictory_split_settings_fail():
    from cfrh.splits import SplitError

    with pytest.raises(SplitError, match=r"\['querry'\] not understood"):
        make_splits(100, {"querry": 10})
    with pytest.raises(SplitError, match="both query and query_per_label"):
        make_splits(100, {"query": 10, "query_per_label": 2}, labels=np.ones((100, 2)))
    with pytest.raises(SplitError, match="at least 1"):
        make_splits(100, {"query": 10, "train": 0})
    with pytest.raises(SplitError, match="selects no rows"):
        make_splits(10, {"method": "fixed"}, fixed={"train": np.arange(10), "test": np.arange(0)})
