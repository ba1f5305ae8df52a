"""`gamguard evaluate`: guard efficacy on real X-rays against published OOD baselines."""

from __future__ import annotations

import json
import sys

HELP = "train, export, calibrate and evaluate a guarded model on real X-ray data (needs [export])"
DESCRIPTION = """\
Build a guarded model from ../shared/datasets and measure what the guard rejects and keeps.

Preset pneumoniamnist: trains a GuardNet with a garbage class on PneumoniaMNIST (paediatric chest
X-rays, normal vs pneumonia) plus generated garbage images, exports the fused ONNX bundle to
WORKDIR/bundle, calibrates it on the validation split, then reports for the test split the
false-rejection rate and the accuracy of accepted predictions, and for each off-distribution set
(hannover_cxr, hand_xray, pelvis_xray, pydicom CT/MR/NM/US, generated non-X-ray images) the guard's
rejection rate, AUROC and FPR at 95% TPR, next to MSP, energy, max-logit and Mahalanobis baselines
(and the guard's AUROC minus the best baseline's, with a paired bootstrap 95% interval);
an ablation (each check alone and combined: AUROC and rejection per set); the site-calibration
protocol (a seeded half of the test split calibrates the site as `gamguard calibrate --site` does, the
other half measures the false-rejection rate before and after, at alpha 0.05 and 0.10, plus the spread
over 20 seeded halvings); and the served sliced Wasserstein against the exact one (POT) on 20 test maps.
Writes an HTML report with histograms, ROC curves and example overlays to WORKDIR/report.

example:
  gamguard evaluate --preset pneumoniamnist --data-root ../shared/datasets --workdir out/eval --json
"""


def add_arguments(parser):
    parser.add_argument(
        "--preset",
        default="pneumoniamnist",
        choices=["pneumoniamnist"],
        help="which model/data recipe to build and evaluate (default pneumoniamnist)",
    )
    parser.add_argument("--data-root", required=True, help="the shared datasets folder")
    parser.add_argument("--workdir", required=True, help="output folder (bundle/, checkpoint.pt, report/)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--alpha", type=float, default=0.05, help="calibrated false-rejection bound (default 0.05)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for training, garbage generation and the calibration split (default 0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for training (default 1; results are reproducible for a given seed and thread count)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="reuse WORKDIR/bundle and WORKDIR/checkpoint.pt from an earlier run"
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def run(args) -> int:
    from gamguard.runtime.cli import CommandError, require_export_extra

    require_export_extra()
    from gamguard.exporter.evaluate import EvalConfig, evaluate

    cfg = EvalConfig(epochs=args.epochs, alpha=args.alpha, seed=args.seed, threads=args.threads)
    try:
        results = evaluate(
            args.data_root,
            args.workdir,
            cfg,
            reuse=args.reuse,
            progress=lambda m: print(f"[evaluate] {m}", file=sys.stderr, flush=True),
        )
    except FileNotFoundError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps(results))
        return 0
    acc = results["accepted_accuracy"]  # None when nothing was accepted
    print(
        f"in-distribution false rejection {results['id_false_rejection_rate']:.3f} (alpha {results['alpha']}), "
        f"accepted accuracy {'n/a' if acc is None else format(acc, '.3f')}"
    )
    names = list(results["baselines"])
    print(f"{'set':20s} {'reject':>7s} {'AUROC':>6s} {'FPR95':>6s}  " + "  ".join(f"{b[:14]:>14s}" for b in names))
    for s, r in results["ood"].items():
        print(
            f"{s:20s} {r['rejection_rate']:7.3f} {r['auroc']:6.3f} {r['fpr95']:6.3f}  "
            + "  ".join(f"{results['baselines'][b][s]['auroc']:14.3f}" for b in names)
        )
    for s, r in results["ood"].items():
        v = r.get("vs_best_baseline")
        if v:
            lo, hi = v["ci95"]
            print(
                f"{s:20s} guard - {v['baseline']}: AUROC {v['delta']:+.4f} "
                f"(paired bootstrap 95% CI {lo:+.4f} to {hi:+.4f}; "
                f"guard not worse in {v['share_ge_0']:.0%} of resamples)"
            )
    if results.get("ablation"):
        print("ablation (AUROC / rejection):")
    for check, per_set in results.get("ablation", {}).items():
        print(
            f"  {check:10s} "
            + "  ".join(f"{s[:10]} {v['auroc']:.3f}/{v['rejection_rate']:.2f}" for s, v in per_set.items())
        )
    for a, v in results.get("site", {}).get("by_alpha", {}).items():
        print(
            f"site calibration, alpha {a}: false rejection on the measured half "
            f"{v['id_false_rejection_rate_before']:.3f} before, {v['id_false_rejection_rate_after']:.3f} after"
        )
    print(f"report: {results['report']}")
    return 0
