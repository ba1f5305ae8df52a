"""Shared fixtures. Real-data tests use ../shared/datasets and skip cleanly when it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = (REPO.parent / "shared" / "datasets").resolve()


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real X-ray data not available at {SHARED_DATASETS}")
    return SHARED_DATASETS
