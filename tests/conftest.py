"""Shared fixtures (plain helpers are in ``testlib.py``). Real-data tests use ../shared/datasets and skip
cleanly when it is absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from testlib import demo_bundle_path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = (REPO.parent / "shared" / "datasets").resolve()


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real X-ray data not available at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def demo_bundle() -> Path:
    """The calibrated demo bundle (read-only: use ``copy_bundle`` to modify one)."""
    return demo_bundle_path()


@pytest.fixture
def copy_bundle(demo_bundle, tmp_path):
    """Factory: a private copy of the demo bundle (tests that modify or recalibrate it)."""

    def make(name: str = "bundle") -> Path:
        dst = tmp_path / name
        shutil.copytree(demo_bundle, dst)
        return dst

    return make
