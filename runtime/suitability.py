"""Model suitability: is this model fit for the images of a new site or scanner?

The guard is calibrated so that on in-distribution images it rejects at most ``alpha`` of them
(the calibration records the rate it measured). Run it over a folder from a new site: when the model
is applied to data it is suited for, the rejection rate stays near that rate and the checks' score
distributions look like the calibration's held-out scores. When the data is off (other exposure or
contrast regime, other anatomy, other modality), rejections climb and the distributions move.

Verdict rule (documented, conservative): **unsuitable** when the lower end of the two-sided
``confidence`` (default 95 %) Clopper–Pearson interval of the overall rejection rate exceeds
``alpha + tolerance`` (default tolerance 0.05), i.e. the data shows, beyond sampling noise, that the
guard rejects clearly more than the calibrated bound allows; **suitable** otherwise. Fewer than
``MIN_IMAGES`` decodable images give **inconclusive**. Each check's rate is reported against its
calibrated (cross-fitted) rate with its own interval, and each score's distribution shift against the
held-out calibration scores as the two-sample Kolmogorov–Smirnov statistic (with its p-value and the
median shift); shifts with KS ≥ ``SHIFT_KS`` and p < 0.001 are listed as warnings — they do not flip
the verdict on their own, because the verdict is about what the guard lets through.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .similarity import MEASURES

DEFAULT_TOLERANCE = 0.05
DEFAULT_CONFIDENCE = 0.95
MIN_IMAGES = 20
SHIFT_KS = 0.3
BATCH = 32
#: the scores whose distribution shift is reported (raw scores, not p-values)
SHIFT_SCORES = tuple(f"attention.{m}" for m in MEASURES) + ("feature", "garbage_prob")


def clopper_pearson(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Exact binomial confidence interval of a rate (scipy's ``binomtest(...).proportion_ci``)."""
    from scipy.stats import binomtest

    if n == 0:
        return 0.0, 1.0
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def heldout_scores(guard) -> dict[str, np.ndarray]:
    """The calibration's held-out (null + conformal) raw scores, by score name."""
    cal = guard.calibration
    parts = [cal.null_scores, cal.conformal_scores]
    out = {f"attention.{m}": np.concatenate([p.sims[:, j] for p in parts]) for j, m in enumerate(MEASURES)}
    out["feature"] = np.concatenate([p.feature for p in parts])
    out["garbage_prob"] = np.concatenate([p.garbage_prob for p in parts])
    return out


@dataclass
class Item:
    name: str
    verdict: object
    pixels: np.ndarray | None
    label: str | None = None


def _verifiable(it: Item) -> bool:
    """The guard could judge the input (not rejected as INVALID_INPUT or GUARD_ERROR)."""
    return "INVALID_INPUT" not in it.verdict.reasons and "GUARD_ERROR" not in it.verdict.reasons


def run_guard(
    guard,
    files: list[Path],
    *,
    labels: list[str | None] | None = None,
    progress: Callable[[str], None] | None = None,
    keep_pixels: Callable[[int], bool] | None = None,
) -> list[Item]:
    """Decode and verify every file (undecodable → INVALID_INPUT verdicts), in batches."""
    items: list[Item] = []
    total = len(files)
    next_report = 0.0
    for start in range(0, total, BATCH):
        chunk = files[start : start + BATCH]
        for k, (f, (pixels, v)) in enumerate(zip(chunk, guard.verify_files(chunk))):
            i = start + k
            keep = keep_pixels(i) if keep_pixels else False
            if not keep:  # the maps are only needed for example overlays
                v.cam = None
                v.reference_cam = None
            items.append(Item(str(f), v, pixels if keep else None, labels[i] if labels else None))
        done = start + len(chunk)
        if progress and (done / total >= next_report or done == total):
            progress(f"{done}/{total} images")
            next_report = done / total + 0.1
    return items


