"""Choose the guard's combination weights and check its p-value tails — on VALIDATION data only.

    .venv/bin/python scripts/choose_combination.py WORKDIR      (WORKDIR: a `gamguard evaluate` workdir)

Reproduces docs/architecture.md ("The guard decision"): the PneumoniaMNIST validation split, 2-fold
cross-fitted over 5 seeds (null tables from one half, the other half scored). In-distribution side: the
scored half, clean and under benign acquisition changes a new site brings; off-distribution side:
synthetic kinds that no evaluated set uses and severe transforms of the scored half. No test set is read.
Prints the mean AUROC of each combination rule (weighted Bonferroni minimum and weighted Fisher, the garbage
and attention shares from 0.01 to 0.03 and on a 0.05 grid above, single checks) and, per check, how many
held-out in-distribution p-values fall below 1e-3 / 1e-4 / 1e-6 (a valid p-value gives about n·level).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from gamguard.exporter import evaluate as ev
from gamguard.runtime.checks.combine import NullModel
from gamguard.runtime.checks.scores import ScoreSet
from gamguard.runtime.demo import phantoms
from gamguard.runtime.guard import Guard
from gamguard.runtime.preprocess import preprocess_batch

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _zoom(im, f):
    h = im.shape[0]
    c = int(h * f)
    o = (h - c) // 2
    return cv2.resize(im[o : o + c, o : o + c], (h, h), interpolation=cv2.INTER_LINEAR)


def _affine(im, rng):
    h, w = im.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-7, 7), rng.uniform(0.93, 1.07))
    m[:, 2] += rng.uniform(-0.04, 0.04, 2) * w
    return cv2.warpAffine(im, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _jpeg(im, rng):
    q = int(rng.integers(40, 81))
    _, buf = cv2.imencode(".jpg", (im * 255).round().astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, q])
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


def _sharpen(im, rng):
    return np.clip(im + rng.uniform(0.3, 0.8) * (im - cv2.GaussianBlur(im, (0, 0), 1.0)), 0, 1)


def _window(im, rng):  # contrast/windowing and an exposure offset
    return np.clip((im - 0.5) * rng.uniform(0.8, 1.25) + 0.5 + rng.uniform(-0.08, 0.08), 0, 1)


BENIGN = {
    "gamma": lambda im, r: im ** r.uniform(0.7, 1.45),
    "window": _window,
    "blur": lambda im, r: cv2.GaussianBlur(im, (0, 0), r.uniform(0.4, 0.7)),
    "sharpen": _sharpen,
    "noise": lambda im, r: np.clip(im + r.normal(0, r.uniform(0.01, 0.03), im.shape), 0, 1),
    "geometry": _affine,
    "jpeg": _jpeg,
}


def _mixed3(im, r):
    for k in r.choice(list(BENIGN), size=3, replace=False):
        im = np.ascontiguousarray(BENIGN[k](im, r), dtype=np.float32)
    return im


BENIGN["mixed3"] = _mixed3
_NOISE = np.random.default_rng(5)
SEVERE = {
    "rot90": lambda im: np.rot90(im),
    "rot180": lambda im: np.rot90(im, 2),
    "invert": lambda im: 1 - im,
    "hflip": lambda im: im[:, ::-1],
    "gamma3": lambda im: im**3,
    "noise15": lambda im: np.clip(im + _NOISE.normal(0, 0.15, im.shape), 0, 1),
    "blur15": lambda im: cv2.GaussianBlur(im, (0, 0), 1.5),
    "zoom50": lambda im: _zoom(im, 0.5),
    "lowcontrast": lambda im: 0.3 + 0.4 * im,
}
PRESENTATION = ("rot90", "rot180", "invert", "hflip")  # wrong presentations: off-distribution content
SYNTHETIC = ("cropped_hand", "chest", "rotated_hand", "inverted_hand", "noisy_hand")


def score_sets(guard) -> dict[str, ScoreSet]:
    x = ev.load_pneumoniamnist(DATA_ROOT)["val"][0]
    sets = {"clean": list(x)}
    for i, (k, f) in enumerate(BENIGN.items()):
        r = np.random.default_rng(11 + i)
        sets["benign_" + k] = [f(im.astype(np.float32), r) for im in x]
    for k, f in SEVERE.items():
        sets["severe_" + k] = [f(im) for im in x]
    for kind in SYNTHETIC:
        sets["synth_" + kind] = list(phantoms.ood_set((kind,), 60, 424242, 256)[0])
    out = {}
    for name, ims in sets.items():
        xp = preprocess_batch([np.ascontiguousarray(im, dtype=np.float32) for im in ims], guard.spec)
        parts = []
        for i in range(0, len(xp), 64):
            o = guard.engine.run(xp[i : i + 64])
            parts.append(guard.calibration.score(o.logits, o.cam, o.early))
        out[name] = ScoreSet.concat(parts)
        print(f"scored {name} ({len(ims)})", file=sys.stderr, flush=True)
    return out


def _auc(id_stat, ood_stat):  # statistics: higher = more in-distribution
    return roc_auc_score(np.r_[np.ones(len(id_stat)), np.zeros(len(ood_stat))], np.r_[id_stat, ood_stat])


def main(workdir: Path) -> None:
    guard = Guard.from_bundle(workdir / "bundle")
    s = score_sets(guard)
    benign = [k for k in s if k.startswith("benign_")]
    content = [k for k in s if k.startswith("synth_") or k.removeprefix("severe_") in PRESENTATION]
    acquisition = [k for k in s if k.startswith("severe_") and k not in content]
    folds = []
    n = s["clean"].feature.size
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(n)
        halves = (perm[: n // 2], perm[n // 2 :])
        for a, b in (halves, halves[::-1]):
            null = NullModel(s["clean"].take(a), 2)
            fold = {}
            for k, v in s.items():
                pv = null.pvalues(v if k.startswith("synth_") else v.take(b))
                fold[k] = (np.stack([pv.garbage, pv.attention, pv.feature], 1), pv.garbage_pred)
            folds.append(fold)

    def mean_auroc(stat, ood=content):
        per_set = {k: [] for k in ood}
        for f in folds:
            st = {k: np.where(g, -1e300, stat(p)) for k, (p, g) in f.items()}  # garbage argmax: lowest
            id_side = np.concatenate([st["clean"]] + [st[k] for k in benign])
            for k in ood:
                per_set[k].append(_auc(id_side, st[k]))
        return float(np.mean([np.mean(v) for v in per_set.values()]))

    neglog = lambda p: -np.log(np.maximum(p, 1e-300))  # noqa: E731
    single = {c: (lambda p, j=j: p[:, j]) for j, c in enumerate(("garbage", "attention", "feature"))}
    rows = [(f"{c} alone", stat) for c, stat in single.items()]
    # garbage and attention shares from 1 % up (a 0.05 grid above 5 %), the feature check gets the rest
    shares = [0.01, 0.02, 0.03] + [round(x, 2) for x in np.arange(0.05, 1.0, 0.05)]
    grid = [(g, a, round(1 - g - a, 2)) for g, a in itertools.product(shares, repeat=2) if g + a < 0.995]
    for name, stat in (
        ("weighted min", lambda p, w: np.min(p / np.asarray(w), 1)),
        ("weighted Fisher", lambda p, w: -(neglog(p) * np.asarray(w)).sum(1)),
    ):
        res = sorted(((mean_auroc(lambda p, w=w: stat(p, w)), tuple(w)) for w in grid), reverse=True)
        rows += [(f"{name} {tuple(round(float(x), 2) for x in w)}", lambda p, w=w, f=stat: f(p, w)) for _, w in res[:3]]
    rows.append(("weighted min (0.5, 0.1, 0.4), the earlier default", lambda p: np.min(p / [0.5, 0.1, 0.4], 1)))
    print(
        "| rule (garbage, attention, feature) | mean AUROC, content (the criterion) | "
        "mean AUROC, stronger acquisition changes |\n|---|---|---|"
    )
    for name, stat in rows:
        print(f"| {name} | {mean_auroc(stat):.4f} | {mean_auroc(stat, acquisition):.4f} |")
    print("\n| held-out set | scorings | garbage p<1e-3/1e-4/1e-6 | attention | feature |\n|---|---|---|---|---|")
    for k in ["clean"] + benign:
        p = np.concatenate([f[k][0] for f in folds])
        cells = [" / ".join(str(int((p[:, j] < t).sum())) for t in (1e-3, 1e-4, 1e-6)) for j in range(3)]
        print(f"| {k} | {len(p)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
