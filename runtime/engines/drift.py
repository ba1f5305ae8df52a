"""How far a (FP16) TensorRT engine drifts from ONNX Runtime FP32 on the calibration images, and
whether the calibrated false-rejection rate still holds on it.

The guard's references and thresholds are numbers of the engine that calibrated them. Serving a plan
built later, or in FP16, changes those numbers a little; this check says how much, per output
(``logits``, ``cam``, ``early``), and — when a guard decision function is given — re-measures the
in-distribution false-rejection rate (FRR) on the engine that will serve.

"Still holds" is decided with a one-sided binomial tolerance: the FRR measured on ``n`` images holds
when it is at most ``alpha + 1.645 * sqrt(alpha * (1 - alpha) / n)`` (the 95 % upper bound of an
FRR of exactly ``alpha`` seen on ``n`` images), so a small calibration set does not fail on noise.

Whether the *engine* is to blame is a paired question, asked of the same images on both engines
(:func:`paired_frr_change`): the FRR of a given calibration varies around alpha from one sample of
in-distribution images to the next (on the demo bundle, 0.020 to 0.090 over 15 samples of 256
synthesized phantoms, mean 0.057), and when it exceeds the bound on ONNX Runtime CPU as well, the
images or the calibration are the cause, not the engine. The engine keeps the promise when its FRR
holds, or — only when the reference's FRR misses the bound too — when it rejects no more of these
images than the reference does (beyond chance).

Plain numpy; engines are anything with ``run(batch) -> (logits, cam, early)`` fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from .base import OUTPUT_NAMES

Z_95_ONE_SIDED = 1.645


def _per_image_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.einsum("ij,ij->i", a, b) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))


class DriftAccumulator:
    """Collects per-output differences between a reference engine and a candidate, batch by batch."""

    def __init__(self):
        self.n = 0
        self._max_abs = dict.fromkeys(OUTPUT_NAMES, 0.0)
        self._sum_abs = dict.fromkeys(OUTPUT_NAMES, 0.0)
        self._count = dict.fromkeys(OUTPUT_NAMES, 0)
        self._ref_scale = dict.fromkeys(OUTPUT_NAMES, 0.0)
        self._cosines = {n: [] for n in OUTPUT_NAMES}
        self._top1_agree = 0

    def add(self, reference, candidate) -> None:
        for name in OUTPUT_NAMES:
            r = np.asarray(getattr(reference, name), np.float64)
            c = np.asarray(getattr(candidate, name), np.float64)
            if r.shape != c.shape:
                raise ValueError(f"{name}: reference shape {r.shape} != candidate shape {c.shape}")
            d = np.abs(r - c)
            self._max_abs[name] = max(self._max_abs[name], float(d.max(initial=0.0)))
            self._sum_abs[name] += float(d.sum())
            self._count[name] += d.size
            self._ref_scale[name] = max(self._ref_scale[name], float(np.abs(r).max(initial=0.0)))
            self._cosines[name].append(_per_image_cosine(r, c))
        self._top1_agree += int((np.argmax(reference.logits, 1) == np.argmax(candidate.logits, 1)).sum())
        self.n += int(np.asarray(reference.logits).shape[0])

    def report(self) -> dict:
        out = {"n": self.n, "top1_agreement": (self._top1_agree / self.n) if self.n else None}
        for name in OUTPUT_NAMES:
            cos = np.concatenate(self._cosines[name]) if self._cosines[name] else np.zeros(0)
            out[name] = {
                "max_abs": self._max_abs[name],
                "mean_abs": self._sum_abs[name] / max(self._count[name], 1),
                # max |diff| relative to the largest reference magnitude: comparable across outputs
                "max_rel": self._max_abs[name] / self._ref_scale[name] if self._ref_scale[name] else 0.0,
                "min_cosine": float(cos.min()) if cos.size else None,
                "mean_cosine": float(cos.mean()) if cos.size else None,
            }
        return out


def frr_tolerance(alpha: float, n: int) -> float:
    """Largest FRR on ``n`` in-distribution images still consistent with a true FRR of ``alpha``."""
    if n <= 0:
        raise ValueError("n must be positive")
    return alpha + Z_95_ONE_SIDED * math.sqrt(alpha * (1.0 - alpha) / n)


def frr_check(accepted: np.ndarray, alpha: float) -> dict:
    """Measured FRR of a boolean acceptance vector over in-distribution images vs ``alpha``."""
    accepted = np.asarray(accepted, bool)
    n = int(accepted.size)
    frr = float(1.0 - accepted.mean()) if n else float("nan")
    bound = frr_tolerance(alpha, n)
    return {"n": n, "frr": frr, "alpha": alpha, "bound": bound, "holds": bool(frr <= bound)}


def paired_frr_change(accepted_reference: np.ndarray, accepted_candidate: np.ndarray) -> dict:
    """Does the candidate engine reject more in-distribution images than the reference, on the same images?

    ``more``: images the reference accepts and the candidate rejects; ``fewer``: the opposite. If the
    engine changed nothing systematic, each of these discordant images is as likely to fall either way
    (McNemar's exact test): ``p = P(Binomial(more + fewer, 1/2) >= more)``, and the candidate is
    ``worse`` when ``p < 0.05``. (McNemar, Psychometrika 12:153-157, 1947.)
    """
    from scipy.stats import binomtest

    ref = np.asarray(accepted_reference, bool)
    cand = np.asarray(accepted_candidate, bool)
    if ref.shape != cand.shape:
        raise ValueError(f"decision vectors differ in shape: {ref.shape} vs {cand.shape}")
    more = int((ref & ~cand).sum())
    fewer = int((~ref & cand).sum())
    p = float(binomtest(more, more + fewer, 0.5, alternative="greater").pvalue) if more + fewer else 1.0
    return {"more_rejected": more, "fewer_rejected": fewer, "p": p, "worse": bool(p < 0.05)}


def drift_report(
    reference_engine,
    candidate_engine,
    batches: Iterable[np.ndarray],
    *,
    decide: Callable[[np.ndarray, object], np.ndarray] | None = None,
    alpha: float | None = None,
    calibrated_frr: float | None = None,
) -> dict:
    """Run both engines over ``batches`` (preprocessed ``[N,C,H,W]`` float32 calibration images).

    ``decide(batch, engine_output) -> bool[N]`` is the guard's accept decision on one engine's
    outputs; with it and ``alpha`` the report gains ``frr`` for the candidate (and the reference, for
    comparison) and the rate at which the two engines' decisions agree.
    """
    acc = DriftAccumulator()
    accepted_ref, accepted_cand = [], []
    for batch in batches:
        ref = reference_engine.run(batch)
        cand = candidate_engine.run(batch)
        acc.add(ref, cand)
        if decide is not None:
            accepted_ref.append(np.asarray(decide(batch, ref), bool))
            accepted_cand.append(np.asarray(decide(batch, cand), bool))
    report = {"drift": acc.report()}
    if decide is not None and alpha is not None and acc.n:
        a_ref, a_cand = np.concatenate(accepted_ref), np.concatenate(accepted_cand)
        candidate, reference = frr_check(a_cand, alpha), frr_check(a_ref, alpha)
        change = paired_frr_change(a_ref, a_cand)
        report["frr"] = {
            "candidate": candidate,
            "reference": reference,
            "calibrated": calibrated_frr,
            "decision_agreement": float((a_ref == a_cand).mean()),
            "change": change,
            # the engine's verdict: its FRR holds or, where the reference's misses the bound as well (the
            # images are to blame), it rejects no more of them than the reference does
            "engine_keeps_promise": bool(candidate["holds"] or (not reference["holds"] and not change["worse"])),
        }
    else:
        report["frr"] = None
    return report


def guard_decider(bundle_dir, manifest):
    """``(decide, alpha)``: the serving guard's accept decision on one engine's outputs, from the
    bundle's calibration — :meth:`gamguard.runtime.guard.Guard.decide_outputs` of a guard set up as
    :meth:`~gamguard.runtime.guard.Guard.from_bundle` sets it up (same tables, conformal cut, policy and
    enforced checks), without an engine of its own."""
    from ..checks import CalibrationData
    from ..guard import Guard

    policy, key = Guard.settings(manifest)
    guard = Guard(
        bundle_dir, manifest, None, CalibrationData.load(bundle_dir, manifest), policy=policy, enforced_checks=key
    )

    def decide(batch, out):
        return ~guard.decide_outputs(out)[-1].reject

    return decide, guard.alpha


def OrtCpuReference(onnx_path, *, threads: int | None = None):
    """ONNX Runtime FP32 on the CPU over a bundle's ``model.onnx``: the parity reference."""
    from .onnx import OnnxEngine

    return OnnxEngine(onnx_path, providers="cpu", threads=threads, cuda_graphs=False)
