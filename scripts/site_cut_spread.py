"""How much a site's false-rejection rate varies with the site-calibration cut — on VALIDATION scores only.

    .venv/bin/python scripts/site_cut_spread.py BUNDLE [HALVINGS]
    (BUNDLE: e.g. WORKDIR/bundle of `gamguard evaluate`, or a bundle calibrated with `calibrate --data`)

Reproduces docs/architecture.md ("Site calibration"): the bundle's own held-out calibration images (the
null and conformal parts stored in reference.npz: validation images, no test set) are halved HALVINGS
times (default 40, seeded); one half calibrates a "site" exactly as `gamguard calibrate --site` does
(`calibration.site_arrays`), with the cross-fitted cut and with the split cut, and the other half
measures the false-rejection rate. The halves are exchangeable, so both cuts should give alpha on average;
the table shows how far a single site calibration strays from it.
"""

from __future__ import annotations

import sys

import numpy as np

from gamguard.runtime import bundle as bundle_mod
from gamguard.runtime.calibration import SITE_CUTS, site_arrays
from gamguard.runtime.checks import CalibrationData, ScoreSet, checks_key, decide, read_reference_arrays


def main(bundle_dir: str, halvings: int = 40) -> None:
    manifest = bundle_mod.load_manifest(bundle_dir, require_calibration=True)
    base = read_reference_arrays(bundle_dir)
    held = ScoreSet.concat([ScoreSet.from_arrays(base, "null_"), ScoreSet.from_arrays(base, "conformal_")])
    key = checks_key(manifest["guard"]["enforced_checks"])
    n = held.feature.size
    print(f"{n} held-out calibration images, {halvings} seeded halvings ({n // 2} site / {n - n // 2} measured)")
    print(f"{'alpha':>6} {'cut':>10} {'mean':>7} {'sd':>7} {'within ±2 pts':>14}")
    for alpha in (0.05, 0.10):
        facts = {**manifest, "calibration": {**manifest["calibration"], "alpha": alpha}}
        for cut in SITE_CUTS:
            rates = []
            for s in range(halvings):
                perm = np.random.default_rng(1000 + s).permutation(n)
                site, measured = held.take(perm[: n // 2]), held.take(perm[n // 2 :])
                data = CalibrationData(site_arrays(base, site, s, cut)[0], facts)
                d = decide(
                    data.null.pvalues(measured), checks=key, policy="calibrated", alpha=alpha, cut=data.cuts[key]
                )
                rates.append(d.reject.mean())
            r = np.asarray(rates)
            within = np.mean(np.abs(r - alpha) <= 0.02)
            print(f"{alpha:>6.2f} {cut:>10} {r.mean():>7.3f} {r.std():>7.3f} {within:>14.0%}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 40)