def assess(
    guard,
    items: list[Item],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    confidence: float = DEFAULT_CONFIDENCE,
    dataset: str = "",
) -> dict:
    """The suitability report as a JSON-serialisable dict (see module docstring)."""
    from scipy.stats import ks_2samp

    cal = guard.manifest.get("calibration") or {}
    alpha = guard.alpha
    n_total = len(items)
    scored = [it for it in items if _verifiable(it)]
    invalid = [it for it in items if not _verifiable(it)]
    n = len(scored)
    rejected = sum(not it.verdict.accepted for it in scored)
    lo, hi = clopper_pearson(rejected, n, confidence)
    rate = rejected / n if n else math.nan
    bound = alpha + tolerance

    by_checks = (cal.get("measured_by_checks") or {}).get(guard.enforced_checks, {}).get(guard.policy, {})
    calibrated_rate = by_checks.get("false_rejection_rate", cal.get("measured_false_rejection_rate"))
    calibrated_per_check = by_checks.get("per_check", cal.get("measured_per_check") or {})
    reason_of = {"garbage": "GARBAGE_CLASS", "attention": "ATTENTION_MISMATCH", "feature": "FEATURE_MISMATCH"}
    per_check = {}
    for check, reason in reason_of.items():
        k = sum(reason in it.verdict.reasons for it in scored)
        clo, chi = clopper_pearson(k, n, confidence)
        per_check[check] = {
            "enforced": check in guard.enforced_checks.split("+"),
            "count": k,
            "rate": k / n if n else None,
            "ci": [clo, chi],
            "calibrated_rate": calibrated_per_check.get(check),
        }
    measures_failed = {m: sum(m in it.verdict.failed_measures for it in scored) / n if n else None for m in MEASURES}

    reference = heldout_scores(guard)
    shift = {}
    warnings = []
    for name in SHIFT_SCORES:
        new = np.array([it.verdict.scores.get(name, np.nan) for it in scored], np.float64)
        new = new[np.isfinite(new)]
        ref = reference[name][np.isfinite(reference[name])]
        if new.size == 0:
            shift[name] = None
            continue
        ks = ks_2samp(new, ref)
        shift[name] = {
            "ks": float(ks.statistic),
            "p_value": float(ks.pvalue),
            "median_new": float(np.median(new)),
            "median_calibration": float(np.median(ref)),
            "median_shift": float(np.median(new) - np.median(ref)),
        }
        if ks.statistic >= SHIFT_KS and ks.pvalue < 1e-3:
            warnings.append(
                f"{name}: distribution shifted (KS {ks.statistic:.2f}, median "
                f"{np.median(ref):.3g} → {np.median(new):.3g})"
            )

    labelled = [it for it in scored if it.label is not None]
    accuracy = None
    if labelled:
        acc_items = [it for it in labelled if it.verdict.accepted]
        names = guard.class_names

        def argmax_name(it):
            ref = it.verdict.reference_index
            return names[ref] if ref is not None else None

        accuracy = {
            "n_labelled": len(labelled),
            "n_accepted": len(acc_items),
            "accepted_accuracy": (sum(it.verdict.label == it.label for it in acc_items) / len(acc_items))
            if acc_items
            else None,
            # what the model alone would have scored (argmax over the real classes, nothing refused)
            "unguarded_accuracy": sum(argmax_name(it) == it.label for it in labelled) / len(labelled),
        }

    reasons = []
    if n < MIN_IMAGES:
        verdict = "inconclusive"
        reasons.append(f"only {n} decodable image(s); at least {MIN_IMAGES} are needed for a verdict")
    elif lo > bound:
        verdict = "unsuitable"
        reasons.append(
            f"the guard rejects {rate:.1%} of the images ({confidence:.0%} CI {lo:.1%}–{hi:.1%}), "
            f"beyond the calibrated bound alpha {alpha:g} + tolerance {tolerance:g} = {bound:.1%}"
        )
        for check, c in per_check.items():
            cr = c["calibrated_rate"]
            if c["enforced"] and c["rate"] is not None and cr is not None and c["ci"][0] > cr:
                reasons.append(f"{check} check fires on {c['rate']:.1%} (calibrated {cr:.1%})")
    else:
        verdict = "suitable"
        reasons.append(
            f"rejection rate {rate:.1%} ({confidence:.0%} CI {lo:.1%}–{hi:.1%}) is consistent with "
            f"the calibrated bound alpha {alpha:g} + tolerance {tolerance:g}"
            + (f" (calibrated held-out rate {calibrated_rate:.1%})" if calibrated_rate is not None else "")
        )
    if invalid:
        reasons.append(f"{len(invalid)} of {n_total} input(s) could not be verified (INVALID_INPUT/GUARD_ERROR)")

    return {
        "verdict": verdict,
        "reasons": reasons,
        "warnings": warnings,
        "dataset": dataset,
        "n": n_total,
        "n_scored": n,
        "n_invalid": len(invalid),
        "alpha": alpha,
        "tolerance": tolerance,
        "confidence": confidence,
        "policy": guard.policy,
        "enforced_checks": guard.enforced_checks.split("+"),
        "rejection": {
            "count": rejected,
            "rate": rate if n else None,
            "ci": [lo, hi],
            "calibrated_rate": calibrated_rate,
            "bound": bound,
        },
        "per_check": per_check,
        "measures_failed_rate": measures_failed,
        "shift": shift,
        "accuracy": accuracy,
        "bundle": {
            "dir": str(guard.bundle_dir),
            "hash": guard.bundle_hash,
            "model": guard.manifest.get("model"),
            "calibration_dataset": cal.get("dataset"),
        },
    }


