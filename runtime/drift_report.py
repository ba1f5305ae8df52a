"""``gamguard drift``: replay a server's audit log through the drift monitor, after the fact.

Each verdict line of the audit log (:mod:`gamguard.runtime.server.audit`) carries its rejection
``reasons`` and ``scores`` (every check's p-value among them), the enforced ``checks`` and the
``bundle_hash``; the monitor (:mod:`gamguard.runtime.drift_monitor`) is fed the lines of one bundle in file
order — the order the server's own monitor saw them — so the replay reaches the same statistics and
flag (as one stream: where the server restarted, and its monitor with it, the replay goes on). The
HTML report plots the rolling rejection rate against alpha and the rate bound, and both statistics
against the alarm threshold.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .drift_monitor import DEFAULT_FALSE_ALARM, DEFAULT_HORIZON, DriftMonitor, DriftReference


class AuditLogError(ValueError):
    """The audit log cannot be replayed (missing, unreadable, or written by another bundle)."""


@dataclass
class Replay:
    monitor: DriftMonitor
    lines: int  # every line of the file
    other_bundle: int  # verdict lines of other bundles (skipped)
    invalid: int  # invalid-input lines (not decisions of the checks)
    unreadable: int  # lines that are not JSON objects


def read_audit_log(path: str | Path) -> list[dict]:
    """Every JSON object of a JSON-lines audit log, in file order (unparsable lines are ``{}``)."""
    p = Path(path)
    if not p.is_file():
        raise AuditLogError(f"{p}: no such audit log (gamguard serve --audit-log FILE writes one)")
    out = []
    with open(p, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = {}
            out.append(rec if isinstance(rec, dict) else {})
    return out


def replay(
    records: list[dict],
    manifest: dict,
    calibration,
    bundle_hash: str,
    *,
    horizon: int = DEFAULT_HORIZON,
    false_alarm: float = DEFAULT_FALSE_ALARM,
) -> Replay:
    """Feed the verdict lines written by the bundle ``bundle_hash`` to a fresh monitor (with history).

    The enforced checks and policy come from the lines themselves (the server may have overridden
    the bundle's); a log mixing several settings for one bundle is refused."""
    ours = [r for r in records if r.get("bundle_hash") == bundle_hash]
    verdicts = [r for r in ours if r.get("decision") in ("accepted", "rejected")]
    if not verdicts:
        seen = sorted({str(r.get("bundle_hash", ""))[:12] for r in records if r.get("bundle_hash")})
        raise AuditLogError(
            f"no verdict in the audit log was given by this bundle ({bundle_hash[:12]}); "
            + (
                f"the log's bundles: {', '.join(seen)} — pass that bundle with --bundle"
                if seen
                else "the log holds no verdict lines"
            )
        )
    settings = {(r.get("policy"), r.get("checks")) for r in verdicts}
    if len(settings) > 1:
        raise AuditLogError(
            f"the log's verdicts of this bundle were given under several guard settings "
            f"{sorted(map(str, settings))}; split the log per setting"
        )
    line_policy, checks = settings.pop()
    if not checks:
        raise AuditLogError(
            "the audit log's verdict lines do not say which checks were enforced "
            "(written by an older gamguard); it cannot be replayed"
        )
    reference = DriftReference.from_calibration(
        manifest,
        calibration,
        policy=line_policy or "calibrated",
        checks=checks,
        horizon=horizon,
        false_alarm=false_alarm,
    )
    monitor = DriftMonitor(reference, keep_history=True)
    for r in verdicts:
        monitor.observe(r.get("reasons") or [], r.get("scores") or {}, time=r.get("time"))
    return Replay(
        monitor=monitor,
        lines=len(records),
        other_bundle=sum(1 for r in records if r and r.get("bundle_hash") not in (None, bundle_hash)),
        invalid=sum(1 for r in ours if r.get("decision") == "invalid"),
        unreadable=sum(1 for r in records if not r),
    )


def rolling_rate(flags, window: int) -> np.ndarray:
    """Rate of ``flags`` over the last ``window`` entries (fewer at the start)."""
    x = np.asarray(flags, np.float64)
    c = np.concatenate([[0.0], np.cumsum(x)])
    i = np.arange(1, x.size + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def write_report(out_dir: str | Path, result: dict, rep: Replay) -> Path:
    """``out_dir/index.html`` with the drift plot (``drift.png``); ``summary.json`` next to it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    m, h = rep.monitor, rep.monitor.history
    ref = m.reference
    x = np.arange(1, m.n + 1)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.4), sharex=True)
    if m.n:
        ax1.plot(x, rolling_rate(h.rejected, m.window), color="black", lw=1.6, label="all checks")
        for c in ref.checks:
            ax1.plot(x, rolling_rate(h.per_check[c], m.window), lw=1, label=c)
        ax2.plot(x, h.rate_statistic, lw=1.4, label="rejection-rate CUSUM")
        ax2.plot(x, h.score_statistic, lw=1.4, label="score-shift CUSUM")
    ax1.axhline(ref.alpha, color="tab:green", ls="--", lw=1, label=f"alpha {ref.alpha:g}")
    ax1.axhline(ref.reference_rate, color="tab:red", ls=":", lw=1, label=f"rate bound p0 {ref.reference_rate:.3f}")
    ax1.set_ylabel(f"rejection rate (last {m.window} verdicts)")
    ax1.set_ylim(0, max(0.3, 1.1 * float(np.max(rolling_rate(h.rejected, m.window)))) if m.n else 1)
    ax1.legend(fontsize=7, ncol=3, loc="upper left")
    ax2.axhline(ref.threshold, color="tab:red", ls="--", lw=1, label=f"alarm threshold h = {ref.threshold:.1f}")
    if m.alarm:
        for ax in (ax1, ax2):
            ax.axvline(m.alarm["at"], color="tab:red", lw=0.8, alpha=0.6)
        ax2.annotate(
            f"drift flagged at verdict {m.alarm['at']}",
            (m.alarm["at"], ref.threshold),
            textcoords="offset points",
            xytext=(6, -14),
            fontsize=8,
            color="tab:red",
            bbox={"facecolor": "white", "alpha": 0.85, "linewidth": 0},
        )
    ax2.set_ylabel("CUSUM statistic (log evidence)")
    ax2.set_xlabel("verdict number (audit-log order)")
    ax2.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=90)
    plt.close(fig)

    def esc(s):
        return html.escape(str(s))

    def pct(v):
        return "–" if v is None else f"{v:.1%}"

    colour = "#cf222e" if result["drift"] else "#1a7f37"
    verdict = "DRIFT" if result["drift"] else "NO DRIFT"
    alarm = result["alarm"]
    alarm_html = (
        f"<p>Flag raised at verdict {alarm['at']} ({esc(alarm.get('time') or 'time unknown')}) by "
        f"{esc(' and '.join(alarm['by']))}.</p>"
        if alarm
        else "<p>Neither statistic reached the threshold.</p>"
    )
    rows = "".join(
        f"<tr><td>{esc(c)}</td><td>{pct(result['per_check'][c])}</td><td>{pct(result['window_per_check'][c])}</td>"
        f"<td>{pct(result['calibrated_per_check'].get(c))}</td><td>{result['per_check_statistic'][c]:.1f}</td></tr>"
        for c in result["checks"]
    )
    st, mx = result["statistics"], result["max_statistics"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gamguard drift report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}
.verdict{{font-size:26px;font-weight:bold;color:{colour}}}</style>
</head><body>
<h1>Drift of the served stream</h1>
<p class="verdict">{verdict}</p>
{alarm_html}
<p>Audit log: {esc(result["audit_log"])} — {result["n"]} verdicts of bundle {esc(result["bundle"]["hash"][:12])}
({esc(result["bundle"]["dir"])}); not counted: {result["invalid_inputs"]} invalid inputs, {result["n_skipped"]} guard
errors or verdicts without scores, {result["other_bundle"]} lines of other bundles.
Policy {esc(result["policy"])}, checks {esc(", ".join(result["checks"]))}, alpha {result["alpha"]:g}.</p>
<h2>Rejections</h2>
<p>Overall: {pct(result["rejection_rate"])} of {result["n"]} verdicts
(last {result["window"]}: {pct(result["window_rejection_rate"])});
in control up to the rate bound p0 = {result["reference_rate"]:.1%} (the highest rate the bundle's own calibration gives
with probability {1 - result["calibration_confidence"]:.1%});
the CUSUM looks for p1 = {result["alternative_rate"]:.1%}.</p>
<table><tr><th>check</th><th>rejection rate</th><th>last {result["window"]}</th><th>calibrated (cross-fitted)</th>
<th>CUSUM</th></tr>{rows}</table>
<h2>Sequential tests</h2>
<table><tr><th>statistic</th><th>now</th><th>highest</th><th>threshold</th></tr>
<tr><td>rejection-rate CUSUM (Bernoulli, p0 → p1)</td><td>{st["rejection_rate"]:.2f}</td>
<td>{mx["rejection_rate"]:.2f}</td><td>{result["threshold"]:.2f}</td></tr>
<tr><td>score-shift CUSUM (online conformal ranks of k · min of the checks' p-values)</td>
<td>{st["score_shift"]:.2f}</td>
<td>{mx["score_shift"]:.2f}</td><td>{result["threshold"]:.2f}</td></tr></table>
<p>On in-distribution traffic the flag rises within {result["horizon"]:,} verdicts with probability at most
{result["false_alarm"] + result["calibration_confidence"]:.1%}: {result["false_alarm"]:.1%} for the two
statistics together (an excursion bound after Ville's inequality,
docs/drift.md) plus {result["calibration_confidence"]:.1%} for the rate bound.</p>
<p><img src="drift.png" alt="rolling rejection rate and CUSUM statistics" style="max-width:100%"></p>
<p style="color:#888;font-size:11px">generated by gamguard drift, {time.strftime("%Y-%m-%d %H:%M:%S")}</p>
</body></html>
"""
    (out / "index.html").write_text(page)
    return out / "index.html"
