"""Training data of the demo model: phantoms and garbage images, preprocessed like serving does.

Torch-free on purpose: :class:`EpochDataPrefetcher` generates the next epoch's images in a worker
process while the current epoch trains, and that process should not have to import torch.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from gamguard.runtime.bundle import InputSpec
from gamguard.runtime.demo import phantoms
from gamguard.runtime.preprocess import preprocess_batch

GARBAGE_NAME = "garbage"
#: What the demo model expects; also what the exported bundle records.
DEMO_INPUT = InputSpec(channels=1, height=128, width=128, mean=(0.5,), std=(0.25,), resize="stretch")


def stage_names() -> list[str]:
    """The in-distribution (maturity stage) class names, in label order."""
    return list(phantoms.CLASS_NAMES)


def class_names() -> list[str]:
    """All class names of the demo model: the stages, then ``"garbage"`` (the last class)."""
    return stage_names() + [GARBAGE_NAME]


def derive_seed(*parts: int) -> int:
    """A 31-bit seed from a tuple of integers (numpy's SeedSequence hashing: no accidental overlap)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def make_dataset(
    per_class: int, garbage_per_kind: int, seed: int, *, size: int = 256, kinds=None, spec: InputSpec = DEMO_INPUT
) -> tuple[np.ndarray, np.ndarray]:
    """Phantoms of every stage plus garbage images, preprocessed: ``(x [N,C,H,W], labels [N])``.

    Every image goes through :func:`gamguard.runtime.preprocess.preprocess_batch` with ``spec``, the
    function serving uses. Garbage images (``kinds``, default the generator's ``GARBAGE_TRAIN_KINDS``)
    get the garbage label, the last class.
    """
    kinds = list(phantoms.GARBAGE_TRAIN_KINDS if kinds is None else kinds)
    xs, ys = [], []
    if per_class > 0:
        images, labels = phantoms.phantom_set(per_class, derive_seed(seed, 0), size)
        xs.append(preprocess_batch(list(images), spec))
        ys.append(np.asarray(labels, np.int64))
    if garbage_per_kind > 0 and kinds:
        images, _ = phantoms.ood_set(kinds, garbage_per_kind, derive_seed(seed, 1), size)
        xs.append(preprocess_batch(list(images), spec))
        ys.append(np.full(len(images), len(stage_names()), np.int64))
    if not xs:
        raise ValueError("empty dataset: per_class and garbage_per_kind are both 0")
    return np.concatenate(xs), np.concatenate(ys)


def _make_dataset_job(per_class: int, garbage_per_kind: int, seed: int, size: int, spec: dict):
    return make_dataset(per_class, garbage_per_kind, seed, size=size, spec=InputSpec.from_manifest(spec))


class EpochDataPrefetcher:
    """Datasets for a sequence of seeds, the next one generated in a worker process meanwhile.

    The data depend only on the seeds, never on the process that makes them, so prefetching keeps
    training deterministic. ``workers=0`` generates in the calling process.
    """

    def __init__(
        self,
        per_class: int,
        garbage_per_kind: int,
        seeds: list[int],
        *,
        size: int = 256,
        spec: InputSpec = DEMO_INPUT,
        workers: int = 1,
    ):
        self._args = (per_class, garbage_per_kind)
        self._size, self._spec = size, spec.to_manifest()
        self._seeds = list(seeds)
        self._pool = None
        self._pending: dict[int, Future] = {}
        if workers > 0 and len(self._seeds) > 0:
            # "spawn": a forked child of a process running torch/OpenCV thread pools can deadlock.
            self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def _submit(self, i: int) -> None:
        if self._pool is not None and i < len(self._seeds) and i not in self._pending:
            self._pending[i] = self._pool.submit(_make_dataset_job, *self._args, self._seeds[i], self._size, self._spec)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The dataset for ``seeds[i]``; starts generating ``seeds[i + 1]`` in the background."""
        self._submit(i)
        self._submit(i + 1)
        if i in self._pending:
            return self._pending.pop(i).result()
        return _make_dataset_job(*self._args, self._seeds[i], self._size, self._spec)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
