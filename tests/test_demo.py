"""`cfrh demo`: the model choice (real weights, or an untrained ViT-B/32 said so plainly) and the whole
extract → train → evaluate → search run on the generated scenes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfrh import demo as demo_module
from cfrh.cli import cli
from clip_fixtures import make_tiny_clip


def test_fallback_is_an_untrained_vit_b32_without_shared_files(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_module, "SHARED_VIT_B32", tmp_path / "absent")
    monkeypatch.setattr(demo_module, "hub_reachable", lambda timeout=3.0: False)
    choice = demo_module.choose_model("no-such-org/no-such-clip", tmp_path)
    assert choice.random_init and "UNTRAINED ViT-B/32" in choice.reason and "cannot be reached" in choice.reason
    config = json.loads((Path(choice.location) / "config.json").read_text())["vision_config"]
    assert (config["patch_size"], config["hidden_size"], config["num_hidden_layers"], config["image_size"]) == \
        (32, 768, 12, 224)
    assert (Path(choice.location) / "preprocessor_config.json").is_file()


def test_a_local_checkpoint_is_used_with_its_weights(tmp_path):
    clip_dir = make_tiny_clip(tmp_path / "clip")
    choice = demo_module.choose_model(str(clip_dir), tmp_path)
    assert not choice.random_init and choice.location == str(clip_dir)


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    clip_dir = make_tiny_clip(tmp_path / "clip")
    cache, data = tmp_path / "cache", tmp_path / "scenes"
    runs = tmp_path / "runs"
    result = CliRunner().invoke(cli, ["demo", "--model", str(clip_dir), "--cache", str(cache), "--data", str(data),
                                      "--runs", str(runs), "--epochs", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = result.output
    for stage in ("1/4 extract", "2/4 train", "3/4 evaluate", "4/4 search: text 'red circle' → images",
                  "4/4 search: image 00000.jpg → texts"):
        assert stage in out
    assert "UNTRAINED" not in out  # a real (if tiny) checkpoint was given
    assert len(list((data / "images").glob("*.jpg"))) == 600
    reports = list(runs.glob("demo/*/cfrh/report/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["bits"] == [16, 32, 64] and report["protocol"]["n_query"] == 100
    assert {r["direction"] for r in report["results"]} == {"i2t", "t2i", "i2i", "t2t"}
    assert (reports[0].parent / "pr_curves.png").stat().st_size > 0
    # A second run reuses the features and the finished codes.
    codes = next(runs.glob("demo/*/cfrh/64/image_codes.npy"))
    written = codes.stat().st_mtime_ns
    again = CliRunner().invoke(cli, ["demo", "--model", str(clip_dir), "--cache", str(cache), "--data", str(data),
                                     "--runs", str(runs), "--epochs", "2"], catch_exceptions=False)
    assert again.exit_code == 0, again.output
    assert "re-extracting" not in again.output
    assert "retraining" not in again.output and codes.stat().st_mtime_ns == written
    # Other settings than the run's (here its epochs; after an upgrade, new defaults): the demo's own run is
    # retrained, where `cfrh train` alone stops and asks for --no-resume.
    other = CliRunner().invoke(cli, ["demo", "--model", str(clip_dir), "--cache", str(cache), "--data", str(data),
                                     "--runs", str(runs), "--epochs", "3"], catch_exceptions=False)
    assert other.exit_code == 0, other.output
    assert "retraining" in other.output and "epochs: run has 2, asked for 3" in other.output
    run_info = json.loads(next(runs.glob("demo/*/cfrh/run.json")).read_text())
    assert run_info["config"]["epochs"] == 3 and all(run_info["complete"].values())
    assert codes.stat().st_mtime_ns != written
