"""Shared fixtures: where the real data lives (../shared), skipping clearly when it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def shared_path(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} (the project reads it from ../shared)")
    return p


@pytest.fixture(autouse=True)
def _isolated_roots(tmp_path, monkeypatch):
    """Default cache and runs roots (./cache, ./runs) point into the test's own folder, never the checkout."""
    monkeypatch.setenv("CFRH_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setenv("CFRH_RUNS", str(tmp_path / "default-runs"))


@pytest.fixture
def wiki_dir() -> Path:
    return shared_path("data", "wiki")


@pytest.fixture
def mirflickr_dir() -> Path:
    return shared_path("data", "mirflickr25k")


@pytest.fixture
def coco_mini_dir() -> Path:
    return shared_path("data", "coco-mini")


@pytest.fixture
def vit_b32_dir() -> Path:
    return shared_path("models", "clip-vit-base-patch32")
