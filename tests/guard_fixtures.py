"""Shared helpers for the guard tests: the calibrated demo bundle and cached phantom sets.

The evidence tests run on the embedded demo bundle (``runtime/demo_bundle``, built by
``scripts/build_demo_bundle.sh``); ``GAMGUARD_TEST_BUNDLE`` points them at another calibrated bundle.
Phantom seeds here are never used by training (``derive_seed`` streams) nor by calibration
(``900_000 + seed``).
"""
from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

TEST_ID_SEED = 7_100_001
TEST_OOD_SEED = 7_100_002
TEST_SUIT_SEED = 7_100_003
TEST_SHIFT_SEED = 7_100_004
N_ID_PER_CLASS = 150  # 600 fresh in-distribution phantoms for the false-rejection evidence


def bundle_path() -> Path:
    from gamguard.runtime.bundle import default_bundle_dir

    return Path(os.environ.get("GAMGUARD_TEST_BUNDLE") or default_bundle_dir())


@pytest.fixture(scope="session")
def demo_bundle() -> Path:
    from gamguard.runtime.bundle import BundleError, load_manifest

    path = bundle_path()
    try:
        load_manifest(path)
    except BundleError as exc:
        pytest.fail(f"the calibrated demo bundle is needed for the guard tests: {exc} "
                    "(build it with scripts/build_demo_bundle.sh)")
    return path


@pytest.fixture
def copy_bundle(demo_bundle, tmp_path):
    """Factory: a private copy of the demo bundle (tests that modify or recalibrate it)."""
    def make(name: str = "bundle") -> Path:
        dst = tmp_path / name
        shutil.copytree(demo_bundle, dst)
        return dst
    return make


@functools.lru_cache(maxsize=None)
def id_phantoms(n_per_class: int = N_ID_PER_CLASS, seed: int = TEST_ID_SEED):
    from gamguard.runtime import phantoms

    images, labels = phantoms.phantom_set(n_per_class, seed, 256)
    images.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=None)
def ood_images(n_per_kind: int, seed: int = TEST_OOD_SEED, kinds: tuple[str, ...] | None = None):
    from gamguard.runtime import phantoms

    images, names = phantoms.ood_set(list(kinds or phantoms.HELD_OUT_KINDS), n_per_kind, seed, 256)
    images.setflags(write=False)
    return images, np.array(names)


@functools.lru_cache(maxsize=None)
def load_guard(path: str, **kw):
    from gamguard.runtime.guard import Guard

    return Guard.from_bundle(path, threads=2, **dict(kw))