# --------------------------------------------------------------------------------------------------
# Report (PNG figures + HTML page)
# --------------------------------------------------------------------------------------------------


def write_report(out_dir: str | Path, result: dict, guard, items: list[Item], *, max_examples: int = 8) -> Path:
    """``out_dir/index.html`` with the histograms, the rejection chart and example overlays;
    ``summary.json`` next to it. Returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .overlays import write_overlay

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    scored = [it for it in items if _verifiable(it)]
    reference = heldout_scores(guard)

    # Histograms: each score, calibration held-out vs the new data.
    names = list(SHIFT_SCORES)
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows))
    for ax, name in zip(axes.ravel(), names):
        new = np.array([it.verdict.scores.get(name, np.nan) for it in scored], np.float64)
        new = new[np.isfinite(new)]
        ref = reference[name][np.isfinite(reference[name])]
        # the range covers all of the new data (a few images: each one counts) and the bulk of the
        # calibration part (thousands of scores: its extreme tail would squash the axis); bars are the
        # fraction of each sample per bin, so a small sample stays visible beside a large one
        lows = ([float(np.quantile(ref, 0.005))] if ref.size else []) + ([float(new.min())] if new.size else [])
        highs = ([float(np.quantile(ref, 0.995))] if ref.size else []) + ([float(new.max())] if new.size else [])
        lo_, hi_ = (min(lows), max(highs)) if lows else (0.0, 1.0)
        hi_ = hi_ if hi_ > lo_ else lo_ + 1.0
        # an unbounded positive score spanning orders of magnitude (the feature distance): log axis
        log_x = lo_ > 0 and hi_ > 1 and hi_ / lo_ > 100
        bins = np.geomspace(lo_, hi_, 30) if log_x else np.linspace(lo_, hi_, 30)
        for values, label in ((ref, "calibration held-out"), (new, "this dataset")):
            if values.size:
                ax.hist(
                    np.clip(values, bins[0], bins[-1]),
                    bins=bins,
                    weights=np.full(values.size, 1.0 / values.size),
                    alpha=0.55,
                    label=label,
                )
        if log_x:
            ax.set_xscale("log")
        s = result["shift"].get(name)
        ax.set_title(f"{name}" + (f"  KS={s['ks']:.2f}" if s else ""), fontsize=9)
        ax.set_xlabel("score" + (" (log scale)" if log_x else ""), fontsize=7)
        ax.set_ylabel("fraction of images", fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "histograms.png", dpi=90)
    plt.close(fig)

    # Rejection rates: overall and per check, observed (with CI) vs calibrated.
    labels = ["overall"] + list(result["per_check"])
    obs = [result["rejection"]["rate"] or 0.0] + [c["rate"] or 0.0 for c in result["per_check"].values()]
    cis = [result["rejection"]["ci"]] + [c["ci"] for c in result["per_check"].values()]
    calib = [result["rejection"]["calibrated_rate"]] + [c["calibrated_rate"] for c in result["per_check"].values()]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    x = np.arange(len(labels))
    err = np.array([[o - c[0] for o, c in zip(obs, cis)], [c[1] - o for o, c in zip(obs, cis)]])
    ax.bar(x - 0.2, obs, 0.4, yerr=np.maximum(err, 0), capsize=3, label="this dataset")
    ax.bar(x + 0.2, [c or 0.0 for c in calib], 0.4, label="calibrated (held-out)")
    ax.axhline(result["rejection"]["bound"], color="red", lw=1, ls="--", label="alpha + tolerance")
    ax.set_xticks(x, labels)
    ax.set_ylabel("rejection rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(out / "rejections.png", dpi=90)
    plt.close(fig)

    # Example overlays: rejected first (that is what needs looking at), then accepted.
    with_pixels = [it for it in scored if it.pixels is not None and it.verdict.cam is not None]
    rej = [it for it in with_pixels if not it.verdict.accepted][: max_examples // 2 + max_examples % 2]
    acc = [it for it in with_pixels if it.verdict.accepted][: max_examples - len(rej)]
    examples = []
    for k, it in enumerate(rej + acc):
        name = f"example_{k:02d}.png"
        write_overlay(out / name, it.pixels, it.verdict, guard.class_names, title=Path(it.name).name)
        examples.append((name, it))

    def esc(s):
        return html.escape(str(s))

    colour = {"suitable": "#1a7f37", "unsuitable": "#cf222e", "inconclusive": "#9a6700"}[result["verdict"]]
    rows_html = "".join(
        f"<tr><td>{esc(c)}</td><td>{'yes' if v['enforced'] else 'no'}</td><td>{v['count']}</td>"
        f"<td>{(v['rate'] or 0):.1%}</td><td>{v['ci'][0]:.1%}–{v['ci'][1]:.1%}</td>"
        f"<td>{'' if v['calibrated_rate'] is None else format(v['calibrated_rate'], '.1%')}</td></tr>"
        for c, v in result["per_check"].items()
    )
    shift_html = "".join(
        f"<tr><td>{esc(k)}</td><td>{v['ks']:.3f}</td><td>{v['p_value']:.2g}</td><td>{v['median_calibration']:.4g}</td>"
        f"<td>{v['median_new']:.4g}</td></tr>"
        for k, v in result["shift"].items()
        if v
    )

    from .similarity import wasserstein

    def caption(v) -> str:
        text = "accepted " + esc(v.label) if v.accepted else "rejected " + esc(", ".join(v.reasons))
        if v.reference_cam is not None and "attention.sliced_wasserstein" in v.scores:
            # the exact transport distance, affordable for a handful of examples (not served: ~0.1 s a pair)
            exact = wasserstein(v.cam, v.reference_cam)
            text += f"; Wasserstein exact {exact:.3f} (served sliced {v.scores['attention.sliced_wasserstein']:.3f})"
        return text

    ex_html = "".join(
        f"<figure><img src='{name}' alt='{esc(it.name)}'><figcaption>{esc(Path(it.name).name)}: "
        f"{caption(it.verdict)}</figcaption></figure>"
        for name, it in examples
    )
    warnings_html = (
        "<h3>Warnings</h3><ul>" + "".join(f"<li>{esc(w)}</li>" for w in result["warnings"]) + "</ul>"
        if result["warnings"]
        else ""
    )
    shift_header = (
        "<tr><th>score</th><th>KS</th><th>p</th><th>median (calibration)</th><th>median (this dataset)</th></tr>"
    )
    rj = result["rejection"]
    acc = result.get("accuracy")
    acc_html = ""
    if acc:
        aa = "n/a" if acc["accepted_accuracy"] is None else f"{acc['accepted_accuracy']:.1%}"
        acc_html = (
            f"<p>Labelled inputs: {acc['n_labelled']}; accuracy of the accepted ones {aa} "
            f"({acc['n_accepted']} accepted); the model alone, refusing nothing: "
            f"{acc['unguarded_accuracy']:.1%}.</p>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gamguard suitability report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} figure{{display:inline-block;margin:6px}}
figure img{{width:420px}} .verdict{{font-size:26px;font-weight:bold;color:{colour}}}</style></head><body>
<h1>Model suitability</h1>
<p class="verdict">{esc(result["verdict"].upper())}</p>
<ul>{"".join(f"<li>{esc(r)}</li>" for r in result["reasons"])}</ul>
{warnings_html}
<p>Dataset: {esc(result["dataset"])} — {result["n"]} inputs ({result["n_invalid"]} not verifiable).
Bundle: {esc(result["bundle"]["dir"])} ({esc(result["bundle"]["hash"][:12])}), policy {esc(result["policy"])},
checks {esc(", ".join(result["enforced_checks"]))}, alpha {result["alpha"]:g}.</p>
{acc_html}
<h2>Rejections</h2>
<p>Overall: {rj["count"]} / {result["n_scored"]} = {(rj["rate"] or 0):.1%}
({result["confidence"]:.0%} Clopper–Pearson CI {rj["ci"][0]:.1%}–{rj["ci"][1]:.1%});
calibrated held-out rate {"" if rj["calibrated_rate"] is None else format(rj["calibrated_rate"], ".1%")};
verdict bound {rj["bound"]:.1%}.</p>
<table><tr><th>check</th><th>enforced</th><th>fired</th><th>rate</th><th>CI</th><th>calibrated</th></tr>{rows_html}</table>
<p><img src="rejections.png" alt="rejection rates"></p>
<h2>Score distributions (calibration held-out vs this dataset)</h2>
<table>{shift_header}{shift_html}</table>
<p><img src="histograms.png" alt="histograms" style="max-width:100%"></p>
<h2>Examples</h2><p>Left: the image with its Grad-CAM; right: the reference map of the most likely real class
(the class the attention check compares with; the model's own argmax, which may be the garbage class, is named
under it).</p>
{ex_html}
<p style="color:#888;font-size:11px">generated by gamguard suitability, {time.strftime("%Y-%m-%d %H:%M:%S")}</p>
</body></html>
"""
    (out / "index.html").write_text(page)
    return out / "index.html"


