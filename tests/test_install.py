"""The package works installed, away from any checkout: a non-editable install into a fresh virtual
environment, run from an empty folder, on the real WIKI release."""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO, shared_path


def run(cmd: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)
    assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-3000:])
    return out


@pytest.mark.slow
def test_non_editable_install_runs_outside_the_repository(tmp_path):
    wiki = shared_path("data", "wiki")
    wheels = tmp_path / "wheels"
    # The wheel, built from the checkout without network (the running environment has setuptools).
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, REPO],
        cwd=tmp_path)
    wheel = next(wheels.glob("cfrh-*.whl"))
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    # cfrh itself from the wheel, not editable; its dependencies from this environment's site-packages
    # (already installed; a .pth line adds them after the new venv's own site-packages).
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
                .stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([python, "-c", "import cfrh, cfrh.config as c; print(cfrh.__file__); print(c.PIPELINES_DIR)"],
                cwd=work).stdout.split()
    assert where[0].startswith(str(site)) and "site-packages" in where[1]   # the installed copy, pipelines inside
    cfrh = venv / "bin" / "cfrh"
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path / "home")}
    listing = run([cfrh, "pipelines"], cwd=work, env=env).stdout
    assert "wiki" in listing and "wiki-mat" in listing and "uci-mfeat" in listing
    run([cfrh, "extract", "wiki", "--set", f"dataset.root='{wiki}'"], cwd=work, env=env)
    run([cfrh, "train", "wiki", "--bits", "16", "--epochs", "2", "--quiet"], cwd=work, env=env)
    report = run([cfrh, "evaluate", "wiki", "--json"], cwd=work, env=env).stdout
    parsed = json.loads(run([python, "-m", "json.tool"], cwd=work, input=report).stdout)
    assert parsed["protocol"]["n_query"] == 693 and parsed["bits"] == [16]
    assert (work / "cache" / "wiki" / "precomputed" / "zarr.json").is_file()
    assert (work / "runs" / "wiki" / "precomputed" / "cfrh" / "16" / "model.json").is_file()
    assert (work / "runs" / "wiki" / "precomputed" / "cfrh" / "report" / "report.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == ["cache", "runs"]
