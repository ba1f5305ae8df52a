"""How many featureless images (flat fields) does a bundle's guard reject?

    .venv/bin/python scripts/featureless_probe.py [BUNDLE] [--n 60] [--seed 77]

A blank exposure or a detector fault gives an image with almost nothing in it: a uniform grey level, a
faint gradient, noise. Such images are far from any X-ray, yet a classifier's early features and Grad-CAM
need not notice (docs/architecture.md, "Known gaps"). This probe generates ``n`` of them (seeded: level
0.2–0.95, a gradient of ±5 % across the image, Gaussian noise σ 0.005–0.03, 256²), runs them through the
guard and prints how many are rejected and by which checks. BUNDLE defaults to the embedded demo bundle.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from gamguard.runtime.guard import Guard
from gamguard.runtime.preprocess import preprocess_batch


def flat_fields(n: int, seed: int, size: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        im = rng.uniform(0.2, 0.95) + rng.uniform(-0.05, 0.05) * xx + rng.uniform(-0.05, 0.05) * yy
        out.append(np.clip(im + rng.normal(0, rng.uniform(0.005, 0.03), (size, size)), 0, 1).astype(np.float32))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", help="calibrated bundle (default: the embedded demo bundle)")
    parser.add_argument("--n", type=int, default=60, help="flat fields to generate (default 60)")
    parser.add_argument("--seed", type=int, default=77)
    args = parser.parse_args()
    guard = Guard.from_bundle(args.bundle)
    verdicts = guard.verify_tensor(preprocess_batch(flat_fields(args.n, args.seed), guard.spec))
    rejected = sum(not v.accepted for v in verdicts)
    reasons = collections.Counter(r for v in verdicts for r in v.reasons)
    print(f"bundle {guard.bundle_dir}: {rejected} of {args.n} flat fields rejected ({100 * rejected / args.n:.0f} %)")
    for reason, count in reasons.most_common():
        print(f"  {reason:20s} {count}")
    accepted = collections.Counter(v.label for v in verdicts if v.accepted)
    if accepted:
        print("  accepted as: " + ", ".join(f"{label} {count}" for label, count in accepted.most_common()))


if __name__ == "__main__":
    main()