def collect_files(data: str | Path, class_names: list[str]) -> tuple[list[Path], list[str | None], str]:
    """Image files under ``data``; when its sub-folders are all real class names, their names are
    kept as labels (for the accuracy of accepted inputs)."""
    from .datasets import iter_image_files

    root = Path(data)
    files = iter_image_files([root])
    labels: list[str | None] = [None] * len(files)
    layout = "folder"
    if root.is_dir():
        subdirs = {d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")}
        if subdirs and subdirs <= set(class_names):
            labels = [
                Path(f).relative_to(root).parts[0] if len(Path(f).relative_to(root).parts) > 1 else None for f in files
            ]
            layout = "image_folder (labelled)"
    return files, labels, layout


def suitability(
    guard,
    data: str | Path | Iterable,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    confidence: float = DEFAULT_CONFIDENCE,
    report_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    max_examples: int = 8,
) -> dict:
    """Run the guard over ``data`` (a folder) and assess it; optionally write the report."""
    files, labels, layout = collect_files(data, guard.class_names)
    if progress:
        progress(f"{len(files)} images in {data} ({layout})")
    keep = None
    if report_dir is not None:
        # keep pixels of a spread of images for overlays (first of each ~1/4 of the set is not enough)
        step = max(1, len(files) // (4 * max_examples))
        keep = lambda i: i % step == 0  # noqa: E731
    items = run_guard(guard, files, labels=labels if any(labels) else None, progress=progress, keep_pixels=keep)
    result = assess(guard, items, tolerance=tolerance, confidence=confidence, dataset=str(data))
    if report_dir is not None:
        result["report"] = str(write_report(report_dir, result, guard, items, max_examples=max_examples))
    return result
