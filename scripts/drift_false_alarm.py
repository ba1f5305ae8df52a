#!/usr/bin/env python3
"""How often does the drift flag rise on in-distribution traffic? Monte Carlo of both CUSUMs of
``gamguard.runtime.drift_monitor`` in their worst in-control case (docs/drift.md):

* rejection-rate CUSUM with rejections at exactly the rate bound p0 (alpha, n conformal images);
* score-shift CUSUM on i.i.d. uniform online conformal p-values (what exchangeability gives).

    .venv/bin/python scripts/drift_false_alarm.py [--streams 1000] [--length 10000] [--n 500] [--alpha 0.05]

Prints the distribution of each statistic's maximum over a stream and how many streams reached the
threshold (the simulated excursion bound, ``alarm_threshold``), which promises at most ``false_alarm``
(0.5 %) for the two together, and how many reached the looser union bound ``log(2T/false_alarm)``.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from gamguard.runtime.drift_monitor import (
    KAPPA,
    alarm_threshold,
    bernoulli_llr,
    calibrated_rate_bound,
    union_bound_threshold,
)


def max_cusum(increments, streams: int, length: int) -> np.ndarray:
    """Maximum over ``length`` steps of the CUSUM of ``increments()`` (one value per stream per step)."""
    s = np.zeros(streams)
    peak = np.zeros(streams)
    for _ in range(length):
        s = np.maximum(0.0, s + increments())
        np.maximum(peak, s, out=peak)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--length", type=int, default=10_000)
    ap.add_argument("--n", type=int, default=500, help="conformal images of the calibration")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    p0 = calibrated_rate_bound(args.alpha, args.n)
    p1 = min(2 * p0, 0.5 * (1 + p0))
    up, down = bernoulli_llr(True, p0, p1), bernoulli_llr(False, p0, p1)
    h = alarm_threshold(p0, p1, args.length)
    h_union = union_bound_threshold(args.length)
    k = args.streams
    rate = max_cusum(lambda: np.where(rng.random(k) < p0, up, down), k, args.length)
    score = max_cusum(lambda: math.log(KAPPA) + (KAPPA - 1) * np.log(rng.random(k)), k, args.length)
    print(
        f"p0 {p0:.4f}, p1 {p1:.4f}, threshold h {h:.2f} (union bound {h_union:.2f}); "
        f"{k} in-control streams of {args.length} verdicts"
    )
    for name, peak in (("rejection rate", rate), ("score shift", score)):
        q50, q99 = np.quantile(peak, [0.5, 0.99])
        print(
            f"  {name:<15} maximum: median {q50:.1f}, 99th percentile {q99:.1f}, largest {peak.max():.1f}; "
            f"reached h in {(peak >= h).sum()}/{k}"
        )
    either = np.maximum(rate, score)
    print(f"  flag raised in {(either >= h).sum()}/{k} streams (at the union bound: {(either >= h_union).sum()}/{k})")


if __name__ == "__main__":
    main()
