"""`gamguard drift`: has the served stream drifted from the calibration? (from an audit log)"""

from __future__ import annotations

HELP = "replay a server's audit log through the drift monitor: rejection rate per check, score shift, drift flag"
DESCRIPTION = """\
Replays the verdicts of an audit log (gamguard serve --audit-log FILE) in order through the same
drift monitor the server runs live (its state is in the gamguard_drift* metrics and in
GetModelInfo), and reports:

  * the rejection rate overall and per check (garbage class, attention, early features), over the
    whole log and over the last 200 verdicts, with the bundle's calibrated per-check rates;
  * a rejection-rate CUSUM: the guard's rejections against the highest in-distribution rate the
    bundle's own calibration can give (p0, a Beta bound of the split-conformal cut's rate) versus
    a doubled rate;
  * a score-shift CUSUM: each verdict's monitored statistic (k * the smallest of its k enforced
    checks' p-values: every check at equal weight) ranked among the calibration's and every
    earlier verdict's (online conformal p-values, uniform while the stream is exchangeable
    with the calibration), turned into evidence by a power calibrator;
  * the drift flag: raised (and kept) when either statistic reaches the threshold h, set so that
    in-distribution traffic raises it within --horizon verdicts with probability at most
    --false-alarm (plus 0.5 % for the rate bound p0): an excursion bound estimated by a seeded
    simulation of in-control streams (12.1 at the defaults), or log(2 * horizon / false-alarm) if
    that is lower (docs/drift.md).

Several files (a log rotated by logrotate) are read in the order given, oldest first. Only the
lines written by the given bundle (by its hash) are replayed; invalid inputs and guard
errors are counted but are not decisions of the checks. --report DIR writes index.html with the
rolling rejection rate against alpha and both statistics against the threshold (drift.png), and
summary.json. Exit status 0 whatever the flag (it is in the output); 2 for usage, log or bundle errors.

examples:
  gamguard drift --audit-log /var/log/gamguard/audit.jsonl --bundle /opt/gamguard/bundle
  gamguard drift --audit-log audit.jsonl --json --report drift_report/
  gamguard drift --audit-log audit.jsonl.1 audit.jsonl --bundle /opt/gamguard/bundle
"""


def add_arguments(parser):
    from gamguard.runtime.drift_monitor import DEFAULT_FALSE_ALARM, DEFAULT_HORIZON

    parser.add_argument(
        "--audit-log", metavar="FILE", nargs="+", required=True, help="JSON-lines audit log(s) of gamguard serve"
    )
    parser.add_argument(
        "--bundle",
        metavar="DIR",
        help="the bundle that served the log; only its lines are replayed (default: the directory the log "
        "records, when it still holds that bundle, else the embedded demo bundle)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--report", metavar="DIR", help="write an HTML report with the drift plot")
    parser.add_argument(
        "--horizon",
        type=int,
        default=DEFAULT_HORIZON,
        metavar="N",
        help=f"verdicts the false-alarm guarantee covers (default {DEFAULT_HORIZON}; the threshold's simulation "
        "takes about a second per 100,000)",
    )
    parser.add_argument(
        "--false-alarm",
        type=float,
        default=DEFAULT_FALSE_ALARM,
        metavar="P",
        help=f"false-alarm probability of the two statistics within the horizon (default {DEFAULT_FALSE_ALARM})",
    )


def logged_bundle_dir(records: list[dict]) -> str | None:
    """Without --bundle: the directory the log's last verdict was served from, when it still holds
    that bundle (same hash); None (the embedded demo bundle) otherwise."""
    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.bundle import BundleError

    last = next((r for r in reversed(records) if r.get("decision") in ("accepted", "rejected")), None)
    if not last or not last.get("bundle_dir"):
        return None
    try:
        manifest = bundle_mod.load_manifest(last["bundle_dir"], require_calibration=True)
    except (BundleError, OSError, ValueError):  # moved, changed or gone
        return None
    return last["bundle_dir"] if bundle_mod.bundle_hash(manifest) == last.get("bundle_hash") else None


def run(args):
    import json

    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.bundle import BundleError
    from gamguard.runtime.checks.reference import CalibrationData
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.drift_report import AuditLogError, read_audit_log, replay, write_report

    if args.horizon < 1:
        raise CommandError("--horizon must be at least 1")
    if not 0 < args.false_alarm < 1:
        raise CommandError("--false-alarm must be in (0, 1)")
    try:
        records = [record for path in args.audit_log for record in read_audit_log(path)]
        bundle_dir = bundle_mod.resolve_bundle(args.bundle or logged_bundle_dir(records))
        manifest = bundle_mod.load_manifest(bundle_dir, require_calibration=True)
        calibration = CalibrationData.load(bundle_dir, manifest)
        bundle_hash = bundle_mod.bundle_hash(manifest)
        rep = replay(
            records,
            manifest,
            calibration,
            bundle_hash,
            horizon=args.horizon,
            false_alarm=args.false_alarm,
        )
    except (BundleError, AuditLogError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    result = rep.monitor.state()
    result.update(
        {
            "audit_log": ", ".join(map(str, args.audit_log)),
            "bundle": {"dir": str(bundle_dir), "hash": bundle_hash},
            "lines": rep.lines,
            "other_bundle": rep.other_bundle,
            "invalid_inputs": rep.invalid,
            "unreadable_lines": rep.unreadable,
        }
    )
    if args.report:
        try:
            result["report"] = str(write_report(args.report, result, rep))
        except ImportError as exc:
            raise CommandError(f"the report needs matplotlib (pip install 'matplotlib>=3.8'): {exc}") from exc
    if args.json:
        print(json.dumps(result))
        return 0

    def pct(v):
        return "–" if v is None else f"{v:.1%}"

    alarm = result["alarm"]
    print(
        "DRIFT" if result["drift"] else "no drift",
        *([f"(flag raised at verdict {alarm['at']} by {' and '.join(alarm['by'])})"] if alarm else []),
    )
    print(
        f"{result['n']} verdicts of bundle {bundle_hash[:12]} (not counted: {rep.invalid} invalid inputs, "
        f"{result['n_skipped']} guard errors or verdicts without scores; {rep.other_bundle} lines of other bundles)"
    )
    print(
        f"rejection rate {pct(result['rejection_rate'])} (last {result['window']}: "
        f"{pct(result['window_rejection_rate'])}); alpha {result['alpha']:g}, in-control bound "
        f"{result['reference_rate']:.1%}"
    )
    for c in result["checks"]:
        print(f"  {c:<10} {pct(result['per_check'][c]):>6}  (calibrated {pct(result['calibrated_per_check'].get(c))})")
    st = result["statistics"]
    print(
        f"rejection-rate CUSUM {st['rejection_rate']:.2f}, score-shift CUSUM {st['score_shift']:.2f}, "
        f"threshold {result['threshold']:.2f}"
    )
    if args.report:
        print(f"report: {result['report']}")
    return 0
