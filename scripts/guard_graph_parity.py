"""Compare the guard's in-graph arithmetic with the numpy reference on a bundle and a set of images.

    python scripts/guard_graph_parity.py [--bundle DIR] [--images DIR ...] [--npz FILE --npz-key KEY]

Runs the bundle's fused model once per batch with the guard subgraph appended
(gamguard.runtime.checks.graph) and scores the same engine outputs on the host (numpy); prints the
largest score and p-value differences and how many accept/reject decisions and reasons agree (and
whether every disagreement sits within the parity tolerance of a decision level). Images: folders of
PNG/JPEG/DICOM (recursive) and/or an .npz array of 8-bit images; default: 200 demo phantoms and 60
off-distribution phantoms.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def _images(args) -> list[np.ndarray]:
    from gamguard.runtime.decode import decode_file

    out: list[np.ndarray] = []
    for folder in args.images or []:
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
        out += [decode_file(p).pixels for p in paths[: args.max_per_source]]
    if args.npz:
        with np.load(args.npz) as z:
            arr = z[args.npz_key][: args.max_per_source]
        out += [np.asarray(a, np.float32) / 255.0 for a in arr]
    if not out:
        from gamguard.runtime.demo.phantoms import HELD_OUT_KINDS, hand_phantom, ood_set

        rng = np.random.default_rng(0)
        out = [hand_phantom(i % 4, rng, 256).image for i in range(200)]
        out += list(ood_set(list(HELD_OUT_KINDS), 10, seed=1)[0])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="calibrated bundle (default: the embedded demo bundle)")
    ap.add_argument("--images", action="append", help="folder of images (repeatable)")
    ap.add_argument("--npz", help=".npz file with an array of 8-bit images")
    ap.add_argument("--npz-key", default="test_images")
    ap.add_argument("--max-per-source", type=int, default=400)
    args = ap.parse_args(argv)

    from gamguard.runtime.checks.graph import PARITY_ATOL, attention_step_tolerance
    from gamguard.runtime.guard import Guard
    from gamguard.runtime.preprocess import preprocess_batch

    host = Guard.from_bundle(args.bundle, providers="cpu", prefer="onnxruntime", arithmetic="host")
    graph = Guard.from_bundle(args.bundle, providers="cpu", prefer="onnxruntime", arithmetic="graph")
    images = _images(args)
    worst = {"scores_abs": 0.0, "feature_rel": 0.0, "pvalues_abs": 0.0, "attention_p_abs": 0.0}
    agree = n = borderline_disagreements = other_disagreements = 0
    tol = PARITY_ATOL["pvalues"]
    for start in range(0, len(images), 32):
        x = preprocess_batch(images[start : start + 32], host.spec)
        out = graph.engine.run(x)  # the same engine outputs for both paths
        s_g, pv_g, d_g = graph.decide_outputs(out)
        out.guard = None
        s_h, pv_h, d_h = host.decide_outputs(out)
        worst["scores_abs"] = max(worst["scores_abs"], float(np.abs(s_g.sims - s_h.sims).max()))
        rel = np.abs(s_g.feature - s_h.feature) / np.maximum(np.abs(s_h.feature), 1e-12)
        worst["feature_rel"] = max(worst["feature_rel"], float(rel.max()))
        for field in ("measures", "feature", "garbage"):
            diff = float(np.abs(getattr(pv_g, field) - getattr(pv_h, field)).max())
            worst["pvalues_abs"] = max(worst["pvalues_abs"], diff)
        worst["attention_p_abs"] = max(worst["attention_p_abs"], float(np.abs(pv_g.attention - pv_h.attention).max()))
        same = (d_g.reject == d_h.reject) & (d_g.garbage == d_h.garbage)
        same &= (d_g.attention == d_h.attention) & (d_g.feature == d_h.feature)
        level, mlevel = host.level, host.calibration.null.measure_level(host.level)
        near = (np.abs(pv_h.measures - mlevel) < tol).any(axis=1)
        near |= np.abs(pv_h.attention - level) < attention_step_tolerance(host.calibration)
        for p in (pv_h.feature, pv_h.garbage):
            near |= np.abs(p - level) < tol
        agree += int(same.sum())
        borderline_disagreements += int((~same & near).sum())
        other_disagreements += int((~same & ~near).sum())
        n += len(same)
    print(f"bundle {host.bundle_dir}, {n} images")
    print(
        f"max |score diff| {worst['scores_abs']:.2e}, max relative feature diff {worst['feature_rel']:.2e}, "
        f"max |p-value diff| {worst['pvalues_abs']:.2e} (tolerance {PARITY_ATOL}), max |attention.p diff| "
        f"{worst['attention_p_abs']:.2e} (one table step: {attention_step_tolerance(host.calibration):.2e})"
    )
    print(
        f"decisions and reasons identical for {agree}/{n}; disagreements within the tolerance of a level: "
        f"{borderline_disagreements}, others: {other_disagreements}"
    )
    return 1 if other_disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
