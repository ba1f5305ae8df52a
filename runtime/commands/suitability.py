"""`gamguard suitability`: is the model suitable for a new site's / scanner's images?"""

from __future__ import annotations

HELP = "assess whether the model is suitable for a dataset from a new site or scanner (guard rejection + score shift)"
DESCRIPTION = """\
Runs the guarded model over every image under --data (PNG, JPEG, 16-bit PNG, DICOM; searched
recursively; sub-folders named after the bundle's classes are used as labels for the accuracy of
accepted inputs) and compares what the guard does there with its calibration:

  * rejection rate overall and per check (garbage class, attention, early features) with exact
    (Clopper–Pearson) confidence intervals, against the calibrated held-out rates;
  * the shift of every score's distribution against the calibration's held-out scores
    (two-sample Kolmogorov–Smirnov statistic, medians);
  * a verdict: "unsuitable" when the lower confidence bound of the rejection rate exceeds
    alpha + --tolerance, "suitable" otherwise ("inconclusive" below 20 images).

--report DIR writes index.html (embedding histograms.png, rejections.png and example heatmap
overlays) and summary.json. Exit status 0 whatever the verdict (it is in the output); 2 for usage or
bundle errors.

examples:
  gamguard suitability --data site_b/ --report site_b_report/
  gamguard suitability --bundle out/bundle --data site_b/ --json
"""


def add_arguments(parser):
    parser.add_argument("--bundle", metavar="DIR", help="bundle directory (default: the embedded demo bundle)")
    parser.add_argument("--data", metavar="DIR", required=True, help="folder of images from the new site/scanner")
    parser.add_argument("--json", action="store_true", help="print the full assessment as one JSON object")
    parser.add_argument("--report", metavar="DIR", help="write an HTML report with figures and overlays")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="rejection-rate excess over alpha tolerated before 'unsuitable' (default 0.05)",
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)"
    )
    parser.add_argument("--policy", choices=("calibrated", "strict"), help="override the bundle's guard policy")
    parser.add_argument(
        "--checks", metavar="LIST", help="enforced checks (comma-separated subset of garbage,attention,feature)"
    )
    parser.add_argument("--providers", help="ONNX Runtime providers, e.g. cuda,cpu")
    parser.add_argument(
        "--threads",
        type=int,
        help="engine intra-op threads (default: env GAMGUARD_THREADS, else ONNX Runtime's: all cores)",
    )


def run(args):
    import json
    import sys

    from gamguard.runtime.bundle import BundleError
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.guard import Guard
    from gamguard.runtime.suitability import suitability

    if not 0 < args.confidence < 1:
        raise CommandError("--confidence must be in (0, 1)")
    try:
        guard = Guard.from_bundle(
            args.bundle, providers=args.providers, threads=args.threads, policy=args.policy, enforced_checks=args.checks
        )
    except (BundleError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from exc
    try:
        result = suitability(
            guard,
            args.data,
            tolerance=args.tolerance,
            confidence=args.confidence,
            report_dir=args.report,
            progress=lambda msg: print(f"suitability: {msg}", file=sys.stderr, flush=True),
        )
    except ValueError as exc:  # DatasetError: missing folder / no images
        raise CommandError(str(exc)) from exc
    except ImportError as exc:
        raise CommandError(f"the report needs matplotlib (pip install 'matplotlib>=3.8'): {exc}") from exc
    if args.json:
        print(json.dumps(result))
        return 0
    r = result["rejection"]
    print(f"verdict: {result['verdict'].upper()}")
    for line in result["reasons"]:
        print(f"  - {line}")
    print(
        f"rejected {r['count']}/{result['n_scored']} ({(r['rate'] or 0):.1%}, CI {r['ci'][0]:.1%}–{r['ci'][1]:.1%}); "
        f"calibrated {'' if r['calibrated_rate'] is None else format(r['calibrated_rate'], '.1%')}, "
        f"bound {r['bound']:.1%}"
    )
    for check, c in result["per_check"].items():
        cal = "" if c["calibrated_rate"] is None else f"{c['calibrated_rate']:.1%}"
        print(
            f"  {check:<10} {'enforced' if c['enforced'] else 'off':<9} {(c['rate'] or 0):6.1%} "
            f"(CI {c['ci'][0]:.1%}–{c['ci'][1]:.1%}, calibrated {cal})"
        )
    print("score shift (KS vs calibration held-out):")
    for name, s in result["shift"].items():
        if s:
            print(f"  {name:<24} KS {s['ks']:.3f}  median {s['median_calibration']:.4g} -> {s['median_new']:.4g}")
    for w in result["warnings"]:
        print(f"warning: {w}")
    if result.get("accuracy"):
        a = result["accuracy"]
        acc = "n/a" if a["accepted_accuracy"] is None else f"{a['accepted_accuracy']:.1%}"
        print(
            f"labelled: {a['n_labelled']}, accepted {a['n_accepted']}, accuracy of accepted {acc} "
            f"(model without the guard: {a['unguarded_accuracy']:.1%})"
        )
    if result.get("report"):
        print(f"report: {result['report']}")
    return 0
