"""Replay the drift streams of docs/drift.md in process (the same DriftMonitor the server feeds).

    .venv/bin/python scripts/drift_streams.py EVAL_BUNDLE PHANTOM_DIR

EVAL_BUNDLE: a `gamguard evaluate` workdir's bundle (validation-calibrated); PHANTOM_DIR: fresh phantoms
(`gamguard data synth --out DIR --per-class 500 --seed 424242`), judged by the demo bundle. Streams: the
PneumoniaMNIST test split in stored order and shuffled (seed 2026), the phantoms shuffled (seed 1), and
40 longer streams (3,000 verdicts each) resampled with replacement from the test split's verdicts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gamguard.exporter import evaluate as ev
from gamguard.runtime.decode import decode_file
from gamguard.runtime.drift_monitor import DriftMonitor
from gamguard.runtime.guard import Guard
from gamguard.runtime.preprocess import preprocess_batch

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def replay(guard: Guard, images: list, label: str) -> list:
    """Feed the verdicts of ``images`` (in order) to a fresh monitor, print its table row, return them."""
    monitor = DriftMonitor.for_guard(guard)
    x = preprocess_batch(images, guard.spec)
    verdicts = [v for i in range(0, len(x), 64) for v in guard.verify_tensor(x[i : i + 64])]
    for v in verdicts:
        monitor.observe(v.reasons, v.scores)
    rejected = sum(not v.accepted for v in verdicts)
    alarm = monitor.state().get("alarm")
    flag = f"at verdict {alarm['at']} ({', '.join(alarm['by'])})" if alarm else f"not within {monitor.n}"
    highest = " / ".join(f"{monitor.max_statistics[k]:.1f}" for k in ("rejection_rate", "score_shift"))
    print(
        f"| {label} | {monitor.n} | {100 * rejected / len(images):.1f} % | {flag} | {highest} "
        f"(h {monitor.reference.threshold:.1f}) |"
    )
    return verdicts


def resampled(guard: Guard, verdicts: list, streams: int = 40, length: int = 3000) -> None:
    """How many of ``streams`` streams of ``length`` verdicts, drawn with replacement (seeds 5000, 5001, ...)
    from ``verdicts``, raise the flag, and where."""
    flags = []
    for k in range(streams):
        monitor = DriftMonitor.for_guard(guard)
        for j in np.random.default_rng(5000 + k).integers(0, len(verdicts), length):
            monitor.observe(verdicts[j].reasons, verdicts[j].scores)
        alarm = monitor.state().get("alarm")
        if alarm:
            flags.append(alarm["at"])
    where = f", median at verdict {int(np.median(flags))}" if flags else ""
    print(f"\n{len(flags)} of {streams} resampled streams of {length:,} test-split verdicts raise the flag{where}")


def main(eval_bundle: Path, phantom_dir: Path) -> None:
    print("| stream | verdicts | rejected | flag | highest statistics (rate / score) |\n|---|---|---|---|---|")
    guard = Guard.from_bundle(eval_bundle)
    test = list(ev.load_pneumoniamnist(DATA_ROOT)["test"][0])
    verdicts = replay(guard, test, "PneumoniaMNIST test split, stored order")
    order = np.random.default_rng(2026).permutation(len(test))
    replay(guard, [test[i] for i in order], "PneumoniaMNIST test split, shuffled (seed 2026)")
    paths = sorted(phantom_dir.rglob("*.png"))
    paths = [paths[i] for i in np.random.default_rng(1).permutation(len(paths))]
    replay(Guard.from_bundle(None), [decode_file(p).pixels for p in paths], f"{len(paths)} phantoms, shuffled")
    resampled(guard, verdicts)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
