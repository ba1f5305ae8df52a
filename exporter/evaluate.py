"""``gamguard evaluate``: the guard's efficacy on real X-rays, against published OOD baselines.

Preset ``pneumoniamnist`` (the only one so far) builds everything from ``../shared/datasets``:

1. **Train** a :class:`~gamguard.exporter.model.GuardNet` with a garbage class on the PneumoniaMNIST
   training split (paediatric chest X-rays, normal vs pneumonia; 28×28 upsampled to the model input by
   the runtime's own :func:`~gamguard.runtime.preprocess.preprocess`) plus generated garbage images of
   the kinds in :data:`GARBAGE_KINDS` — no real data of any kind is shown to the garbage class.
2. **Export** the fused ONNX bundle and **calibrate** it with the deployed engine: references (mean
   CAMs, early-feature statistics) from the training split, p-value tables and the conformal cut from
   the validation split, which the model never trained on (all 270 images held out, not half of them).
3. **Evaluate** on the test split (in-distribution) and on off-distribution sets the garbage class
   never saw: ``hannover_cxr`` (adult chest X-rays of another hospital: near-OOD / domain shift),
   ``hand_xray`` and ``pelvis_xray`` (other anatomy), ``other_modality`` (pydicom's CT/MR/NM/US test
   files), ``generated_non_xray`` (the generator's held-out ``texture`` and ``photo`` kinds).
4. **Baselines** on the same model and images: maximum softmax probability, energy, max logit, and
   Mahalanobis distance on the early (``early`` output) and penultimate (pooled ``layer3``) features,
   fitted on the training split.

AUROC and FPR at 95 % TPR come from scikit-learn, with in-distribution as the positive class and each
method's "in-distribution-ness" as the score (so FPR95 is the fraction of an OOD set that passes when
95 % of the test split passes). The guard's score orders inputs as its decision does
(:func:`~gamguard.runtime.checks.decision_order`): an input predicted as the garbage class first (the
guard rejects it at every level), then the combined p-value (``combined_p``: the weighted minimum
``min_i p_i / w_i`` of the enforced checks' p-values, the bundle's weights), so its ROC curve is the one
the guard traces as alpha moves; the AUROC of ``combined_p`` alone is reported beside
(``auroc_combined_p``). The guard's *decision* uses the calibrated conformal cut on that statistic, and
its rejection rate per set is reported alongside.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gamguard.runtime import ood_baselines
from gamguard.runtime.bundle import InputSpec
from gamguard.runtime.demo import phantoms
from gamguard.runtime.preprocess import preprocess_batch

from .garbage import balanced_class_weight
from .train import _deterministic, train_one_epoch

log = logging.getLogger(__name__)

PRESETS = ("pneumoniamnist",)
NPZ = Path("pneumoniamnist") / "pneumoniamnist_balanced_subset.npz"
CLASS_NAMES = ["normal", "pneumonia", "garbage"]
GARBAGE = 2
SPEC = InputSpec(channels=1, height=64, width=64, mean=(0.5,), std=(0.25,), resize="stretch")
# Garbage training kinds: the generator's garbage families minus the hand-derived one, so that the
# real hand radiographs in the evaluation are as unseen as the pelvis ones.
GARBAGE_KINDS = tuple(k for k in phantoms.GARBAGE_TRAIN_KINDS if k != "cropped_hand")
GENERATED_EVAL_KINDS = ("texture", "photo")  # held-out generator kinds: never in any training
OTHER_MODALITIES = ("CT", "MR", "NM", "US")
ARCH_CONFIG = {"num_classes": 3, "widths": [16, 32, 64], "in_channels": 1, "blocks": 1, "dropout": 0.0}
TARGET_LAYER, EARLY_LAYER = "layer3", "layer1"
GOALS = {"id_false_rejection_within": 0.02, "far_ood_rejection": 0.99}
#: paired bootstrap resamples of the guard-vs-baseline AUROC difference (:func:`auroc_difference`)
BOOTSTRAP_RESAMPLES = 1000
FAR_OOD = ("hand_xray", "pelvis_xray", "other_modality", "generated_non_xray")


@dataclass
class EvalConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    garbage_per_kind: int = 150
    seed: int = 0
    alpha: float = 0.05
    threads: int | None = 1  # torch threads for training (1 is also the fastest on a shared 2-core box)
    generated_per_kind: int = 50


# ----------------------------------------------------------------------------------------- data


def load_pneumoniamnist(data_root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images [N,28,28] float32 in [0,1], labels [N] int64)}`` for train/val/test."""
    path = Path(data_root) / NPZ
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --data-root must point at the shared datasets folder")
    with np.load(path) as z:
        return {
            s: (z[f"{s}_images"].astype(np.float32) / 255.0, z[f"{s}_labels"].reshape(-1).astype(np.int64))
            for s in ("train", "val", "test")
        }


def _decode_all(paths, *, frame=None) -> tuple[list[np.ndarray], list[str], list[str]]:
    from gamguard.runtime.decode import DecodeError, decode_file

    images, names, failed = [], [], []
    # Some of pydicom's bundled test files are deliberately broken; their decode errors are
    # recorded per file below, so pydicom's own tracebacks on the log would only be noise.
    pydicom_log = logging.getLogger("pydicom")
    level, pydicom_log.level = pydicom_log.level, logging.CRITICAL
    try:
        for p in paths:
            try:
                images.append(decode_file(p, frame=frame).pixels)
                names.append(Path(p).name)
            except DecodeError as exc:
                failed.append(f"{Path(p).name}: {exc}")
    finally:
        pydicom_log.setLevel(level)
    return images, names, failed


