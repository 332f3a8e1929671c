"""A cache a team can share: concurrent and killed writers, corruption, read-only access, runs kept apart.

Real processes throughout: each `cfrh` here is a separate Python process, as two team members or a
retried job would be."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfrh.cache import FeatureCache, feature_key
from cfrh.config import Pipeline
from cfrh.evaluation import evaluate
from cfrh.runs import RunError
from cfrh.training import train
from clip_fixtures import make_tiny_clip

CLI = [sys.executable, "-c", "from cfrh.cli import main; main()"]


def cfrh_cli(*args, check: bool = False, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> str:
    """The process failed with exit 2 and exactly one `error:` line holding every fragment, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- a collection whose extraction takes a few seconds ----------------------------------------------------
@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("shared")
    model = make_tiny_clip(base / "tiny-clip")
    root = base / "data"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    words = ["sky", "sea", "dog", "cat", "tree", "car", "road", "sun"]
    lines = []
    for i in range(160):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "images" / f"{i:03d}.png")
        lines.append(json.dumps({"image": f"images/{i:03d}.png", "tags": " ".join(rng.choice(words, 3)),
                                 "labels": words[i % 4]}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    toml = base / "team.toml"
    toml.write_text(f"""name = "team"
[dataset]
reader = "folder"
root = "{root}"
[features]
image_model = "{model}"
batch_size = 4
block_rows = 16
workers = 0
[split]
method = "random"
query = 20
train = "all"
seed = 0
[train]
bits = [16]
epochs = 2
batch_size = 16
image_hidden = [32]
text_hidden = [32]
threads = 1
""")
    solo = base / "solo"
    cfrh_cli("extract", toml, "--cache", solo, check=True)
    return {"toml": toml, "model": model, "solo": solo, "key": feature_key(str(model))}


def arrays(root: Path, key: str) -> dict[str, np.ndarray]:
    cache = FeatureCache.open(root, "team", key)
    return {name: cache.read(name) for name in cache.data_arrays()}


def assert_same_cache(root: Path, collection: dict) -> None:
    got, want = arrays(root, collection["key"]), arrays(collection["solo"], collection["key"])
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert FeatureCache.open(root, "team", collection["key"]).verify() == []
    assert cfrh_cli("cache", "verify", "--cache", root).returncode == 0


def test_two_extractions_started_together_equal_a_solo_run(collection, tmp_path):
    for trial in range(3):
        root = tmp_path / f"shared{trial}"
        procs = [subprocess.Popen([*CLI, "extract", str(collection["toml"]), "--cache", str(root)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=300) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert sum("already complete" in out for out, _ in outs) == 1, outs   # one wrote, the other found it done
        assert_same_cache(root, collection)


def test_a_killed_extraction_leaves_no_complete_cache_and_resumes_to_the_same_arrays(collection, tmp_path):
    root = tmp_path / "killed"
    group = root / "team" / collection["key"]
    proc = subprocess.Popen([*CLI, "extract", str(collection["toml"]), "--cache", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (group / "_progress" / "image" / "c").exists():   # the first image block is stored
        assert proc.poll() is None and time.monotonic() < deadline, "the extraction ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = cfrh_cli("train", collection["toml"], "--cache", root, "--runs", tmp_path / "runs")
    one_line_error(out, "extraction did not finish", "cfrh extract team")
    cfrh_cli("extract", collection["toml"], "--cache", root, check=True)    # the lock died with its holder
    assert_same_cache(root, collection)


# -- corruption ----------------------------------------------------------------------------------------
@pytest.fixture
def trained_copy(collection, tmp_path) -> dict:
    root = tmp_path / "cache"
    shutil.copytree(collection["solo"], root)
    runs = tmp_path / "runs"
    cfrh_cli("train", collection["toml"], "--cache", root, "--runs", runs, "--quiet", check=True)
    return {"root": root, "runs": runs, "group": root / "team" / collection["key"], "toml": collection["toml"]}


def chunk(group: Path, array: str, block: int) -> Path:
    files = sorted((group / array / "c").rglob("*"))
    path = group / array / "c" / str(block) / "0"
    assert path in files, files
    return path


@pytest.mark.parametrize("damage, why", [
    ("flip", "corrupt"), ("delete", "differ from the digest recorded at extraction"), ("random", "corrupt"),
])
def test_damaged_chunks_stop_every_reader_with_one_line(trained_copy, damage, why):
    path = chunk(trained_copy["group"], "image", 1)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif damage == "delete":
        path.unlink()
    else:
        path.write_bytes(np.random.default_rng(1).bytes(len(data)))
    toml, root, runs = trained_copy["toml"], trained_copy["root"], trained_copy["runs"]
    one_line_error(cfrh_cli("train", toml, "--cache", root, "--runs", runs, "--run", "again", "--quiet"),
                          "array 'image' block 1 (rows 16–31)", why, "cfrh extract team --overwrite")
    verify = cfrh_cli("cache", "verify", "--cache", root)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert "image: block 1 (rows 16–31)" in verify.stderr and "block 0" not in verify.stderr
    # The random-projection baseline reads the image features too, so evaluate stops as well; without it,
    # evaluation reads only labels, splits and the run's codes, which are intact.
    one_line_error(cfrh_cli("evaluate", toml, "--cache", root, "--runs", runs), "array 'image' block 1")
    assert cfrh_cli("evaluate", toml, "--cache", root, "--runs", runs, "--baseline", "none").returncode == 0


def test_truncated_metadata_is_a_finding_not_a_traceback(trained_copy):
    toml, root, runs, group = trained_copy["toml"], trained_copy["root"], trained_copy["runs"], trained_copy["group"]
    meta = group / "text" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    verify = cfrh_cli("cache", "verify", "--cache", root)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr and "text: metadata unreadable" in verify.stderr
    one_line_error(cfrh_cli("train", toml, "--cache", root, "--runs", runs, "--run", "b", "--quiet"),
                   "array 'text' has unreadable metadata", "--overwrite")
    top = group / "zarr.json"
    top.write_bytes(top.read_bytes()[:100])
    verify = cfrh_cli("cache", "verify", "--cache", root)
    assert verify.returncode == 1 and "Traceback" not in verify.stderr and "cannot be read" in verify.stderr
    one_line_error(cfrh_cli("evaluate", toml, "--cache", root, "--runs", runs), "zarr.json cannot be read",
                   "--overwrite")


# -- read-only sharing ------------------------------------------------------------------------------------
def _make_read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        mode = p.stat().st_mode
        p.chmod((mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH | (0o111 if p.is_dir() else 0)) & ~0o222)


def test_a_read_only_cache_serves_train_evaluate_and_search(collection, tmp_path):
    """The cache belongs to someone else and this user may not write to it; runs go to the user's own folder."""
    cache = tmp_path / "cache"
    shutil.copytree(collection["solo"], cache)
    _make_read_only(cache)
    as_user: list[str] = []
    if os.geteuid() == 0:
        # root ignores permission bits; without CAP_DAC_OVERRIDE it obeys them like any other user
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and util-linux's setpriv is missing: cannot drop the permission override")
        as_user = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    write = subprocess.run([*as_user, sys.executable, "-c", f"open({str(cache / 'x')!r}, 'w')"],
                           capture_output=True, text=True)
    assert write.returncode != 0 and "Permission denied" in write.stderr     # truly read-only for this user
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    runs = tmp_path / "mine"
    common = ["--cache", cache, "--runs", runs]
    first_id = FeatureCache.open(cache, "team", collection["key"]).strings("ids")[0]
    outputs = {}
    for args in (["train", collection["toml"], *common, "--quiet"],
                 ["evaluate", collection["toml"], *common, "--json"],
                 ["search", collection["toml"], *common, "--bits", 16, "--text", "sky dog", "--json"],
                 ["search", collection["toml"], *common, "--bits", 16, "--query-id", first_id, "--json"],
                 ["extract", collection["toml"], "--cache", cache],     # complete: answered read-only
                 ["cache", "verify", "--cache", cache]):
        out = subprocess.run([*as_user, *CLI, *map(str, args)], capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, (args, out.stderr)
        outputs[args[0] + (args[-3] if args[0] == "search" else "")] = out.stdout
    assert json.loads(outputs["evaluate"])["run"] == "cfrh"
    assert len(json.loads(outputs["search--text"])["results"]) == 10
    assert json.loads(outputs["search--query-id"])["query"]["id"] == first_id
    assert "already complete" in outputs["extract"]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before   # nothing in the cache changed
    assert (runs / "team" / collection["key"] / "cfrh" / "16" / "image_codes.npy").is_file()
    assert (runs / "team" / collection["key"] / "cfrh" / "report" / "report.json").is_file()
    for p in [cache, *cache.rglob("*")]:          # let pytest clean up
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


# -- runs belong to the cache they were trained on ----------------------------------------------------------
STORED_SPLIT = {"method": "random", "query": 20, "seed": 0}


def _toy_cache(root: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    cache, _ = FeatureCache.create(root, "toy", "precomputed", request={"toy": 1}, overwrite=True)
    cache.write("image", rng.standard_normal((120, 8)).astype(np.float32))
    cache.write("text", rng.random((120, 6)).astype(np.float32))
    cache.write("labels", np.eye(3, dtype=np.uint8)[rng.integers(0, 3, 120)])
    cache.write("ids", [str(i) for i in range(120)])
    for part, rows in (("query", np.arange(20)), ("train", np.arange(20, 120)), ("database", np.arange(20, 120))):
        cache.write(f"splits/{part}", rows)
    cache.finalize(split=STORED_SPLIT)


def test_a_run_is_refused_against_another_cache(tmp_path):
    pipe = Pipeline(name="toy", path=None, dataset={"reader": "precomputed"}, split=dict(STORED_SPLIT),
                    train={"bits": [8], "epochs": 1, "batch_size": 20, "image_hidden": [8], "text_hidden": [8],
                           "threads": 1})
    _toy_cache(tmp_path / "cache", seed=0)
    train(pipe, tmp_path / "cache", runs_root=tmp_path / "runs")
    assert evaluate(pipe, tmp_path / "cache", runs_root=tmp_path / "runs", write=False)["results"]
    _toy_cache(tmp_path / "cache", seed=1)     # re-extracted: other features under the same address
    with pytest.raises(RunError, match="run 'cfrh' was trained on another cache.*--no-resume"):
        evaluate(pipe, tmp_path / "cache", runs_root=tmp_path / "runs")
    with pytest.raises(Exception, match="trained on another cache"):
        train(pipe, tmp_path / "cache", runs_root=tmp_path / "runs")
    train(pipe, tmp_path / "cache", runs_root=tmp_path / "runs", resume=False)
    assert evaluate(pipe, tmp_path / "cache", runs_root=tmp_path / "runs", write=False)["results"]
    # Same cache, another [split]: drawn over the features, but the run's codes were trained on the other one.
    other = Pipeline(**{**pipe.__dict__, "split": {"method": "random", "query": 30, "seed": 1}})
    with pytest.raises(RunError, match=r"trained with another \[split\].*--no-resume"):
        evaluate(other, tmp_path / "cache", runs_root=tmp_path / "runs")
    train(other, tmp_path / "cache", runs_root=tmp_path / "runs", run="other-split")
    report = evaluate(other, tmp_path / "cache", runs_root=tmp_path / "runs", run="other-split", write=False)
    assert report["protocol"]["n_query"] == 30
