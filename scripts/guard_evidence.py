#!/usr/bin/env python
"""Reproducible evidence for the guard on a calibrated bundle (default: the embedded demo bundle):

* in-distribution false-rejection rate on fresh phantoms (seed never used by training/calibration);
* rejection per off-distribution kind (the generator's held-out kinds, never seen by garbage
  training; optionally the garbage-training kinds too) — an ablation table: garbage class alone,
  attention check alone, early-feature check alone, all combined (each set with its own calibrated cut);
* the cost of the guard itself (all seven measures + the early-feature check + p-values + decision)
  per image, batch 1 and amortised over a batch, on this CPU (the engine call timed separately).

    .venv/bin/python scripts/guard_evidence.py [--bundle DIR] [--id-per-class 100] [--per-kind 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from gamguard.runtime.demo import phantoms
from gamguard.runtime.guard import Guard
from gamguard.runtime.preprocess import preprocess_batch

ID_SEED = 5_000_001  # never used by training (derive_seed streams) or calibration (900_000 + seed)
OOD_SEED = 5_000_002
ABLATION = {
    "garbage": "garbage",
    "attention": "attention",
    "feature": "feature",
    "combined": "garbage+attention+feature",
}


def _median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in ms (median: robust to other load on a shared machine)."""
    for _ in range(10):
        fn()
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def guard_cost(guard: Guard, images: np.ndarray, repeats: int = 300) -> dict:
    """Per-image cost of the guard part alone (seven measures + feature check + p-values +
    decision, on engine outputs already computed), and of the engine and the full call for scale."""
    from gamguard.runtime.engines import EngineOutput

    x = preprocess_batch(list(images[:32]), guard.spec)
    out = guard.engine.run(x)

    def guard_part(lo, hi):
        guard.decide_outputs(EngineOutput(out.logits[lo:hi], out.cam[lo:hi], out.early[lo:hi]))

    n = x.shape[0]
    return {
        "guard_ms_per_image_batch1": _median_ms(lambda r=0: guard_part(r % n, r % n + 1), repeats),
        "guard_ms_per_image_batch32": _median_ms(lambda r=0: guard_part(0, n), 30) / n,
        "engine_ms_batch1": _median_ms(lambda r=0: guard.engine.run(x[r % n : r % n + 1]), 50),
        "engine_ms_per_image_batch32": _median_ms(lambda r=0: guard.engine.run(x), 5) / n,
        "verify_tensor_ms_batch1": _median_ms(lambda r=0: guard.verify_tensor(x[r % n : r % n + 1]), 50),
        "timing": "median wall time; guard part excludes the engine",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle")
    ap.add_argument("--id-per-class", type=int, default=100)
    ap.add_argument("--per-kind", type=int, default=50)
    ap.add_argument("--garbage-kinds", action="store_true", help="also report the garbage-training kinds")
    ap.add_argument("--policy", choices=("calibrated", "strict"))
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    guard = Guard.from_bundle(args.bundle, policy=args.policy, threads=args.threads)
    keys = list(ABLATION.values())
    images, _ = phantoms.phantom_set(args.id_per_class, ID_SEED, 256)
    id_rej = guard.rejections_by_checks(images, keys)
    result = {
        "bundle": str(guard.bundle_dir),
        "alpha": guard.alpha,
        "policy": guard.policy,
        "in_distribution": {"n": int(len(images)), **{name: float(id_rej[k].mean()) for name, k in ABLATION.items()}},
        "ood": {},
    }
    kinds = list(phantoms.HELD_OUT_KINDS) + (list(phantoms.GARBAGE_TRAIN_KINDS) if args.garbage_kinds else [])
    ood, names = phantoms.ood_set(kinds, args.per_kind, OOD_SEED, 256)
    names = np.array(names)
    rej = guard.rejections_by_checks(ood, keys)
    for kind in kinds:
        sel = names == kind
        result["ood"][kind] = {
            "n": int(sel.sum()),
            "held_out": kind in phantoms.HELD_OUT_KINDS,
            **{name: float(rej[k][sel].mean()) for name, k in ABLATION.items()},
        }
    result["cost"] = guard_cost(guard, images)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"bundle {result['bundle']}  policy {guard.policy}  alpha {guard.alpha}")
    idr = result["in_distribution"]
    print(f"\nin-distribution false rejection (n={idr['n']}): " + ", ".join(f"{k} {idr[k]:.3f}" for k in ABLATION))
    print("\n| kind | n | garbage alone | attention alone | feature alone | combined |")
    print("|---|---|---|---|---|---|")
    for kind, r in result["ood"].items():
        tag = "" if r["held_out"] else " (garbage-trained)"
        print(f"| {kind}{tag} | {r['n']} | " + " | ".join(f"{r[k]:.1%}" for k in ABLATION) + " |")
    c = result["cost"]
    print(
        f"\nguard cost per image: {c['guard_ms_per_image_batch1']:.3f} ms (batch 1), "
        f"{c['guard_ms_per_image_batch32']:.3f} ms (batch 32); engine {c['engine_ms_batch1']:.2f} ms (batch 1), "
        f"{c['engine_ms_per_image_batch32']:.2f} ms/image (batch 32); full verify_tensor batch 1 "
        f"{c['verify_tensor_ms_batch1']:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
