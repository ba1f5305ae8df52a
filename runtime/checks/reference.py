"""What the guard loads from a bundle's ``reference.npz``: reference maps, feature statistics and the
raw null/conformal scores, from which the p-value tables and conformal cuts are rebuilt
deterministically at load time — one code path for calibration and serving.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..bundle import REFERENCE_FILE, BundleError
from ..similarity import DEFAULT_GRID, HIGHER_IS_SIMILAR, MEASURES, prepare
from .combine import Combination, ConformalCut, CutMethod, all_check_sets, combined_statistic
from .errors import CalibrationError
from .feature import FeatureReference
from .scores import ScoreSet, real_class_indices, score_outputs

DEFAULT_ALPHA = 0.05


class CalibrationData:
    """Everything the guard needs from ``reference.npz``, with tables and cuts rebuilt from raw scores."""

    def __init__(self, arrays, manifest: dict):
        cal = manifest.get("calibration") or {}
        self.alpha = float(cal.get("alpha", DEFAULT_ALPHA))
        try:
            self.combination = Combination.from_arrays(arrays, cal.get("combination"))
        except CalibrationError as exc:
            raise BundleError(str(exc)) from exc
        self.grid = int(cal.get("grid", DEFAULT_GRID))
        self.class_names = list(manifest["class_names"])
        self.garbage = int(manifest["garbage_class"])
        self.real = real_class_indices(len(self.class_names), self.garbage)
        measures = [str(m) for m in arrays["measures"]]
        if measures != list(MEASURES):
            raise BundleError(
                f"reference.npz measures {measures} do not match this gamguard's {list(MEASURES)}; "
                "re-calibrate the bundle"
            )
        self.ref_cams = np.asarray(arrays["ref_cam"], np.float32)  # [K_real, H, W]
        self.ref_prepared = prepare(self.ref_cams, self.grid)  # [K_real, grid, grid], hot-path form
        self.feature_ref = FeatureReference.from_arrays(arrays)
        self.null_scores = ScoreSet.from_arrays(arrays, "null_")
        self.conformal_scores = ScoreSet.from_arrays(arrays, "conformal_")
        try:
            self.cut_method = CutMethod.from_arrays(arrays)
        except CalibrationError as exc:
            raise BundleError(str(exc)) from exc
        # conformal_pvalues: what the cuts are fitted on (one row per image behind the cut)
        self.null, pv = self.cut_method.fit(self.null_scores, self.conformal_scores, len(self.class_names))
        self.conformal_pvalues = pv
        self.cuts = {
            key: ConformalCut(combined_statistic(pv, key, self.combination), self.alpha, self.null, self.combination)
            for key in all_check_sets()
        }

    @classmethod
    def load(cls, bundle_dir: str | Path, manifest: dict) -> "CalibrationData":
        path = Path(bundle_dir) / REFERENCE_FILE
        arrays = read_reference_arrays(bundle_dir)
        try:
            return cls(arrays, manifest)
        except KeyError as exc:
            raise BundleError(f"{path}: missing array {exc}; re-calibrate the bundle") from exc

    def ref_cam_for(self, cls_index: int) -> np.ndarray:
        return self.ref_cams[int(np.searchsorted(self.real, cls_index))]

    def score(self, logits, cam, early) -> ScoreSet:
        return score_outputs(
            logits,
            cam,
            early,
            garbage=self.garbage,
            ref_cams=self.ref_prepared,
            feature_ref=self.feature_ref,
            grid=self.grid,
            refs_prepared=True,
        )

    def raw_thresholds(self, cls_index: int, levels: dict[str, float]) -> dict[str, float]:
        """Score values at which each check's p-value equals its level (``levels[check]``, see
        :func:`~gamguard.runtime.checks.combine.check_levels`) for predictions of ``cls_index``."""
        out = {}
        mlevel = self.null.measure_level(levels["attention"])
        for m, table in zip(MEASURES, self.null.tables_for(cls_index)):
            d = table.inverse(mlevel) if mlevel > 0 else math.inf
            out[f"attention.{m}"] = -d if HIGHER_IS_SIMILAR[m] else d
        out["feature"] = self.null.feature.inverse(levels["feature"])
        out["garbage_margin"] = self.null.garbage.inverse(levels["garbage"])
        return out


def read_reference_arrays(bundle_dir: str | Path) -> dict[str, np.ndarray]:
    """Every array of a bundle's ``reference.npz`` (:class:`BundleError` when it cannot be read)."""
    path = Path(bundle_dir) / REFERENCE_FILE
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path}: cannot read the guard references: {exc}") from exc
