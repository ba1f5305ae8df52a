"""The guard decision: per input, a verdict that either carries a label or says why it does not.

Checks (each can be enforced or not; ``bundle.json`` ``guard.enforced_checks``, overridable at load):

* ``garbage`` — the argmax of the logits is the garbage class → ``GARBAGE_CLASS``, always a rejection
  when the check is enforced (when it is not, the label is the argmax over the real classes);
* ``attention`` — the Grad-CAM map is compared with the reference map of the predicted real class by
  all seven measures of :mod:`gamguard.runtime.similarity`; each score becomes a one-sided p-value
  ``attention.<measure>.p`` against the held-out in-distribution scores, and the smallest of them,
  calibrated once more against the null part, is the check's p-value ``attention.p``
  (:mod:`gamguard.runtime.checks.attention`) → ``ATTENTION_MISMATCH`` with the measures that failed;
* ``feature`` — the early-feature dissimilarity, a class-conditional Mahalanobis distance
  (:mod:`gamguard.runtime.checks.feature`), and its p-value ``feature.p`` → ``FEATURE_MISMATCH``;
* the ``garbage`` check also has a continuous score, ``garbage_margin`` (garbage logit minus the largest
  real-class logit), and its p-value ``garbage.p`` (:mod:`gamguard.runtime.checks.garbage`).

Policies:

* ``calibrated`` (default): ``combined_p`` = the weighted Bonferroni minimum ``min_i p_i / w_i`` of the
  enforced checks' p-values (``garbage.p``, ``attention.p``, ``feature.p``; weights from the bundle's
  ``calibration.combination``, see :mod:`gamguard.runtime.checks.combine`); the input is
  rejected when its split-conformal p-value ``conformal_p`` against the calibration's conformal part is
  ``<= alpha``, which bounds the in-distribution false-rejection rate (garbage-class rejections
  included) at ``alpha``. Equivalently every check fails whose share crosses the calibrated level
  ``t*`` (``thresholds["combined_p"]``), i.e. whose p-value is below ``w_i t*`` (``thresholds["<check>.p"]``);
  those are the reasons, and for the attention check the measures whose own p-value is below the
  equivalent per-measure level (``thresholds["attention.<measure>.p"]``) are ``failed_measures``.
* ``strict``: a check fails as soon as its own p-value is ``<= alpha`` (any attention measure counts);
  more rejections than ``alpha`` on in-distribution data, by design.

Fail closed: :meth:`Guard.verify_tensor` and :meth:`Guard.verify_images` never raise. An input that
cannot become a model input (wrong shape, NaN/Inf, undecodable) is rejected with ``INVALID_INPUT``
(that item only); any exception in the engine or the guard rejects every item of the batch with
``GUARD_ERROR``. No code path returns a label without all enforced checks having passed.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import bundle as bundle_mod
from .bundle import BundleError, InputSpec
from .checks import (
    CHECKS,
    REASON_OF_CHECK,
    CalibrationData,
    DecisionRule,
    checks_key,
    conformal_statistic,
    decide,
    softmax,
)
from .checks.graph import (
    GUARD_COLUMNS,
    GuardGraphError,
    guarded_model_bytes,
    requested_arithmetic,
    resolve_arithmetic,
    scores_from_graph,
)
from .engines import EngineOutput
from .engines.base import ComputedOnRead, ResizedMap
from .similarity import MEASURES, all_finite

# Thresholds that depend on the predicted class (raw-score cut-offs from that class's reference);
# the p-value levels (``*.p``, ``combined_p``, ``conformal_p``) are the same for every class.
CLASS_SPECIFIC_THRESHOLDS = frozenset([f"attention.{m}" for m in MEASURES] + ["feature"])

log = logging.getLogger(__name__)

REASONS = ("GARBAGE_CLASS", "ATTENTION_MISMATCH", "FEATURE_MISMATCH", "INVALID_INPUT", "GUARD_ERROR")
CHECK_REASONS = tuple(REASON_OF_CHECK[c] for c in CHECKS)  # in CHECKS order, as decisions' flags come
POLICIES = ("calibrated", "strict")


def _json_float(v):
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class Verdict:
    accepted: bool
    label: str | None  # only when accepted
    label_index: int | None  # only when accepted
    probabilities: dict[str, float] | None  # softmax over real classes, only when accepted
    reasons: list[str]  # subset of REASONS, empty when accepted
    failed_measures: list[str]  # e.g. ["ssim", "sliced_wasserstein"] for ATTENTION_MISMATCH
    scores: dict[str, float]  # every check's score
    thresholds: dict[str, float]  # threshold per score where one applies
    # [H, W] float32 in [0,1] (model input size), also when rejected; computed when first read where the
    # engine returns small maps (engines.ResizedMaps)
    cam: np.ndarray | None = ComputedOnRead(default=None)
    reference_cam: np.ndarray | None = None  # reference map of the predicted real class
    predicted_index: int | None = None  # argmax class even when rejected (never served as a label)
    detail: str = ""  # human-readable message (errors, INVALID_INPUT cause)
    timings_ms: dict[str, float] = field(default_factory=dict)  # wall time of the batch per stage
    reference_index: int | None = None  # the real class whose reference the CAM was compared with

    @classmethod
    def rejected(cls, reason: str, detail: str, **kw) -> "Verdict":
        return cls(
            accepted=False,
            label=None,
            label_index=None,
            probabilities=None,
            reasons=[reason],
            failed_measures=[],
            scores={},
            thresholds={},
            detail=detail,
            **kw,
        )

    def without_class_details(self) -> "Verdict":
        """This verdict as a server may send it for a rejected input: nothing specific to the model's
        top class — the per-class thresholds and the reference map would identify it — so only the
        class-independent p-value levels stay among the thresholds. Accepted verdicts are unchanged."""
        if self.accepted:
            return self
        out = copy.copy(self)  # not dataclasses.replace, which would compute a heatmap nobody asked for
        out.thresholds = {k: t for k, t in self.thresholds.items() if k not in CLASS_SPECIFIC_THRESHOLDS}
        out.reference_cam = out.predicted_index = out.reference_index = None
        return out

    def to_dict(self, *, include_maps: bool = False) -> dict:
        d = {
            "accepted": bool(self.accepted),
            "label": self.label,
            "label_index": self.label_index,
            "probabilities": None
            if self.probabilities is None
            else {k: float(v) for k, v in self.probabilities.items()},
            "reasons": list(self.reasons),
            "failed_measures": list(self.failed_measures),
            "scores": {k: _json_float(v) for k, v in self.scores.items()},
            "thresholds": {k: _json_float(v) for k, v in self.thresholds.items()},
            "detail": self.detail,
            "timings_ms": {k: float(v) for k, v in self.timings_ms.items()},
        }
        if include_maps:
            d["cam"] = None if self.cam is None else np.asarray(self.cam).tolist()
            d["reference_cam"] = None if self.reference_cam is None else np.asarray(self.reference_cam).tolist()
        return d


def parse_checks(checks) -> str:
    """``"garbage,attention"`` / ``["feature"]`` / ``"all"`` → canonical key (see calibration.checks_key)."""
    if isinstance(checks, str):
        checks = (
            list(CHECKS)
            if checks.strip() == "all"
            else [c.strip() for c in checks.replace("+", ",").split(",") if c.strip()]
        )
    return checks_key(checks)


class Guard:
    """A calibrated bundle loaded for serving: engine + references + decision rule."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: dict,
        engine,
        calibration: CalibrationData,
        *,
        policy: str,
        enforced_checks: str,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.spec = InputSpec.from_manifest(manifest["input"])
        self.class_names = list(manifest["class_names"])
        self.garbage_index = int(manifest["garbage_class"])
        self.engine = engine
        self.calibration = calibration
        if policy not in POLICIES:
            raise BundleError(f"unknown guard policy {policy!r} (expected one of {', '.join(POLICIES)})")
        self.policy = policy
        self.enforced_checks = enforced_checks
        self.bundle_hash = bundle_mod.bundle_hash(self.served_manifest(manifest, policy, enforced_checks))
        self.alpha = calibration.alpha
        self.cut = calibration.cuts[enforced_checks]
        self.level = self.cut.threshold if policy == "calibrated" else self.alpha
        # the decision for one image (the per-image form of decide(), _decide_rows), with each check's own
        # p-value level: its share w_i t* of the cut (calibrated), alpha (strict)
        self._rule = DecisionRule(
            checks=enforced_checks, policy=policy, alpha=self.alpha, cut=self.cut, null=calibration.null
        )
        self.check_levels = dict(self._rule.levels)
        self._raw_thresholds = {int(c): calibration.raw_thresholds(int(c), self.check_levels) for c in calibration.real}
        # Everything a verdict carries that does not depend on the input, built once (hot path):
        # the score names in verdict order and, per predicted real class, the full thresholds dict.
        self._measure_level = self._rule.measure_level
        self._score_keys = (
            ["garbage_prob", "garbage_margin", "garbage.p"]
            + [k for m in MEASURES for k in (f"attention.{m}", f"attention.{m}.p")]
            + ["attention.p", "feature", "feature.p", "combined_p"]
            + (["conformal_p"] if policy == "calibrated" else [])
        )
        self._thresholds = {}
        for c, raw in self._raw_thresholds.items():
            t = {}
            for m in MEASURES:
                t[f"attention.{m}"] = raw[f"attention.{m}"]
                t[f"attention.{m}.p"] = self._measure_level
            lv = self.check_levels
            t.update({"garbage_margin": raw["garbage_margin"], "garbage.p": lv["garbage"]})
            t.update({"attention.p": lv["attention"], "feature": raw["feature"], "feature.p": lv["feature"]})
            if policy == "calibrated":
                t.update({"combined_p": self.level, "conformal_p": self.alpha})
            self._thresholds[c] = t
        self._real = [int(c) for c in calibration.real]
        self._real_names = [self.class_names[c] for c in self._real]
        self._ref_cams = {c: calibration.ref_cam_for(c) for c in self._real}
        self._columns = {name: i for i, name in enumerate(GUARD_COLUMNS)}

    @classmethod
    def from_bundle(
        cls,
        bundle_dir=None,
        *,
        providers=None,
        threads=None,
        policy=None,
        enforced_checks=None,
        prefer: str = "auto",
        arithmetic: str | None = None,
    ) -> "Guard":
        """Load and check a bundle (hashes, calibration) and start its engine.

        Raises :class:`gamguard.runtime.bundle.BundleError` for an uncalibrated or tampered bundle.
        ``policy`` / ``enforced_checks`` override ``bundle.json``'s ``guard`` section.
        ``arithmetic``: where the checks' per-image arithmetic runs (:data:`ARITHMETIC`; default: env
        ``GAMGUARD_GUARD_ARITHMETIC``, else ``auto``, see :func:`resolve_arithmetic`).
        """
        from .engines import create_engine

        bundle_dir = bundle_mod.resolve_bundle(bundle_dir)
        manifest = bundle_mod.load_manifest(bundle_dir, require_calibration=True)
        calibration = CalibrationData.load(bundle_dir, manifest)
        policy, key = cls.settings(manifest, policy=policy, enforced_checks=enforced_checks)
        guarded = None
        if resolve_arithmetic(arithmetic) == "graph":
            try:
                guarded = guarded_model_bytes(bundle_dir, calibration)
            except GuardGraphError as exc:
                if requested_arithmetic(arithmetic) == "graph":  # asked for by name: no other way is taken
                    raise bundle_mod.BundleError(
                        f"{bundle_dir}: {exc}; serve it with the checks' arithmetic on the host "
                        "(--arithmetic host or GAMGUARD_GUARD_ARITHMETIC=host)"
                    ) from None
                log.warning("guard: %s; the checks' arithmetic runs on the host (the numpy reference)", exc)
        engine = create_engine(
            bundle_dir, manifest, prefer=prefer, providers=providers, threads=threads, guarded=guarded
        )
        if guarded is not None and getattr(engine, "guarded", False) is not True:
            log.warning(
                "guard: engine %s runs the plain fused model; the checks' arithmetic runs on the host", engine.name
            )
        guard = cls(bundle_dir, manifest, engine, calibration, policy=policy, enforced_checks=key)
        log.info(
            "guard: bundle %s (%s), policy %s, checks %s, alpha %s, engine %s %s",
            bundle_dir,
            guard.bundle_hash[:12],
            policy,
            key,
            guard.alpha,
            engine.name,
            engine.providers,
        )
        return guard

    @classmethod
    def served_manifest(cls, manifest: dict, policy: str, enforced_checks: str) -> dict:
        """The manifest as served: ``bundle.json`` itself, or with its ``guard`` section replaced when the
        policy or enforced checks were overridden at load, so ``bundle_hash`` names what is served."""
        if cls.settings(manifest) == (policy, enforced_checks):
            return manifest
        return {
            **manifest,
            "guard": {**(manifest.get("guard") or {}), "policy": policy, "enforced_checks": enforced_checks.split("+")},
        }

    @staticmethod
    def settings(manifest: dict, *, policy=None, enforced_checks=None) -> tuple[str, str]:
        """``(policy, enforced checks key)`` the guard serves with: the overrides, else ``bundle.json``'s
        ``guard`` section, else ``calibrated`` with every check."""
        section = manifest.get("guard") or {}
        policy = policy or section.get("policy") or "calibrated"
        try:
            key = parse_checks(
                enforced_checks if enforced_checks is not None else section.get("enforced_checks") or list(CHECKS)
            )
        except ValueError as exc:
            raise BundleError(f"enforced checks: {exc}") from exc
        return policy, key

    # ------------------------------------------------------------------------------------------
    def decide_outputs(self, out, *, checks: str | None = None, policy: str | None = None):
        """The guard's decision on finite engine outputs (``logits``, ``cam``, ``early``):
        ``(scores, pvalues, decisions)`` — raw scores, every check's p-values, and the
        :class:`~gamguard.runtime.checks.Decisions` under this guard's policy, enforced checks and
        conformal cut (or the given ``checks`` / ``policy``). The one place where serving, evaluation
        and the TensorRT drift check turn engine outputs into a decision."""
        cal = self.calibration
        if getattr(out, "guard", None) is not None:
            s, pv = scores_from_graph(out.guard, out.logits, cal)
        else:
            s = cal.score(out.logits, out.cam, out.early)
            pv = cal.null.pvalues(s)
        return s, pv, self.decide_pvalues(pv, checks=checks, policy=policy)

    def decide_pvalues(self, pv, *, checks: str | None = None, policy: str | None = None):
        """:func:`~gamguard.runtime.checks.decide` with this guard's alpha and the cut of ``checks``
        (default: the guard's own policy, enforced checks and cut)."""
        checks = self.enforced_checks if checks is None else checks
        cut = self.cut if checks == self.enforced_checks else self.calibration.cuts[checks]
        return decide(pv, checks=checks, policy=policy or self.policy, alpha=self.alpha, cut=cut)

    # ------------------------------------------------------------------------------------------
    def info(self) -> dict:
        cal = self.manifest.get("calibration") or {}
        model = self.manifest.get("model") or {}
        return {
            "model": {"name": model.get("name"), "version": model.get("version")},
            "class_names": self.class_names,
            "garbage_class": self.garbage_index,
            "labels": [c for i, c in enumerate(self.class_names) if i != self.garbage_index],
            "input": self.spec.to_manifest(),
            "bundle_dir": str(self.bundle_dir),
            "bundle_hash": self.bundle_hash,
            "files": dict(self.manifest.get("files") or {}),
            "calibration": {
                "dataset": cal.get("dataset"),
                "n": cal.get("n"),
                "split": cal.get("split"),
                "alpha": self.alpha,
                "measured_false_rejection_rate": cal.get("measured_false_rejection_rate"),
                "measured_per_check": cal.get("measured_per_check"),
                "combination": self.calibration.combination.to_facts(),
                "created": cal.get("created"),
            },
            "alpha": self.alpha,
            "policy": self.policy,
            "enforced_checks": self.enforced_checks.split("+"),
            "level": self.level,
            "measures": list(MEASURES),
            "engine": self.engine.describe(),
            "providers": list(self.engine.providers),
        }

    # ------------------------------------------------------------------------------------------
    def verify_images(self, images: Sequence) -> list[Verdict]:
        """Decoded images (HxW float32 in [0, 1], or DecodedImage) → one verdict each. Never raises."""
        from .preprocess import preprocess

        t0 = time.perf_counter()
        verdicts: list[Verdict | None] = [None] * len(images)
        tensors, where = [], []
        for i, im in enumerate(images):
            try:
                pixels = getattr(im, "pixels", im)
                tensors.append(preprocess(pixels, self.spec))
                where.append(i)
            except Exception as exc:  # InvalidInput and anything odd about the object itself
                verdicts[i] = Verdict.rejected("INVALID_INPUT", str(exc) or type(exc).__name__)
        t_pre = (time.perf_counter() - t0) * 1e3
        if tensors:
            # preprocess always returns [C, H, W] of the bundle's input size: one stack
            for i, v in zip(where, self.verify_tensor(np.stack(tensors))):
                v.timings_ms["preprocess"] = t_pre
                verdicts[i] = v
        return verdicts  # type: ignore[return-value]

    def verify_files(self, paths: Sequence, *, frame: int | None = None) -> list[tuple[np.ndarray | None, Verdict]]:
        """Decode and verify image files (one batch): ``(pixels, verdict)`` per path, in order. A file that
        cannot be decoded gets ``(None, INVALID_INPUT)``; ``frame`` picks the frame of multi-frame DICOM
        files. Never raises."""
        from .decode import decode_file

        pixels: list[np.ndarray | None] = [None] * len(paths)
        verdicts: list[Verdict | None] = [None] * len(paths)
        for k, f in enumerate(paths):
            try:
                pixels[k] = decode_file(f, frame=frame).pixels
            except Exception as exc:  # DecodeError and anything else: that file only
                verdicts[k] = Verdict.rejected("INVALID_INPUT", str(exc))
        decoded = [k for k, p in enumerate(pixels) if p is not None]
        for k, v in zip(decoded, self.verify_images([pixels[k] for k in decoded])):
            verdicts[k] = v
        return list(zip(pixels, verdicts))  # type: ignore[arg-type]

    def verify_tensor(self, batch: np.ndarray) -> list[Verdict]:
        """Preprocessed ``[N, C, H, W]`` float32 → one verdict each. Never raises (fail closed)."""
        try:
            batch = np.asarray(batch)
            expect = (self.spec.channels, self.spec.height, self.spec.width)
            if batch.ndim != 4 or tuple(batch.shape[1:]) != expect:
                n = batch.shape[0] if batch.ndim >= 1 else 1
                msg = f"expected a tensor [N, {expect[0]}, {expect[1]}, {expect[2]}], got {list(batch.shape)}"
                return [Verdict.rejected("INVALID_INPUT", msg) for _ in range(max(n, 1))]
            if not np.issubdtype(batch.dtype, np.number) or np.issubdtype(batch.dtype, np.complexfloating):
                return [
                    Verdict.rejected("INVALID_INPUT", f"tensor dtype {batch.dtype} is not real-valued")
                    for _ in range(batch.shape[0])
                ]
            batch = batch.astype(np.float32, copy=False)
        except Exception as exc:
            return [Verdict.rejected("INVALID_INPUT", f"unusable tensor: {exc}")]
        n = batch.shape[0]
        if n == 0:
            return []
        # Fast path: one read-only pass proves the whole batch finite (see similarity.all_finite);
        # only a batch that fails it pays for the per-item test and the copy of its finite items.
        if all_finite(batch):
            return self._decide_guarded(batch, None, [None] * n)
        finite = np.isfinite(batch.reshape(n, -1)).all(axis=1)
        verdicts: list[Verdict | None] = [
            None if ok else Verdict.rejected("INVALID_INPUT", "input tensor contains NaN or Inf") for ok in finite
        ]
        idx = np.flatnonzero(finite)
        if idx.size:
            return self._decide_guarded(batch, idx, verdicts)
        return verdicts  # type: ignore[return-value]

    def _decide_guarded(self, batch: np.ndarray, where, verdicts: list) -> list[Verdict]:
        """``verdicts`` with the decisions on ``batch[where]`` (``where`` None: the whole batch) filled in;
        any exception rejects all of them with ``GUARD_ERROR`` (fail closed: no label leaves without every
        check having run)."""
        where = range(batch.shape[0]) if where is None else where
        try:
            for i, v in zip(where, self._decide(batch if isinstance(where, range) else batch[where])):
                verdicts[i] = v
        except Exception as exc:
            log.exception("guard error")
            for i in where:
                verdicts[i] = Verdict.rejected("GUARD_ERROR", f"guard error: {type(exc).__name__}: {exc}")
        return verdicts

    # ------------------------------------------------------------------------------------------
    def rejections_by_checks(
        self,
        images: Sequence[np.ndarray],
        check_sets: Sequence[str] | None = None,
        *,
        policy: str | None = None,
        batch: int = 64,
    ) -> dict[str, np.ndarray]:
        """Evaluation helper (ablations, tests): for decoded images, the rejection flags ``[N]`` under
        each set of enforced checks (keys as :func:`parse_checks` gives them; default every subset),
        from one engine pass. Raises on invalid input (unlike the serving path)."""
        from .checks import all_check_sets
        from .preprocess import preprocess_batch

        keys = [parse_checks(k) for k in (check_sets or all_check_sets())]
        out = {k: [] for k in keys}
        for start in range(0, len(images), batch):
            x = preprocess_batch(list(images[start : start + batch]), self.spec)
            s, pv, d = self.decide_outputs(self.engine.run(x), checks=keys[0], policy=policy)
            out[keys[0]].append(d.reject)
            for k in keys[1:]:
                out[k].append(self.decide_pvalues(pv, checks=k, policy=policy).reject)
        return {k: np.concatenate(v) if v else np.zeros(0, bool) for k, v in out.items()}

    def _decide(self, batch: np.ndarray) -> list[Verdict]:
        t0 = time.perf_counter()
        out = self.engine.run(batch)
        t1 = time.perf_counter()
        n = batch.shape[0]
        if out.logits.shape != (n, len(self.class_names)) or out.cam_count() != n or out.early.shape[0] != n:
            raise RuntimeError(
                f"engine output shapes {out.logits.shape}, {out.cam_count()} maps, {out.early.shape} "
                f"do not fit a batch of {n} and {len(self.class_names)} classes"
            )
        if out.guard is not None:
            return self._decide_rows(out, n, t0, t1)
        if all_finite(out.logits) and all_finite(out.cam) and all_finite(out.early):
            return self._judge(out, n, t0, t1)
        ok = np.ones(n, bool)
        for a in (out.logits, out.cam, out.early):
            ok &= np.isfinite(np.asarray(a).reshape(n, -1)).all(axis=1)
        # Fail closed per item: a NaN/Inf output rejects its own input, not its batch-mates
        # (other clients' requests share micro-batches).
        verdicts = [None if good else _non_finite_output() for good in ok]
        keep = np.flatnonzero(ok)
        if keep.size:
            part = EngineOutput(out.logits[keep], out.cam[keep], out.early[keep])
            for i, v in zip(keep, self._judge(part, keep.size, t0, t1)):
                verdicts[i] = v
        return verdicts

    def _decide_rows(self, out, n: int, t0: float, t1: float) -> list[Verdict]:
        """:meth:`_decide` for engine outputs with the ``guard`` columns: the engine computed the checks'
        arithmetic, the host reads one row of numbers per image (Python floats) and decides it with
        :class:`DecisionRule`. The same verdicts as :meth:`_judge` (tests/test_decision_rule.py), with a
        few numpy calls per batch instead of a few dozen: for the one to eight images of a serving batch,
        numpy's per-call overhead on the caches the engine left cold was most of the host's time."""
        if out.guard.shape != (n, len(GUARD_COLUMNS)):
            raise RuntimeError(f"engine guard output shape {out.guard.shape} does not fit a batch of {n}")
        rows = np.asarray(out.guard).tolist()  # Python floats: the float32 values exactly
        logit_rows = np.asarray(out.logits).tolist()
        finite, position = self._columns["finite"], self._columns["reference_position"]
        verdicts: list[Verdict] = []
        for i in range(n):
            row, logits = rows[i], logit_rows[i]
            # the graph's finiteness test (logits, CAM, early); the logits the host reads too
            if not (row[finite] == 1.0 and all(map(math.isfinite, logits))):
                verdicts.append(_non_finite_output())  # its own input only, not its batch-mates
                continue
            # the graph compared the CAM with the reference of the real class its ArgMax chose: it must
            # be the class these logits predict (the first largest real logit), or its numbers are not
            # this image's
            real_logits = [logits[k] for k in self._real]
            expected = max(range(len(real_logits)), key=real_logits.__getitem__)
            if row[position] != expected:
                verdicts.append(Verdict.rejected("GUARD_ERROR", "the engine's guard output does not fit its logits"))
                continue
            verdicts.append(self._verdict_of_row(row, logits, real_logits, out.cam_of(i), expected))
        timings = {"engine": (t1 - t0) * 1e3, "guard": (time.perf_counter() - t1) * 1e3}
        for v in verdicts:
            v.timings_ms = dict(timings)
        return verdicts

    def _judge(self, out, n: int, t0: float, t1: float) -> list[Verdict]:
        """Scores, p-values and the decision for finite engine outputs of ``n`` inputs, vectorised (the
        reference: :meth:`decide_outputs`); the serving path for host arithmetic."""
        cal = self.calibration
        s, pv, d = self.decide_outputs(out)
        combined = d.combined_p
        real = cal.real
        real_probs = softmax(np.asarray(out.logits, np.float64)[:, real])
        # One [N, n_scores] matrix in self._score_keys order, converted to Python floats in one call.
        m = len(MEASURES)
        cols = [
            s.garbage_prob[:, None],
            s.garbage_margin[:, None],
            pv.garbage[:, None],
            np.stack((s.sims, pv.measures), axis=2).reshape(n, 2 * m),
            pv.attention[:, None],
            s.feature[:, None],
            pv.feature[:, None],
            combined[:, None],
        ]
        if self.policy == "calibrated":
            stat = conformal_statistic(combined, pv, self.enforced_checks)  # combined: the cut's weights
            cols.append(self.cut.p_value(stat)[:, None])  # conformal_p
        score_rows = np.concatenate([np.asarray(c, np.float64) for c in cols], axis=1).tolist()
        prob_rows = real_probs.tolist()
        pred_real = s.pred_real.tolist()
        pred = s.pred.tolist()
        reject = d.reject.tolist()
        flags = np.stack((d.garbage, d.attention, d.feature), axis=1).tolist()
        failed_rows = d.failed_measures.tolist()
        t2 = time.perf_counter()
        timings = {"engine": (t1 - t0) * 1e3, "guard": (t2 - t1) * 1e3}
        return [
            self._verdict(
                not reject[i],
                pred_real[i],
                pred[i],
                dict(zip(self._real_names, prob_rows[i])),
                [r for r, f in zip(CHECK_REASONS, flags[i]) if f],
                [name for name, f in zip(MEASURES, failed_rows[i]) if f],
                score_rows[i],
                out.cam[i],
                timings,
            )
            for i in range(n)
        ]

    def _verdict(self, accepted, cls_idx, pred, probabilities, reasons, failed, scores, cam, timings=None) -> Verdict:
        """The verdict of one image from its decision: the label and probabilities only when accepted;
        ``scores`` in :attr:`_score_keys` order."""
        return Verdict(
            accepted=accepted,
            label=self.class_names[cls_idx] if accepted else None,
            label_index=cls_idx if accepted else None,
            probabilities=probabilities if accepted else None,
            reasons=reasons,
            failed_measures=failed,
            scores=dict(zip(self._score_keys, scores)),
            thresholds=dict(self._thresholds[cls_idx]),
            cam=cam if isinstance(cam, ResizedMap) else np.asarray(cam, np.float32),
            reference_cam=self._ref_cams[cls_idx],
            predicted_index=pred,
            reference_index=cls_idx,
            detail=""
            if accepted
            else "rejected: " + ", ".join(reasons) + (f" ({', '.join(failed)})" if failed else ""),
            timings_ms=dict(timings or {}),
        )

    def _verdict_of_row(self, row: list, logits: list, real_logits: list, cam: np.ndarray, position: int) -> Verdict:
        """One image's verdict from its ``guard`` row and logits (finite; ``real_logits``: those of the real
        classes; ``position``: the predicted real class among them), as :meth:`_judge` gives it."""
        m = len(MEASURES)
        c = self._columns
        pred = max(range(len(logits)), key=logits.__getitem__)  # the first largest, as argmax
        pms = [_p_value(v) for v in row[m : 2 * m]]
        p = {
            "garbage": _p_value(row[c["garbage.p"]]),
            "attention": self.calibration.null.attention.p_one(pms),
            "feature": _p_value(row[c["feature.p"]]),
        }
        d = self._rule(p, pred == self.garbage_index, pms)
        scores = [row[c["garbage_prob"]], row[c["garbage_margin"]], p["garbage"]]
        for j in range(m):
            scores += (row[j], pms[j])
        scores += (p["attention"], row[c["feature"]], p["feature"], d.combined_p)
        if d.conformal_p is not None:
            scores.append(d.conformal_p)
        probabilities = None
        if not d.reject:  # softmax over the real classes, in float64 as softmax() computes it
            top = max(real_logits)
            e = [math.exp(v - top) for v in real_logits]
            total = sum(e)
            probabilities = {name: v / total for name, v in zip(self._real_names, e)}
        return self._verdict(
            not d.reject,
            self._real[position],
            pred,
            probabilities,
            [r for r, f in zip(CHECK_REASONS, (d.garbage, d.attention, d.feature)) if f],
            [MEASURES[j] for j in d.failed_measures],
            scores,
            cam,
        )


def _non_finite_output() -> Verdict:
    return Verdict.rejected("GUARD_ERROR", "the engine produced NaN/Inf for this input")


def _p_value(x: float) -> float:
    """A p-value read from the engine, fail closed: NaN, ±Inf and anything not above 0 are 0 (reject), as
    :func:`~gamguard.runtime.checks.graph.engine_pvalues`."""
    return x if 0.0 < x < math.inf else 0.0