def _other_modality_files() -> list[Path]:
    """pydicom's bundled test files whose Modality is CT, MR, NM or US (header read only)."""
    import pydicom
    from pydicom.data import get_testdata_file

    root = Path(get_testdata_file("CT_small.dcm")).parent
    out = []
    for p in sorted(root.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # not every bundled file is a valid dataset; those are simply not candidates
            continue
        if ds.get("Modality") in OTHER_MODALITIES and "Rows" in ds:
            out.append(p)
    return out


def load_ood_sets(data_root: Path, seed: int, generated_per_kind: int) -> dict[str, dict]:
    """Every off-distribution set: ``{name: {"images": [...], "names": [...], "description": str, ...}}``."""
    root = Path(data_root)
    sets = {}
    specs = [
        (
            "hannover_cxr",
            sorted((root / "hannover_cxr" / "png").glob("*.png")),
            None,
            "adult chest X-rays, Hannover Medical School (CC BY 3.0): near-OOD / domain shift",
        ),
        (
            "hand_xray",
            sorted((root / "ood" / "hand_xray").glob("*.png")),
            None,
            "paediatric hand radiographs (other anatomy)",
        ),
        (
            "pelvis_xray",
            sorted((root / "ood" / "pelvis_xray").glob("*.dcm")),
            None,
            "paediatric AP pelvis radiographs, JPEG 2000 DICOM (other anatomy)",
        ),
        (
            "other_modality",
            _other_modality_files(),
            0,
            "pydicom test files, modalities CT/MR/NM/US (first frame of multi-frame files)",
        ),
    ]
    for name, paths, frame, desc in specs:
        images, names, failed = _decode_all(paths, frame=frame)
        sets[name] = {"images": images, "names": names, "description": desc, "undecodable": failed}
    images, kinds = phantoms.ood_set(GENERATED_EVAL_KINDS, generated_per_kind, seed + 7919, 256)
    sets["generated_non_xray"] = {
        "images": list(images),
        "names": list(kinds),
        "undecodable": [],
        "description": f"generated {', '.join(GENERATED_EVAL_KINDS)} images (generator kinds never used in training)",
    }
    return sets


# ------------------------------------------------------------------------------------- training


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, cfg: EvalConfig, progress: Callable[[str], None]) -> list[dict]:
    """Class-balanced cross-entropy with AdamW and a one-cycle schedule; small random shifts as
    augmentation (chest films are not mirrored: the heart's side matters)."""
    torch.manual_seed(cfg.seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss(weight=balanced_class_weight(yt, len(CLASS_NAMES)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = -(-len(xt) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps)
    gen = torch.Generator().manual_seed(cfg.seed)

    def shift(xb):  # the same random shift for the whole batch, drawn from the seeded generator
        dy, dx = (int(v) for v in torch.randint(-3, 4, (2,), generator=gen))
        return torch.roll(xb, shifts=(dy, dx), dims=(2, 3))

    history = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        loss, acc = train_one_epoch(
            model,
            xt,
            yt,
            opt=opt,
            sched=sched,
            loss_fn=loss_fn,
            batch_size=cfg.batch_size,
            generator=gen,
            augment=shift,
        )
        entry = {"epoch": epoch + 1, "loss": loss, "train_accuracy": acc, "seconds": round(time.perf_counter() - t0, 2)}
        history.append(entry)
        progress(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {entry['loss']:.4f}  train acc "
            f"{entry['train_accuracy']:.3f}  {entry['seconds']:.1f} s"
        )
    return history


@torch.no_grad()
def penultimate_features(model: nn.Module, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The pooled ``layer3`` activations (input of ``fc``) for preprocessed inputs."""
    captured = []
    hook = model.flatten.register_forward_hook(lambda m, i, o: captured.append(o.detach().numpy()))
    try:
        model.eval()
        for i in range(0, len(x), batch):
            model(torch.from_numpy(x[i : i + batch]))
    finally:
        hook.remove()
    return np.concatenate(captured)


def train_and_bundle(data: dict, workdir: Path, cfg: EvalConfig, progress) -> tuple[nn.Module, dict]:

    from .export import export_bundle
    from .model import build_model
    from .train import CHECKPOINT_FORMAT, save_checkpoint

    x_id, y_id = data["train"]
    g_images, _ = phantoms.ood_set(GARBAGE_KINDS, cfg.garbage_per_kind, cfg.seed + 1, 256)
    x = np.concatenate([preprocess_batch(list(x_id), SPEC), preprocess_batch(list(g_images), SPEC)])
    y = np.concatenate([y_id, np.full(len(g_images), GARBAGE, np.int64)])
    progress(
        f"training on {len(x_id)} PneumoniaMNIST images + {len(g_images)} generated garbage images "
        f"({', '.join(GARBAGE_KINDS)}), input {SPEC.height}x{SPEC.width}"
    )
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)  # seeded initialisation: the same weights run after run
    model = build_model(dict(ARCH_CONFIG))
    history = fit(model, x, y, cfg, progress)
    train_seconds = time.perf_counter() - t0
    model.eval()
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "arch": "guardnet",
        "config": dict(ARCH_CONFIG),
        "state_dict": model.state_dict(),
        "class_names": CLASS_NAMES,
        "garbage_class": GARBAGE,
        "input": SPEC.to_manifest(),
        "target_layer": TARGET_LAYER,
        "early_layer": EARLY_LAYER,
        "train_report": {"history": history, "seconds": train_seconds, "config": asdict(cfg)},
    }
    save_checkpoint(ckpt, workdir / "checkpoint.pt")
    bundle_dir = workdir / "bundle"
    progress(f"exporting fused ONNX bundle to {bundle_dir}")
    export_bundle(
        model,
        bundle_dir,
        class_names=CLASS_NAMES,
        garbage_class=GARBAGE,
        target_layer=TARGET_LAYER,
        early_layer=EARLY_LAYER,
        input_shape=(1, SPEC.height, SPEC.width),
        normalization={"mean": SPEC.mean, "std": SPEC.std},
        model_name="pneumoniamnist-guardnet",
        model_version="1",
    )
    calibrate_preset(bundle_dir, data, cfg, progress)
    return model, {"seconds": round(train_seconds, 1), "history": history}


def calibrate_preset(bundle_dir: Path, data: dict, cfg: "EvalConfig", progress) -> dict:
    """Calibrate the preset's bundle: references from the training split, p-values and the conformal cut
    from the validation split (the default combination weights). Returns the manifest."""
    from gamguard.runtime.calibration import calibrate_bundle

    x_id, y_id = data["train"]
    x_val, y_val = data["val"]
    progress(
        f"calibrating: references from the training split ({len(x_id)} images), p-values and the "
        f"conformal cut from the validation split ({len(x_val)} images), alpha {cfg.alpha}"
    )
    return calibrate_bundle(
        bundle_dir,
        images=lambda i: x_val[i],
        labels=y_val,
        alpha=cfg.alpha,
        seed=cfg.seed,
        dataset={
            "kind": "pneumoniamnist-val",
            "description": "PneumoniaMNIST balanced subset, validation split (MedMNIST v2, CC BY 4.0)",
            "n": int(len(x_val)),
        },
        reference=(lambda i: x_id[i], y_id, {"kind": "pneumoniamnist-train", "n": int(len(x_id))}),
        progress=progress,
    )


# ----------------------------------------------------------------------------------- evaluation


def _roc(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict:
    """AUROC and FPR at 95 % TPR; scores are in-distribution-ness (higher = more ID), ID positive."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.r_[id_scores, ood_scores]
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "fpr95": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
        "curve": (fpr, tpr),
    }


def _auroc_rows(id_scores: np.ndarray, ood_scores: np.ndarray) -> np.ndarray:
    """AUROC of each row pair (``[B, n_id]``, ``[B, n_ood]``; ID positive, ties count one half): the
    Mann-Whitney form, ``P(ID score > OOD score) + P(equal) / 2``, vectorised over the rows."""
    id_sorted = np.sort(id_scores, axis=1)
    out = np.empty(id_scores.shape[0])
    for r in range(id_scores.shape[0]):  # searchsorted has no row axis; B is ~1000 small rows
        below = np.searchsorted(id_sorted[r], ood_scores[r], side="right")
        above_or_equal = np.searchsorted(id_sorted[r], ood_scores[r], side="left")
        greater = id_sorted.shape[1] - below
        ties = below - above_or_equal
        out[r] = (greater.sum() + 0.5 * ties.sum()) / (id_sorted.shape[1] * ood_scores.shape[1])
    return out


def auroc_difference(
    guard_id: np.ndarray,
    guard_ood: np.ndarray,
    base_id: np.ndarray,
    base_ood: np.ndarray,
    *,
    seed: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict:
    """Guard AUROC minus a baseline's on the same images, with a paired bootstrap 95 % interval.

    Both detectors score the same in-distribution and off-distribution images, so the images are
    resampled together (with replacement, each side separately, the same indices for both detectors):
    the interval reflects which images happened to be in the sets, the only randomness an evaluation
    with fixed weights has. Percentile interval (Efron & Tibshirani, "An Introduction to the Bootstrap",
    1993, ch. 13); ``share_ge_0`` is the fraction of resamples where the guard is not worse. With ten
    images in a set the interval is wide: a difference inside it is not evidence either way.
    """
    g_id, g_ood, b_id, b_ood = (np.asarray(a, np.float64) for a in (guard_id, guard_ood, base_id, base_ood))
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(g_id), (resamples, len(g_id)))
    o = rng.integers(0, len(g_ood), (resamples, len(g_ood)))
    d = _auroc_rows(g_id[i], g_ood[o]) - _auroc_rows(b_id[i], b_ood[o])
    point = _auroc_rows(g_id[None], g_ood[None])[0] - _auroc_rows(b_id[None], b_ood[None])[0]
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {
        "delta": float(point),
        "ci95": [float(lo), float(hi)],
        "share_ge_0": float((d >= 0).mean()),
        "resamples": int(resamples),
    }


def _guard_run(guard, x: np.ndarray) -> dict:
    """The guard over preprocessed inputs ``x`` (``[N, C, H, W]``), in batches of 64."""
    from gamguard.runtime.checks import decision_order

    verdicts = []
    for i in range(0, len(x), 64):
        verdicts += guard.verify_tensor(x[i : i + 64])
    combined = np.array([v.scores.get("combined_p", 0.0) if v.scores else 0.0 for v in verdicts])
    garbage_pred = np.array([v.predicted_index == guard.calibration.garbage for v in verdicts])
    return {
        "verdicts": verdicts,
        "combined_p": combined,
        "rank": decision_order(combined, garbage_pred, guard.enforced_checks),  # the guard's ROC score
        "accepted": np.array([v.accepted for v in verdicts]),
    }


def _engine_outputs(engine, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits and flattened early features of preprocessed inputs ``x``, in batches of 64."""
    logits, early = [], []
    for i in range(0, len(x), 64):
        out = engine.run(x[i : i + 64])
        logits.append(out.logits)
        early.append(out.early.reshape(len(out.early), -1))
    return np.concatenate(logits), np.concatenate(early)


def _score_set(guard, x: np.ndarray):
    """The guard's raw scores (:class:`~gamguard.runtime.checks.ScoreSet`) of preprocessed inputs, batches of 64."""
    from gamguard.runtime.checks import ScoreSet

    parts = []
    for i in range(0, len(x), 64):
        out = guard.engine.run(x[i : i + 64])
        parts.append(guard.calibration.score(out.logits, out.cam, out.early))
    return ScoreSet.concat(parts)


CHECK_ROWS = ("garbage", "attention", "feature", "combined")


def ablation(guard, id_scores, ood_scores: dict) -> tuple[dict, dict]:
    """Each check alone and the enforced combination: ``{check: {set: {auroc, rejection_rate}}}`` and the
    in-distribution false-rejection rate of each (``{check: rate}``). A check alone is ranked by its own
    p-value and decided by its own conformal cut (calibrated for every subset of checks); ``combined`` is
    the guard as served (``combined_p`` and the enforced checks' cut)."""
    from gamguard.runtime.checks import combined_p, decide, decision_order

    cal = guard.calibration
    pv_id = cal.null.pvalues(id_scores)
    table, id_rates = {}, {}
    for check in CHECK_ROWS:
        key = guard.enforced_checks if check == "combined" else check

        def rejects(pv, key=key):
            return decide(pv, checks=key, policy="calibrated", alpha=guard.alpha, cut=cal.cuts[key]).reject

        id_rates[check] = float(rejects(pv_id).mean())
        table[check] = {}
        for name, scores in ood_scores.items():
            pv = cal.null.pvalues(scores)
            roc = _roc(*(decision_order(combined_p(p, key, cal.combination), p.garbage_pred, key) for p in (pv_id, pv)))
            table[check][name] = {"auroc": roc["auroc"], "rejection_rate": float(rejects(pv).mean())}
    return table, id_rates


SITE_ALPHAS = (0.05, 0.10)
SITE_SPLITS = 20  # repeated seeded halvings, to show the spread a single site split has


def site_protocol(
    guard,
    test_scores,
    seed: int,
    alphas=SITE_ALPHAS,
    splits: int = SITE_SPLITS,
    ood_scores: dict | None = None,
    baselines: dict | None = None,
) -> dict:
    """Site calibration on the test split, as ``gamguard calibrate --site`` does it (same function on the
    same scores): a seeded half of the split calibrates the site (new null tables and conformal cut, the
    references kept), the other half measures the in-distribution false-rejection rate before (the
    validation-calibrated guard) and after. Done at each alpha, for the seed's split and, to show the
    spread, for ``splits`` seeded halvings (``seed``, ``seed + 1``, ...). With ``ood_scores`` (set → scores)
    it also gives, on the seed's measured half, the guard's AUROC per set before and after site
    calibration next to the best baseline's (``baselines``: name → (test-split scores, {set: scores}),
    in-distribution-ness)."""
    from gamguard.runtime.calibration import site_arrays
    from gamguard.runtime.checks import CalibrationData, decide, read_reference_arrays

    base = read_reference_arrays(guard.bundle_dir)
    key = guard.enforced_checks
    n = test_scores.feature.size

    def frr(arrays, alpha, idx):
        manifest = {**guard.manifest, "calibration": {**guard.manifest["calibration"], "alpha": alpha}}
        data = CalibrationData(arrays, manifest)
        pv = data.null.pvalues(test_scores.take(idx))
        return float(decide(pv, checks=key, policy="calibrated", alpha=alpha, cut=data.cuts[key]).reject.mean())

    def spread(rates, alpha, name):
        a = np.asarray(rates)
        return {
            f"{name}_mean": float(a.mean()),
            f"{name}_sd": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            f"{name}_within_2pts": float(np.mean(np.abs(a - alpha) <= GOALS["id_false_rejection_within"])),
        }

    by_alpha = {}
    for alpha in alphas:
        before, after, after_split = [], [], []
        for k in range(splits):
            perm = np.random.default_rng(seed + k).permutation(n)
            site, measured = perm[: n // 2], perm[n // 2 :]
            before.append(frr(base, alpha, measured))
            after.append(frr(site_arrays(base, test_scores.take(site), seed + k)[0], alpha, measured))
            after_split.append(frr(site_arrays(base, test_scores.take(site), seed + k, "split")[0], alpha, measured))
        by_alpha[f"{alpha:g}"] = {
            "id_false_rejection_rate_before": before[0],
            "id_false_rejection_rate_after": after[0],
            "id_false_rejection_rate_after_split": after_split[0],
            "over_splits": {
                "n_splits": splits,
                "before_mean": float(np.mean(before)),
                **spread(after, alpha, "after"),
                **spread(after_split, alpha, "after_split"),
            },
        }
    first = by_alpha[f"{guard.alpha:g}"] if f"{guard.alpha:g}" in by_alpha else next(iter(by_alpha.values()))
    auroc = {}
    if ood_scores:
        from gamguard.runtime.checks import combined_p, decision_order

        perm = np.random.default_rng(seed).permutation(n)
        site, measured = perm[: n // 2], perm[n // 2 :]
        site_cal = CalibrationData(site_arrays(base, test_scores.take(site), seed)[0], guard.manifest)
        for name, scores in ood_scores.items():
            row = {}
            for label, cal in (("guard_before", guard.calibration), ("guard_after", site_cal)):
                pid, pood = cal.null.pvalues(test_scores.take(measured)), cal.null.pvalues(scores)
                w = cal.combination
                row[label] = _roc(*(decision_order(combined_p(p, key, w), p.garbage_pred, key) for p in (pid, pood)))[
                    "auroc"
                ]
            if baselines:
                row["best_baseline"] = max(
                    _roc(b_id[measured], b_ood[name])["auroc"] for b_id, b_ood in baselines.values()
                )
            auroc[name] = row
    return {
        "n_site": int(n // 2),
        "n_measured": int(n - n // 2),
        "alpha": guard.alpha,
        "seed": int(seed),
        "id_false_rejection_rate_before": first["id_false_rejection_rate_before"],
        "id_false_rejection_rate_after": first["id_false_rejection_rate_after"],
        "by_alpha": by_alpha,
        "auroc_measured_half": auroc,
        "cut": "cross-fit",
        "method": "seeded half of the PneumoniaMNIST test split -> calibration.site_arrays (the default cross-fit "
        "cut; 'after_split': the 50/50 split cut; references kept); the other half measured",
    }


def wasserstein_agreement(guard, x: np.ndarray, n: int = 20) -> dict:
    """The served ``sliced_wasserstein`` against the exact earth mover's distance (POT) on the first ``n``
    inputs' Grad-CAM maps vs their reference maps: relative error range and Spearman rank correlation."""
    from scipy.stats import spearmanr

    from gamguard.runtime.similarity import sliced_wasserstein, wasserstein

    out = guard.engine.run(x[:n])
    real = guard.calibration.real
    pos = np.asarray(out.logits)[:, real].argmax(axis=1)
    t0 = time.perf_counter()
    exact = np.array([wasserstein(c, guard.calibration.ref_cams[p]) for c, p in zip(out.cam, pos)])
    seconds = time.perf_counter() - t0
    sliced = np.array([sliced_wasserstein(c, guard.calibration.ref_cams[p]) for c, p in zip(out.cam, pos)])
    rel = sliced / np.maximum(exact, 1e-12) - 1.0
    return {
        "n": int(len(exact)),
        "relative_error_min": float(rel.min()),
        "relative_error_median": float(np.median(rel)),
        "relative_error_max": float(rel.max()),
        "spearman": float(spearmanr(sliced, exact).statistic),
        "exact_seconds_per_pair": round(seconds / max(len(exact), 1), 4),
    }


def evaluate(
    data_root: Path,
    workdir: Path,
    cfg: EvalConfig | None = None,
    *,
    reuse: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the preset end to end; writes ``workdir/bundle`` and ``workdir/report``; returns the results."""
    from gamguard.runtime.guard import Guard

    from .train import load_checkpoint

    cfg = cfg or EvalConfig()
    progress = progress or log.info
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = load_pneumoniamnist(data_root)
    if reuse and (workdir / "checkpoint.pt").is_file() and (workdir / "bundle" / "reference.npz").is_file():
        progress(f"reusing {workdir / 'bundle'} and {workdir / 'checkpoint.pt'}")
        model, ckpt = load_checkpoint(workdir / "checkpoint.pt")
        training = {k: ckpt["train_report"].get(k) for k in ("seconds", "history")}
    else:
        with _deterministic(cfg.threads):  # same seed and threads → the same weights, run after run
            model, training = train_and_bundle(data, workdir, cfg, progress)

    guard = Guard.from_bundle(workdir / "bundle")
    progress("loading off-distribution sets")
    ood = load_ood_sets(data_root, cfg.seed, cfg.generated_per_kind)

    # Baseline detectors fitted on the training split (features of the same deployed engine / model).
    # Each set is preprocessed once; the guard and the baselines run on the same tensors.
    xp_train = preprocess_batch(list(data["train"][0]), guard.spec)
    _, early_tr = _engine_outputs(guard.engine, xp_train)
    real = [i for i in range(len(CLASS_NAMES)) if i != GARBAGE]
    maha_early = ood_baselines.MahalanobisDetector.fit(early_tr, data["train"][1])
    maha_pen = ood_baselines.MahalanobisDetector.fit(penultimate_features(model, xp_train), data["train"][1])

    def baseline_scores(xp):  # in-distribution-ness: negated OOD scores
        logits, early = _engine_outputs(guard.engine, xp)
        z = logits[:, real]
        return {
            "msp": -ood_baselines.msp_score(z),
            "energy": -ood_baselines.energy_score(z),
            "max_logit": -ood_baselines.max_logit_score(z),
            "mahalanobis_early": -maha_early.score(early),
            "mahalanobis_penultimate": -maha_pen.score(penultimate_features(model, xp)),
        }

    progress(f"guard on the test split ({len(data['test'][0])} images)")
    x_test, y_test = data["test"]
    xp_test = preprocess_batch(list(x_test), guard.spec)
    id_run = _guard_run(guard, xp_test)
    id_base = baseline_scores(xp_test)
    id_scores = _score_set(guard, xp_test)
    ood_scores, ood_base = {}, {}
    accepted = id_run["accepted"]
    labels = np.array([v.label_index if v.accepted else -1 for v in id_run["verdicts"]])
    results = {
        "preset": "pneumoniamnist",
        "alpha": guard.alpha,
        "n_test": int(len(x_test)),
        "id_false_rejection_rate": float(1 - accepted.mean()),
        "calibrated_false_rejection_rate": guard.manifest["calibration"].get("measured_false_rejection_rate"),
        "accepted_accuracy": float((labels[accepted] == y_test[accepted]).mean()) if accepted.any() else None,
        "accuracy_all_argmax": float((np.array([v.predicted_index for v in id_run["verdicts"]]) == y_test).mean()),
        "garbage_training_sets": [f"generated:{k}" for k in GARBAGE_KINDS],
        "ood": {},
        "baselines": {name: {} for name in id_base},
        "sets": {},
    }
    curves = {}
    for name, s in ood.items():
        if not s["images"]:
            log.warning("set %s is empty (%d undecodable); skipped", name, len(s["undecodable"]))
            continue
        progress(f"guard on {name} ({len(s['images'])} images)")
        xp = preprocess_batch(s["images"], guard.spec)
        run = _guard_run(guard, xp)
        roc = _roc(id_run["rank"], run["rank"])
        curves[name] = {"guard": roc.pop("curve")}
        roc["auroc_combined_p"] = _roc(id_run["combined_p"], run["combined_p"])["auroc"]
        reasons = {}
        for v in run["verdicts"]:
            for r in v.reasons:
                reasons[r] = reasons.get(r, 0) + 1
        results["ood"][name] = {
            "rejection_rate": float(1 - run["accepted"].mean()),
            **roc,
            "n": len(s["images"]),
            "reasons": reasons,
        }
        results["sets"][name] = {
            "description": s["description"],
            "n": len(s["images"]),
            "undecodable": s["undecodable"],
        }
        base = baseline_scores(xp)
        ood_base[name] = base
        for b, sc in base.items():
            r = _roc(id_base[b], sc)
            curves[name][b] = r.pop("curve")
            results["baselines"][b][name] = r
        best = max(base, key=lambda b: results["baselines"][b][name]["auroc"])
        results["ood"][name]["vs_best_baseline"] = {
            "baseline": best,
            **auroc_difference(id_run["rank"], run["rank"], id_base[best], base[best], seed=cfg.seed),
        }
        s["run"] = run
        ood_scores[name] = _score_set(guard, xp)
    progress("ablation (each check alone), site-calibration protocol, exact vs sliced Wasserstein")
    results["ablation"], results["ablation_id_false_rejection"] = ablation(guard, id_scores, ood_scores)
    base_scores = {b: (id_base[b], {n: ood_base[n][b] for n in ood_base}) for b in id_base}
    results["site"] = site_protocol(guard, id_scores, cfg.seed, ood_scores=ood_scores, baselines=base_scores)
    results["wasserstein_check"] = wasserstein_agreement(guard, xp_test)
    # Model suitability in the paper's sense: the guard run over a whole set, compared with its
    # calibration (rejection rate with a confidence interval, per-check rates, KS shift per score).
    progress("suitability of the model for hannover_cxr (and, as a control, for its own test split)")
    hannover = _hannover_suitability(
        guard, Path(data_root) / "hannover_cxr" / "png", ood.get("hannover_cxr"), workdir / "suitability_hannover"
    )
    from gamguard.runtime.suitability import Item, assess

    test_items = [
        Item(f"test/{i}", v, None, CLASS_NAMES[y]) for i, (v, y) in enumerate(zip(id_run["verdicts"], y_test))
    ]
    test_suit = assess(guard, test_items, dataset="pneumoniamnist test split")
    results["suitability"] = {
        name: {k: r[k] for k in ("verdict", "reasons", "warnings", "n")} | {"report": r.get("report")}
        for name, r in (("hannover_cxr", hannover), ("pneumoniamnist_test", test_suit))
    }
    results["goals"] = _goals(results)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["training"] = {"seconds": training.get("seconds"), "epochs": len(training.get("history") or [])}
    report_dir = workdir / "report"
    _write_report(report_dir, results, id_run, ood, curves, x_test)
    results["report"] = str(report_dir / "index.html")
    (report_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _hannover_suitability(guard, folder: Path, s: dict | None, report_dir: Path) -> dict:
    """``gamguard suitability`` of the hannover set from the verdicts already computed (no second
    decode or guard pass), with its HTML report in ``report_dir``; pixels are kept for a spread of
    images (every ``step``-th, as :func:`gamguard.runtime.suitability.suitability` does) for overlays."""
    from gamguard.runtime.guard import Verdict
    from gamguard.runtime.suitability import Item, assess, write_report

    s = s or {"images": [], "names": [], "undecodable": []}
    verdicts = s["run"]["verdicts"] if "run" in s else []
    max_examples = 8
    step = max(1, (len(verdicts) + len(s["undecodable"])) // (4 * max_examples))
    items = [
        Item(str(folder / name), v, pixels if i % step == 0 else None)
        for i, (name, v, pixels) in enumerate(zip(s["names"], verdicts, s["images"]))
    ]
    for msg in s["undecodable"]:  # "<file name>: <decode error>", as the suitability run reports them
        name, _, err = msg.partition(": ")
        items.append(Item(str(folder / name), Verdict.rejected("INVALID_INPUT", err), None))
    result = assess(guard, items, dataset=str(folder))
    result["report"] = str(write_report(report_dir, result, guard, items, max_examples=max_examples))
    return result


def _goals(r: dict) -> dict:
    """Which of the issue's goals are met (reported, never tuned on the test sets)."""
    frr_ok = abs(r["id_false_rejection_rate"] - r["alpha"]) <= GOALS["id_false_rejection_within"]
    site = {
        a: abs(v["id_false_rejection_rate_after"] - float(a)) <= GOALS["id_false_rejection_within"]
        for a, v in r["site"]["by_alpha"].items()
    }
    far = {k: r["ood"][k]["rejection_rate"] for k in FAR_OOD if k in r["ood"]}
    best_baseline = {k: max(r["baselines"][b][k]["auroc"] for b in r["baselines"]) for k in r["ood"]}
    return {
        "id_false_rejection_within_alpha_2pts": bool(frr_ok),
        "site_calibrated_false_rejection_within_alpha_2pts": {a: bool(v) for a, v in site.items()},
        "hannover_rejection_ge_99pct": bool(r["ood"].get("hannover_cxr", {}).get("rejection_rate", 0) >= 0.99),
        "far_ood_rejection_ge_99pct": {k: bool(v >= GOALS["far_ood_rejection"]) for k, v in far.items()},
        "guard_auroc_ge_best_baseline": {k: bool(r["ood"][k]["auroc"] >= best_baseline[k] - 1e-12) for k in r["ood"]},
        "best_baseline_auroc": best_baseline,
    }


# --------------------------------------------------------------------------------------- report


def _vs_baseline_text(r: dict, goals: dict, name: str) -> str:
    """``0.9940 vs 0.9967 (mahalanobis_early; Δ −0.0027, 95 % CI −0.0061…+0.0006)``."""
    text = f"{r['auroc']:.4f} vs {goals['best_baseline_auroc'][name]:.4f}"
    v = r.get("vs_best_baseline")
    if v:
        lo, hi = v["ci95"]
        text += f" ({v['baseline']}; Δ {v['delta']:+.4f}, paired bootstrap 95 % CI {lo:+.4f}…{hi:+.4f})"
    return text


def _goals_html(results: dict) -> str:
    """The goals as a table: one row per goal and set, met or not, with the figures it compares."""
    g = results["goals"]

    def mark(ok: bool | None) -> str:
        if ok is None:
            return "—"
        return "<b style='color:#0a0'>met</b>" if ok else "<b style='color:#c00'>not met</b>"

    rows = [
        (
            "in-distribution false rejection on the test split, before site calibration (reported; another "
            "site breaks exchangeability, site calibration restores it)",
            f"{results['id_false_rejection_rate']:.3f} vs alpha {results['alpha']:g}",
            None,
        )
    ]
    for a, ok in g["site_calibrated_false_rejection_within_alpha_2pts"].items():
        after = results["site"]["by_alpha"][a]["id_false_rejection_rate_after"]
        rows.append((f"after site calibration, within alpha ± 2 points (alpha {a})", f"{after:.3f}", ok))
    hannover = results["ood"].get("hannover_cxr")
    if hannover is not None:
        rows.append(
            ("hannover_cxr rejected ≥ 99 %", f"{hannover['rejection_rate']:.3f}", g["hannover_rejection_ge_99pct"])
        )
    for k, ok in g["far_ood_rejection_ge_99pct"].items():
        rows.append((f"{k} rejected ≥ 99 %", f"{results['ood'][k]['rejection_rate']:.3f}", ok))
    for k, ok in g["guard_auroc_ge_best_baseline"].items():
        rows.append((f"{k}: guard AUROC ≥ best baseline", _vs_baseline_text(results["ood"][k], g, k), ok))
    body = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{html.escape(v)}</td><td>{mark(ok)}</td></tr>" for n, v, ok in rows
    )
    return f"<h2>Goals</h2><table><tr><th>goal</th><th>measured</th><th></th></tr>{body}</table>"


def _ablation_html(results: dict) -> str:
    names = list(results["ood"])
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><td>{check}</td><td>{results['ablation_id_false_rejection'][check]:.3f}</td>"
        + "".join(
            f"<td>{v['auroc']:.4f} / {v['rejection_rate']:.3f}</td>"
            for v in (results["ablation"][check][n] for n in names)
        )
        + "</tr>"
        for check in results["ablation"]
    )
    return (
        "<h2>Ablation: each check alone and combined</h2><p>AUROC (the check's own p-value; "
        "<code>combined_p</code> for the combination; a garbage-class prediction first wherever the garbage "
        "check is in) / rejection rate at the check's own conformal cut; "
        "first column: false rejection on the in-distribution test split.</p>"
        f"<table><tr><th>check</th><th>ID false rejection</th>{head}</tr>{rows}</table>"
    )


def _site_html(results: dict) -> str:
    site = results["site"]
    rows = "".join(
        f"<tr><td>{a}</td><td>{v['id_false_rejection_rate_before']:.3f}</td>"
        f"<td>{v['id_false_rejection_rate_after']:.3f}</td><td>{v['over_splits']['before_mean']:.3f}</td>"
        f"<td>{v['over_splits']['after_mean']:.3f} ± {v['over_splits']['after_sd']:.3f}</td>"
        f"<td>{v['over_splits']['after_within_2pts']:.0%}</td>"
        f"<td>{v['id_false_rejection_rate_after_split']:.3f}</td>"
        f"<td>{v['over_splits']['after_split_mean']:.3f} ± {v['over_splits']['after_split_sd']:.3f}</td>"
        f"<td>{v['over_splits']['after_split_within_2pts']:.0%}</td></tr>"
        for a, v in site["by_alpha"].items()
    )
    n_splits = next(iter(site["by_alpha"].values()))["over_splits"]["n_splits"]
    return (
        f"<h2>Site calibration</h2><p>A seeded half of the test split ({site['n_site']} images, seed "
        f"{site['seed']}) calibrates the site (null tables and conformal cut, no labels, references kept); the "
        f"other {site['n_measured']} images measure the in-distribution false rejection. Mean over {n_splits} "
        "seeded halvings alongside. 'after': the default cross-fitted cut (every site image fits the tables "
        "and, out of fold, the cut); 'split cut': the site halved again into null and conformal parts.</p>"
        "<table><tr><th>alpha</th><th>before</th><th>after</th><th>before, mean</th><th>after, mean ± sd</th>"
        "<th>after within alpha ± 2 pts</th><th>split cut</th><th>split cut, mean ± sd</th>"
        f"<th>split cut within ± 2 pts</th></tr>{rows}</table>" + _site_auroc_html(site)
    )


def _site_auroc_html(site: dict) -> str:
    auroc = site.get("auroc_measured_half") or {}
    if not auroc:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{r['guard_before']:.4f}</td><td>{r['guard_after']:.4f}</td>"
        f"<td>{r.get('best_baseline', float('nan')):.4f}</td></tr>"
        for n, r in auroc.items()
    )
    return (
        "<p>AUROC on the measured half (in-distribution) against each off-distribution set, the guard before "
        "and after site calibration, and the best baseline on the same images:</p><table><tr><th>set</th>"
        f"<th>guard before</th><th>guard after</th><th>best baseline</th></tr>{rows}</table>"
    )


def _fmt(value, digits: int = 3) -> str:
    """A number for the report, rounded for reading (``n/a`` when there is none)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _img_tag(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def _write_report(out: Path, results: dict, id_run: dict, ood: dict, curves: dict, x_test) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gamguard.runtime.overlays import overlay_image

    out.mkdir(parents=True, exist_ok=True)
    names = list(results["ood"])
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        bins = np.linspace(0, 1, 26)
        # min(1, combined_p): the weighted Bonferroni p-value (combined_p itself can exceed 1)
        ax.hist(np.minimum(id_run["combined_p"], 1.0), bins=bins, alpha=0.6, density=True, label="PneumoniaMNIST test")
        ax.hist(np.minimum(ood[name]["run"]["combined_p"], 1.0), bins=bins, alpha=0.6, density=True, label=name)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("guard combined p-value, min(1, combined_p)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "histograms.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, (fpr, tpr) in curves[name].items():
            auc = results["ood"][name]["auroc"] if method == "guard" else results["baselines"][method][name]["auroc"]
            ax.plot(fpr, tpr, lw=2.2 if method == "guard" else 1.0, label=f"{method} {auc:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("FPR (OOD accepted)")
        ax.legend(fontsize=6, loc="lower right")
    axes[0][0].set_ylabel("TPR (ID accepted)")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=90)
    plt.close(fig)

    # Example overlays: four accepted test images, then the first rejected image of every set.
    import cv2

    tiles = []
    for i in np.flatnonzero(id_run["accepted"])[:4]:
        tiles.append(overlay_image(x_test[i], id_run["verdicts"][i], CLASS_NAMES))
    for name in names:
        run = ood[name]["run"]
        rej = np.flatnonzero(~run["accepted"])
        if rej.size:
            tiles.append(overlay_image(ood[name]["images"][rej[0]], run["verdicts"][rej[0]], CLASS_NAMES))
    h, w = tiles[0].shape[:2]
    tiles = [cv2.resize(t, (w, h)) for t in tiles]
    per_row = 3
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % per_row)  # pad the last row
    rows = [np.concatenate(tiles[i : i + per_row], axis=1) for i in range(0, len(tiles), per_row)]
    cv2.imwrite(str(out / "overlays.png"), np.concatenate(rows, axis=0))

    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{results['ood'][n]['n']}</td>"
        f"<td>{results['ood'][n]['rejection_rate']:.3f}</td><td>{results['ood'][n]['auroc']:.4f}</td>"
        f"<td>{results['ood'][n]['auroc_combined_p']:.4f}</td><td>{results['ood'][n]['fpr95']:.3f}</td>"
        + "".join(
            f"<td>{results['baselines'][b][n]['auroc']:.4f} / {results['baselines'][b][n]['fpr95']:.3f}</td>"
            for b in results["baselines"]
        )
        + "</tr>"
        for n in names
    )
    heads = "".join(f"<th>{html.escape(b)}<br>AUROC / FPR95</th>" for b in results["baselines"])
    page = f"""<!doctype html><meta charset="utf-8"><title>gamguard evaluate: pneumoniamnist</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px 8px}}
table{{border-collapse:collapse}}img{{max-width:100%}}</style>
<h1>Guard efficacy: PneumoniaMNIST model</h1>
<p>In-distribution test split: n={results["n_test"]}, false rejection {results["id_false_rejection_rate"]:.3f}
(alpha {results["alpha"]}, calibrated {results["calibrated_false_rejection_rate"]:.3f}), accuracy of accepted
predictions {_fmt(results["accepted_accuracy"])}. Garbage class trained on:
{", ".join(results["garbage_training_sets"])} (no real images); none of the sets below was seen in training.
Guard AUROC: inputs ordered as the guard decides (a garbage-class prediction first, it is rejected at every
alpha; then <code>combined_p</code>); beside it, <code>combined_p</code> alone.</p>
<table><tr><th>set</th><th>n</th><th>guard rejection</th><th>guard AUROC</th><th>AUROC of combined_p alone</th>
<th>guard FPR95</th>{heads}</tr>
{rows}</table>
{_ablation_html(results)}
{_site_html(results)}
{_goals_html(results)}
<h2>Score histograms</h2>{_img_tag(out / "histograms.png")}
<h2>ROC curves</h2>{_img_tag(out / "roc.png")}
<h2>Example overlays</h2><p>Four accepted test images, then the first rejected image of each set.</p>
{_img_tag(out / "overlays.png")}
<h2>Data</h2><p>PneumoniaMNIST (MedMNIST v2, Yang et al. 2023; Kermany et al. 2018), CC BY 4.0. Hannover
Medical School COVID-19 Image Repository, CC BY 3.0. DDH pelvis radiographs, Fraiwan et al. 2022, CC BY 4.0.
Hand radiographs: radinformatics bone-age examples (MIT). pydicom test files.</p>
"""
    (out / "index.html").write_text(page)
