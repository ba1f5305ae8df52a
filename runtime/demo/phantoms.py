"""Procedural hand/wrist radiograph phantoms and off-distribution image generators.

This is the embedded demo data: it needs no download, no network and no torch (numpy + OpenCV).
Everything is drawn with OpenCV primitives directly at the output size, so a 256x256 phantom takes
a few milliseconds.

Hand phantoms
-------------
A left hand, postero-anterior view (thumb on the image's right, forearm at the bottom), as used for
bone-age reading: radius and ulna with distal epiphyses, carpal bones, five metacarpals and the
phalanges (the thumb has no middle phalanx), inside a soft-tissue envelope. Pixel values are
MONOCHROME2 (bone bright): air < soft tissue < bone medulla < bone cortex.

Four skeletal-maturity stages (``CLASS_NAMES``) differ where they differ in real bone-age reading,
so the discriminative regions are known (the ``masks`` of a :class:`Phantom`):

=============  =================  =========================  ==============================
stage          ossified carpals   epiphysis width/metaphysis  growth plate (physis)
=============  =================  =========================  ==============================
infant         1-2                0.30-0.45 (small nuclei)    wide gap (~1.9 % of the image)
child          3-5                0.55-0.75                   gap ~1.2 %
adolescent     6-7                0.90-1.10 (capping)         narrow gap ~0.9 %
adult          8                  fused                       closed: a 1-pixel physeal scar
=============  =================  =========================  ==============================

(The infant ulna has no ossified distal epiphysis.) Carpals ossify in the real order: capitate,
hamate, triquetrum, lunate, trapezium, trapezoid, scaphoid, pisiform. Within a stage a continuous
maturity, hand size, finger spread, bone lengths and widths vary, so classes are learnable but not
trivially separable by a single pixel statistic.

Acquisition (``acquisition=True``): rotation (+-15 deg), translation, scale, exposure/gain, gamma,
a heel-effect gradient, blur, signal-dependent (Poisson-like) quantum noise, collimation edges
(unexposed border, bright in MONOCHROME2) and a lead side marker ("L"/"R"). The geometry is applied
to the drawing coordinates, so every mask follows it exactly; masks are cleared under collimation.

Off-distribution generators (``ood_image``)
-------------------------------------------
``GARBAGE_TRAIN_KINDS`` are used to train the classifier's garbage class:

* ``noise`` — white or coloured (1/f^beta) noise fields
* ``blobs`` — smooth random blobs
* ``text`` — document-like pages of text lines
* ``geometric`` — stripes, checkerboards, circles
* ``knee`` — another anatomy: knee radiograph phantom (femur, tibia, fibula, patella)
* ``cropped_hand`` — a badly cropped hand: a zoomed corner of a hand phantom
* ``flat`` — a featureless frame, as from a blank exposure or a detector fault: a uniform level with a
  smooth gain variation, noise, and sometimes a collimator edge or detector line defects

``HELD_OUT_KINDS`` are never used for garbage training; they measure whether the guard catches
unseen kinds of wrong input:

* ``chest`` — chest radiograph phantom (lungs, ribs, spine, heart shadow, clavicles)
* ``rotated_hand`` — a hand phantom rotated by 90, 180 or 270 degrees
* ``inverted_hand`` — MONOCHROME1-looking hand (``1 - image``), i.e. a missed inversion
* ``noisy_hand`` — a hand under very heavy noise
* ``texture`` — natural textures: fractal noise, wood rings, marble
* ``photo`` — natural-photo-like scene: sky gradient, horizon, sun, hills, buildings

All generators return float32 ``HxW`` arrays in [0, 1] and are deterministic given the
``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

GENERATOR_VERSION = "1"

CLASS_NAMES: tuple[str, ...] = ("infant", "child", "adolescent", "adult")
GARBAGE_TRAIN_KINDS: tuple[str, ...] = ("noise", "blobs", "text", "geometric", "knee", "cropped_hand", "flat")
HELD_OUT_KINDS: tuple[str, ...] = ("chest", "rotated_hand", "inverted_hand", "noisy_hand", "texture", "photo")
OOD_KINDS: tuple[str, ...] = GARBAGE_TRAIN_KINDS + HELD_OUT_KINDS

MASK_NAMES: tuple[str, ...] = ("bone", "growth_plate", "epiphysis", "carpal", "hand")

# Per stage: (min, max) carpal count, epiphysis width ratio range, physis gap range (fraction of the
# canonical frame), carpal radius range. Gap None = fused (physeal scar only).
_STAGES = (
    dict(carpals=(1, 2), epi=(0.30, 0.45), gap=(0.021, 0.017), carpal_r=(0.011, 0.014)),
    dict(carpals=(3, 5), epi=(0.55, 0.75), gap=(0.014, 0.011), carpal_r=(0.015, 0.018)),
    dict(carpals=(6, 7), epi=(0.90, 1.10), gap=(0.010, 0.0075), carpal_r=(0.019, 0.022)),
    dict(carpals=(8, 8), epi=(1.00, 1.00), gap=None, carpal_r=(0.022, 0.025)),
)

# Carpal centres in the canonical frame (unit square, y down), in ossification order, with the
# relative size of each bone. Spacing leaves a gap between neighbours even at the largest size, so
# the carpal mask has one connected component per ossified bone.
_CARPALS = (  # name, x, y, relative size, aspect (y/x)
    ("capitate", 0.497, 0.672, 1.00, 1.25),
    ("hamate", 0.437, 0.675, 0.95, 1.10),
    ("triquetrum", 0.442, 0.745, 0.85, 0.90),
    ("lunate", 0.500, 0.752, 0.90, 0.95),
    ("trapezium", 0.617, 0.690, 0.85, 0.95),
    ("trapezoid", 0.558, 0.670, 0.75, 1.00),
    ("scaphoid", 0.562, 0.752, 0.95, 0.85),
    ("pisiform", 0.386, 0.728, 0.60, 1.00),
)


@dataclass
class Phantom:
    """One generated radiograph with its ground truth."""

    image: np.ndarray  # float32 HxW in [0, 1], MONOCHROME2 (bone bright)
    stage: int  # index into CLASS_NAMES
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # bool HxW, see MASK_NAMES
    params: dict = field(default_factory=dict)  # drawn parameters, JSON-serialisable


# --------------------------------------------------------------------------------------------------
# drawing helpers
_SHIFT = 4  # OpenCV sub-pixel drawing: coordinates in 1/16 pixel
_ONE = 1 << _SHIFT


class _Canvas:
    """Draws into named uint8 layers through an affine map from the canonical unit frame to pixels."""

    LAYERS = ("outer", "inner", "epi", "plate", "carpal", "scar")

    def __init__(self, size: int, matrix: np.ndarray):
        self.size = size
        self.m = matrix  # 2x3, canonical (x, y) in [0,1] units -> pixels
        self.px = math.sqrt(abs(np.linalg.det(matrix[:, :2])))  # pixels per canonical unit
        self.rot_deg = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
        self.layers = {n: np.zeros((size, size), np.uint8) for n in self.LAYERS}
        self.tissue = np.zeros((size, size), np.float32)

    def pt(self, p):
        q = self.m[:, :2] @ np.asarray(p, np.float64) + self.m[:, 2]
        return (int(round(q[0] * _ONE)), int(round(q[1] * _ONE)))

    def _len(self, w: float) -> int:
        return max(1, int(round(w * self.px * _ONE)))

    def capsule(self, p0, p1, width, layers, value=255):
        t = max(1, int(round(width * self.px)))
        for name in layers:
            img = self.tissue if name == "tissue" else self.layers[name]
            cv2.line(img, self.pt(p0), self.pt(p1), value, t, cv2.LINE_8, _SHIFT)

    def ellipse(self, c, ax, ay, angle_deg, layers, value=255):
        axes = (self._len(ax), self._len(ay))
        for name in layers:
            img = self.tissue if name == "tissue" else self.layers[name]
            cv2.ellipse(img, self.pt(c), axes, angle_deg + self.rot_deg, 0, 360, value, -1, cv2.LINE_8, _SHIFT)

    def poly(self, points, layers, value=255):
        pts = np.array([self.pt(p) for p in points], np.int32)
        hull = cv2.convexHull(pts)
        for name in layers:
            img = self.tissue if name == "tissue" else self.layers[name]
            cv2.fillConvexPoly(img, hull, value, cv2.LINE_8, _SHIFT)


def _unit(a_deg: float) -> np.ndarray:
    """Direction of a bone at angle a (degrees from 'up', positive toward the image's right)."""
    a = math.radians(a_deg)
    return np.array([math.sin(a), -math.cos(a)])


def _draw_bone(cv: _Canvas, prox, dist, width, *, epi_end, epi_ratio, gap, angle_deg):
    """A long bone from ``prox`` to ``dist`` with an optional epiphysis at ``epi_end`` ('prox'/'dist').

    Cortex = ``outer`` layer, medulla = ``inner`` layer (drawn darker), epiphysis and physis in their
    own layers. ``gap=None`` means fused: the bone is continuous and a physeal scar line remains.
    """
    prox, dist = np.asarray(prox, float), np.asarray(dist, float)
    axis = dist - prox
    length = float(np.linalg.norm(axis))
    u = axis / length
    n = np.array([-u[1], u[0]])
    a, b = prox, dist
    if epi_end is not None:
        end, inward = (prox, u) if epi_end == "prox" else (dist, -u)
        e_h = width * (0.30 + 0.25 * min(epi_ratio, 1.0))  # epiphysis height along the bone
        if gap is None:  # fused: whole bone continuous, epiphysis region still labelled
            c = end + inward * (e_h / 2)
            cv.ellipse(c, width * 0.5, e_h / 2, angle_deg + 90, ("epi",))
            s = end + inward * e_h
            cv.capsule(s - n * width * 0.45, s + n * width * 0.45, 0.0, ("plate", "scar"))
        else:
            c = end + inward * (e_h / 2)
            ax = width * 0.5 * epi_ratio
            cv.ellipse(c, ax, e_h / 2, angle_deg + 90, ("outer", "epi"))
            if ax > 0.004 and e_h > 0.006:
                cv.ellipse(c, ax * 0.6, e_h * 0.3, angle_deg + 90, ("inner",))
            g_c = end + inward * (e_h + gap / 2)
            cv.capsule(g_c - n * width * 0.45, g_c + n * width * 0.45, gap, ("plate",))
            start = end + inward * (e_h + gap)
            if epi_end == "prox":
                a = start
            else:
                b = start
    # shaft with slightly flared ends (metaphyses / heads). A thick cv2.line has round caps of
    # radius thickness/2 beyond its end points: pull the ends in so the caps do not fill the physis.
    cap = min(width * 0.41, length * 0.3)
    cv.capsule(a + u * cap, b - u * cap, width * 0.82, ("outer",))
    cv.ellipse(a + u * width * 0.35, width * 0.5, width * 0.35, angle_deg + 90, ("outer",))
    cv.ellipse(b - u * width * 0.35, width * 0.5, width * 0.35, angle_deg + 90, ("outer",))
    inset = min(width * 0.7, length * 0.25)
    cv.capsule(a + u * inset, b - u * inset, width * 0.38, ("inner",))


def _put_text(img: np.ndarray, text: str, org, font, scale, value: float, thickness: int) -> None:
    """Anti-aliased text onto a float image (OpenCV 5's putText draws on 8-bit images only)."""
    cover = np.zeros(img.shape, np.uint8)
    cv2.putText(cover, text, org, font, scale, 255, thickness, cv2.LINE_AA)
    a = cover.astype(np.float32) * (1.0 / 255.0)
    img *= 1.0 - a
    img += a * value


def _uniform(rng, lo, hi):
    return float(lo + (hi - lo) * rng.random())


# --------------------------------------------------------------------------------------------------
# hand phantom
def hand_phantom(stage: int, rng: np.random.Generator, size: int = 256, *, acquisition: bool = True) -> Phantom:
    """Draw one hand/wrist radiograph phantom of maturity ``stage`` (index into ``CLASS_NAMES``)."""
    if not 0 <= int(stage) < len(CLASS_NAMES):
        raise ValueError(f"stage must be in 0..{len(CLASS_NAMES) - 1}, got {stage!r}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    stage = int(stage)
    st = _STAGES[stage]
    maturity = float(rng.random())  # continuous position within the stage
    lo, hi = st["carpals"]
    n_carpals = int(rng.integers(lo, hi + 1))
    epi_ratio = _uniform(rng, *st["epi"]) if stage < 3 else 1.0
    gap = None if st["gap"] is None else st["gap"][0] + (st["gap"][1] - st["gap"][0]) * maturity
    carpal_r = st["carpal_r"][0] + (st["carpal_r"][1] - st["carpal_r"][0]) * maturity
    hand_size = _uniform(rng, 0.88, 1.04)
    spread = _uniform(rng, 0.4, 1.5)
    length_k = _uniform(rng, 0.92, 1.08)
    width_k = _uniform(rng, 0.9, 1.1)

    params: dict = dict(
        stage=stage,
        class_name=CLASS_NAMES[stage],
        maturity=round(maturity, 4),
        n_carpals=n_carpals,
        epiphysis_ratio=round(epi_ratio, 4),
        physis_gap=None if gap is None else round(gap, 5),
        carpal_radius=round(carpal_r, 5),
        hand_size=round(hand_size, 4),
        finger_spread=round(spread, 4),
        bone_length=round(length_k, 4),
        bone_width=round(width_k, 4),
        acquisition=acquisition,
    )

    # canonical frame -> pixels: hand size about the wrist, then acquisition rotation/scale/shift
    if acquisition:
        rot = _uniform(rng, -15, 15)
        scale = _uniform(rng, 0.9, 1.08)
        tx, ty = _uniform(rng, -0.05, 0.05), _uniform(rng, -0.04, 0.04)
    else:
        rot, scale, tx, ty = 0.0, 1.0, 0.0, 0.0
    k = hand_size * scale * 1.12  # the hand fills the frame, distal forearm included, as in bone-age films
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    # rotate/scale about the canonical hand centre (0.53, 0.56), which lands at the image centre
    # (0.5, 0.5) + translation: fingertips near the top, the distal forearm near the bottom
    pivot = np.array([0.53, 0.56])
    lin = np.array([[c, -s], [s, c]]) * k
    off = np.array([0.5 + tx, 0.5 + ty]) - lin @ pivot
    matrix = np.hstack([lin, off[:, None]]) * size
    cv = _Canvas(size, matrix)
    params.update(rotation_deg=round(rot, 3), scale=round(scale, 4), shift=[round(tx, 4), round(ty, 4)])

    bw = width_k
    # --- forearm
    radius_top = np.array([0.585, 0.805])
    ulna_top = np.array([0.418, 0.815])
    _draw_bone(cv, (0.59, 1.15), radius_top, 0.080 * bw, epi_end="dist", epi_ratio=epi_ratio, gap=gap, angle_deg=0)
    ulna_epi = "dist" if stage > 0 else None
    _draw_bone(cv, (0.405, 1.15), ulna_top, 0.056 * bw, epi_end=ulna_epi, epi_ratio=epi_ratio, gap=gap, angle_deg=0)
    cv.poly([(0.33, 1.3), (0.67, 1.3), (0.655, 0.76), (0.345, 0.76)], ("tissue",), 1.0)

    # --- carpals, in ossification order
    for name, x, y, rel, aspect in _CARPALS[:n_carpals]:
        r = carpal_r * rel * (0.92 + 0.16 * rng.random())
        ang = _uniform(rng, -25, 25)
        cv.ellipse((x, y), r, r * aspect, ang, ("outer", "carpal"))
        cv.ellipse((x, y), r * 0.55, r * aspect * 0.55, ang, ("inner",))

    # --- metacarpals and phalanges (fingers 2..5 = index..little)
    palm_pts = [(0.36, 0.80), (0.64, 0.80), (0.385, 0.63), (0.64, 0.66)]
    fingers = (  # base x, base y, angle at spread 1, metacarpal length, phalanx lengths, width
        (0.585, 0.635, 7.0, 0.180, (0.105, 0.064, 0.046), 0.040),
        (0.515, 0.628, 0.0, 0.190, (0.115, 0.074, 0.050), 0.041),
        (0.452, 0.635, -6.0, 0.175, (0.108, 0.070, 0.048), 0.037),
        (0.395, 0.650, -13.0, 0.160, (0.090, 0.055, 0.044), 0.034),
    )
    joint = 0.010
    for i, (bx, by, ang0, mc_len, ph_lens, w) in enumerate(fingers):
        w = w * bw
        ang = ang0 * spread + float(rng.normal(0, 1.5))
        fk = length_k * (0.96 + 0.08 * rng.random())
        base = np.array([bx, by])
        head = base + _unit(ang) * mc_len * fk
        _draw_bone(cv, base, head, w, epi_end="dist", epi_ratio=epi_ratio, gap=gap, angle_deg=ang)
        p = head + _unit(ang) * joint
        chain = [base]
        for j, pl in enumerate(ph_lens):
            ang_j = ang + (ang0 * 0.35 * spread + float(rng.normal(0, 2.0))) * (j + 1) * 0.5
            q = p + _unit(ang_j) * pl * fk
            pw = w * (0.85, 0.75, 0.62)[j]
            _draw_bone(cv, p, q, pw, epi_end="prox", epi_ratio=epi_ratio, gap=gap, angle_deg=ang_j)
            chain.append(q)
            p = q + _unit(ang_j) * joint
        tip = chain[-1] + _unit(ang_j) * 0.018
        for a_, b_ in zip(chain[:-1], chain[1:]):
            cv.capsule(a_, b_, w * 2.0, ("tissue",), 0.85)
        cv.capsule(chain[-2], tip, w * 1.7, ("tissue",), 0.85)
        palm_pts.append(tuple(head + _unit(ang) * 0.01))

    # thumb: metacarpal epiphysis proximal, no middle phalanx
    t_ang = 38.0 + 10.0 * (spread - 1.0) + float(rng.normal(0, 3))
    t_base = np.array([0.632, 0.668])
    t_head = t_base + _unit(t_ang) * 0.115 * length_k
    tw = 0.043 * bw
    _draw_bone(cv, t_base, t_head, tw, epi_end="prox", epi_ratio=epi_ratio, gap=gap, angle_deg=t_ang)
    p = t_head + _unit(t_ang) * joint
    chain = [t_base, p]
    for j, pl in enumerate((0.075, 0.055)):
        a_j = t_ang + 6.0 * (j + 1) * spread
        q = p + _unit(a_j) * pl * length_k
        _draw_bone(cv, p, q, tw * (0.85, 0.7)[j], epi_end="prox", epi_ratio=epi_ratio, gap=gap, angle_deg=a_j)
        chain.append(q)
        p = q + _unit(a_j) * joint
    tip = chain[-1] + _unit(a_j) * 0.018
    for a_, b_ in zip(chain[:-1], chain[1:]):
        cv.capsule(a_, b_, tw * 2.1, ("tissue",), 0.9)
    cv.capsule(chain[-2], tip, tw * 1.8, ("tissue",), 0.9)
    palm_pts += [tuple(t_base + _unit(t_ang) * 0.06), (0.66, 0.72)]
    cv.poly(palm_pts, ("tissue",), 1.0)

    # --- compose the attenuation image
    L = cv.layers
    tissue_mask = cv.tissue > 0
    bone = L["outer"] > 0
    plate = (L["plate"] > 0) & ~bone & tissue_mask
    if gap is None:  # fused: the scar is a faint sclerotic line inside the bone
        plate = (L["scar"] > 0) & bone
    sig = max(0.5, 1.6 * size / 256)
    tissue_soft = cv2.GaussianBlur(cv.tissue, (0, 0), sig)
    density = _uniform(rng, 0.85, 1.1) * (0.85 + 0.05 * stage)  # bone mineralisation grows with age
    att = 0.24 * tissue_soft + density * (0.50 * bone - 0.19 * (L["inner"] > 0)) + 0.06 * (L["scar"] > 0)
    att = att.astype(np.float32)

    masks = {
        "bone": bone,
        "growth_plate": plate,
        "epiphysis": (L["epi"] > 0) & bone,
        "carpal": L["carpal"] > 0,
        "hand": tissue_mask,
    }
    image = _acquire(att, rng, size, acquisition, params, masks)
    return Phantom(image=image, stage=stage, masks=masks, params=params)


def _acquire(att: np.ndarray, rng, size: int, acquisition: bool, params: dict, masks: dict) -> np.ndarray:
    """Attenuation-like map -> displayed MONOCHROME2 image, with acquisition effects when asked."""
    px = size / 256.0
    if not acquisition:
        img = 0.06 + 0.9 * att
        img = cv2.GaussianBlur(img, (0, 0), 0.6 * px)
        return np.clip(img, 0.0, 1.0).astype(np.float32)
    offset = _uniform(rng, 0.02, 0.14)
    gain = _uniform(rng, 0.75, 1.1)
    gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.45))))
    blur = _uniform(rng, 0.4, 1.3) * px
    counts = float(np.exp(rng.uniform(np.log(150), np.log(2500))))  # quanta per pixel at full scale
    heel = _uniform(rng, -0.08, 0.08)
    img = offset + gain * att
    # heel effect: exposure falls off along the anode-cathode axis
    ramp = np.linspace(1 - heel, 1 + heel, size, dtype=np.float32)
    img = img * (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])
    img = cv2.GaussianBlur(np.clip(img, 0, 1), (0, 0), blur)
    img = np.power(img, gamma, dtype=np.float32)
    # quantum noise: Poisson-like, variance proportional to signal (Gaussian approximation, fast)
    img = img + rng.standard_normal((size, size), dtype=np.float32) * np.sqrt(img / counts)
    # collimation: unexposed borders (bright in MONOCHROME2), masks cleared there
    colli = None
    if rng.random() < 0.6:
        m = [int(size * _uniform(rng, 0.0, 0.07)) for _ in range(4)]  # top, bottom, left, right
        level = _uniform(rng, 0.8, 0.97)
        keep = np.zeros((size, size), bool)
        keep[m[0] : size - m[1], m[2] : size - m[3]] = True
        img = np.where(keep, img, level + 0.01 * rng.standard_normal((size, size), dtype=np.float32))
        for k in masks:
            masks[k] &= keep
        colli = m
    # lead side marker
    side = "L" if rng.random() < 0.85 else "R"
    font_scale = _uniform(rng, 0.5, 0.8) * px
    corner = int(rng.integers(4))
    th = max(1, int(round(2 * px)))
    (tw, tht), _ = cv2.getTextSize(side, cv2.FONT_HERSHEY_SIMPLEX, font_scale, th)
    margin = int(size * 0.1)
    x = margin if corner in (0, 2) else size - margin - tw
    y = margin + tht if corner in (0, 1) else size - margin
    _put_text(img, side, (x, y), cv2.FONT_HERSHEY_SIMPLEX, font_scale, _uniform(rng, 0.85, 1.0), th)
    params.update(
        offset=round(offset, 4),
        gain=round(gain, 4),
        gamma=round(gamma, 4),
        blur_px=round(blur, 3),
        noise_counts=round(counts, 1),
        heel=round(heel, 4),
        collimation=colli,
        marker=side,
        marker_corner=corner,
    )
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# off-distribution generators
def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _powerlaw_noise(rng, size: int, beta: float) -> np.ndarray:
    """Gaussian noise with a 1/f^beta power spectrum (beta 0 = white, 2 = brown/cloud-like)."""
    f = np.fft.rfftfreq(size)[None, :] ** 2 + np.fft.fftfreq(size)[:, None] ** 2
    f[0, 0] = 1.0
    spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** (beta / 4)
    spec[0, 0] = 0
    return _normalise(np.fft.irfft2(spec, s=(size, size)))


def _ood_noise(rng, size):
    beta = float(rng.choice([0.0, 0.0, 1.0, 2.0, 3.0]))
    x = _powerlaw_noise(rng, size, beta)
    return np.power(x, np.float32(_uniform(rng, 0.6, 1.6)))


def _ood_blobs(rng, size):
    g = int(rng.integers(3, 10))
    low = rng.random((g, g)).astype(np.float32)
    x = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    x = _normalise(x)
    if rng.random() < 0.5:  # sharper blob edges
        x = _normalise(1 / (1 + np.exp(-(x - 0.5) * _uniform(rng, 4, 16))))
    return x


_CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;-"


def _ood_text(rng, size):
    paper, ink = (_uniform(rng, 0.8, 1.0), _uniform(rng, 0.0, 0.3))
    if rng.random() < 0.25:
        paper, ink = ink, paper
    img = np.full((size, size), paper, np.float32)
    scale = _uniform(rng, 0.3, 0.6) * size / 256
    font = int(
        rng.choice(
            [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX]
        )
    )
    line_h = max(6, int(24 * scale * (1.4 if font == cv2.FONT_HERSHEY_PLAIN else 1.0)))
    y = int(rng.integers(line_h, 3 * line_h))
    margin = int(rng.integers(4, max(5, size // 8)))
    while y < size - 4:
        n = int(rng.integers(8, 60))
        txt = "".join(rng.choice(list(_CHARS), n))
        _put_text(img, txt, (margin, y), font, scale, ink, 1)
        y += line_h + int(rng.integers(0, max(1, line_h // 2)))
    if rng.random() < 0.5:  # a table rule or two
        for _ in range(int(rng.integers(1, 4))):
            yy = int(rng.integers(0, size))
            cv2.line(img, (margin, yy), (size - margin, yy), ink, 1)
    return np.clip(img + 0.02 * rng.standard_normal((size, size), dtype=np.float32), 0, 1)


def _ood_geometric(rng, size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = int(rng.integers(3))
    if kind == 0:  # stripes
        a = _uniform(rng, 0, math.pi)
        f = _uniform(rng, 3, 30)
        x = 0.5 + 0.5 * np.sin(2 * math.pi * f * (xx * math.cos(a) + yy * math.sin(a)))
        if rng.random() < 0.5:
            x = (x > 0.5).astype(np.float32)
    elif kind == 1:  # checkerboard
        n = int(rng.integers(2, 17))
        x = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    else:  # circles
        x = np.full((size, size), _uniform(rng, 0, 0.4), np.float32)
        if rng.random() < 0.5:
            r = np.hypot(xx - _uniform(rng, 0.2, 0.8), yy - _uniform(rng, 0.2, 0.8))
            x = (np.sin(2 * math.pi * _uniform(rng, 4, 20) * r) > 0).astype(np.float32)
        else:
            for _ in range(int(rng.integers(3, 20))):
                c = (int(rng.integers(size)), int(rng.integers(size)))
                cv2.circle(
                    x,
                    c,
                    int(rng.integers(size // 20, size // 4)),
                    _uniform(rng, 0.3, 1.0),
                    -1 if rng.random() < 0.6 else max(1, size // 64),
                    cv2.LINE_AA,
                )
    lo, hi = sorted((_uniform(rng, 0, 0.4), _uniform(rng, 0.6, 1.0)))
    return (lo + (hi - lo) * x).astype(np.float32)


def _ood_flat(rng, size):
    """A featureless frame: blank exposure, unexposed plate or detector fault. Nothing in it is
    anatomy, so a guard must not serve a label for it; yet it has none of the structure (edges, texture)
    the other garbage kinds teach the garbage class."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), _uniform(rng, 0.03, 0.97), np.float32)
    # smooth gain variation: a heel-effect ramp and a vignette, a few per cent of the level
    a = _uniform(rng, 0, 2 * math.pi)
    img += _uniform(rng, -0.08, 0.08) * ((xx - 0.5) * math.cos(a) + (yy - 0.5) * math.sin(a))
    img -= _uniform(rng, 0, 0.1) * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    if rng.random() < 0.4:  # a collimator leaf: one side of a straight edge at another level
        b = _uniform(rng, 0, 2 * math.pi)
        side = (xx - 0.5) * math.cos(b) + (yy - 0.5) * math.sin(b) > _uniform(rng, 0.15, 0.45)
        img[side] = _uniform(rng, 0.0, 1.0)
    if rng.random() < 0.3:  # dead or hot detector lines
        for _ in range(int(rng.integers(1, 4))):
            i = int(rng.integers(size))
            line = img[i, :] if rng.random() < 0.5 else img[:, i]
            line[:] = _uniform(rng, 0.0, 1.0)
    beta = float(rng.choice([0.0, 0.0, 1.0]))  # white or slightly correlated quantum noise
    noise = _powerlaw_noise(rng, size, beta) - 0.5
    return img + _uniform(rng, 0.0, 0.08) * noise / max(float(noise.std()), 1e-6) * 0.5


def _xray_finish(att, rng, size):
    """Shared radiograph-like finishing for the other-anatomy phantoms."""
    img = _uniform(rng, 0.02, 0.1) + _uniform(rng, 0.8, 1.05) * att
    img = cv2.GaussianBlur(np.clip(img, 0, 1).astype(np.float32), (0, 0), _uniform(rng, 0.5, 1.4) * size / 256)
    img = np.power(img, np.float32(_uniform(rng, 0.75, 1.35)))
    counts = float(np.exp(rng.uniform(np.log(150), np.log(2500))))
    img = img + rng.standard_normal((size, size), dtype=np.float32) * np.sqrt(img / counts)
    return np.clip(img, 0, 1).astype(np.float32)


def _ood_knee(rng, size):
    """Knee AP radiograph phantom: femoral condyles, tibial plateau, fibula, patella."""
    tissue = np.zeros((size, size), np.float32)
    outer = np.zeros((size, size), np.uint8)
    inner = np.zeros((size, size), np.uint8)
    S = size
    cx = S * _uniform(rng, 0.42, 0.58)
    jy = S * _uniform(rng, 0.42, 0.55)  # joint line
    fw = S * _uniform(rng, 0.14, 0.2)  # femoral shaft half width... full width
    cv2.rectangle(tissue, (int(cx - S * 0.33), 0), (int(cx + S * 0.33), S), 1.0, -1)
    cv2.line(outer, (int(cx), 0), (int(cx), int(jy - fw * 0.6)), 255, int(fw))
    cv2.ellipse(outer, (int(cx - fw * 0.55), int(jy - fw * 0.45)), (int(fw * 0.6), int(fw * 0.45)), 0, 0, 360, 255, -1)
    cv2.ellipse(outer, (int(cx + fw * 0.55), int(jy - fw * 0.45)), (int(fw * 0.6), int(fw * 0.45)), 0, 0, 360, 255, -1)
    cv2.line(inner, (int(cx), 0), (int(cx), int(jy - fw)), 255, max(1, int(fw * 0.45)))
    ty = int(jy + S * 0.03)
    cv2.rectangle(outer, (int(cx - fw * 1.05), ty), (int(cx + fw * 1.05), int(ty + fw * 0.5)), 255, -1)
    cv2.line(outer, (int(cx), ty), (int(cx), S), 255, int(fw * 0.9))
    cv2.line(inner, (int(cx), ty + int(fw * 0.6)), (int(cx), S), 255, max(1, int(fw * 0.4)))
    fx = int(cx + fw * 1.0)
    cv2.line(outer, (fx, int(ty + fw * 0.3)), (fx + int(S * 0.02), S), 255, max(2, int(fw * 0.28)))
    pat = np.zeros((size, size), np.uint8)
    cv2.ellipse(pat, (int(cx), int(jy - fw * 0.7)), (int(fw * 0.45), int(fw * 0.55)), 0, 0, 360, 255, -1)
    att = 0.22 * cv2.GaussianBlur(tissue, (0, 0), 3) + 0.5 * (outer > 0) - 0.18 * (inner > 0) + 0.12 * (pat > 0)
    M = cv2.getRotationMatrix2D((S / 2, S / 2), _uniform(rng, -10, 10), _uniform(rng, 0.85, 1.1))
    att = cv2.warpAffine(att.astype(np.float32), M, (S, S))
    return _xray_finish(att, rng, size)


def _ood_chest(rng, size):
    """Chest PA radiograph phantom: dark lungs in a bright mediastinum, ribs, spine, heart, clavicles."""
    S = size
    body = np.zeros((S, S), np.float32)
    cv2.ellipse(body, (S // 2, int(S * 0.6)), (int(S * _uniform(rng, 0.42, 0.49)), int(S * 0.62)), 0, 0, 360, 1.0, -1)
    lungs = np.zeros((S, S), np.float32)
    lw, lh = S * _uniform(rng, 0.15, 0.19), S * _uniform(rng, 0.28, 0.34)
    for sgn in (-1, 1):
        cv2.ellipse(lungs, (int(S / 2 + sgn * S * 0.2), int(S * 0.5)), (int(lw), int(lh)), 0, 0, 360, 1.0, -1)
    bones = np.zeros((S, S), np.float32)
    # spine: vertebral column
    cv2.rectangle(bones, (int(S * 0.47), 0), (int(S * 0.53), S), 0.7, -1)
    for y in range(0, S, max(4, S // 18)):
        cv2.line(bones, (int(S * 0.46), y), (int(S * 0.54), y), 0.2, max(1, S // 128))
    # ribs: arcs on both sides
    n_ribs = int(rng.integers(9, 12))
    for i in range(n_ribs):
        y = int(S * (0.2 + 0.055 * i))
        for sgn in (-1, 1):
            cv2.ellipse(
                bones,
                (int(S / 2), y),
                (int(S * 0.38), int(S * 0.09)),
                0,
                200 if sgn < 0 else -20,
                340 if sgn < 0 else 160,
                0.5,
                max(1, S // 80),
            )
    for sgn in (-1, 1):  # clavicles
        cv2.line(bones, (S // 2, int(S * 0.17)), (int(S / 2 + sgn * S * 0.33), int(S * 0.12)), 0.7, max(2, S // 40))
    heart = np.zeros((S, S), np.float32)
    cv2.ellipse(
        heart, (int(S * 0.55), int(S * 0.66)), (int(S * _uniform(rng, 0.12, 0.18)), int(S * 0.13)), 20, 0, 360, 1.0, -1
    )
    att = (
        0.45 * cv2.GaussianBlur(body, (0, 0), 4)
        - 0.3 * cv2.GaussianBlur(lungs, (0, 0), 3)
        + 0.25 * bones
        + 0.25 * cv2.GaussianBlur(heart, (0, 0), 3)
    )
    att = cv2.GaussianBlur(att, (0, 0), 0.8)
    M = cv2.getRotationMatrix2D((S / 2, S / 2), _uniform(rng, -6, 6), _uniform(rng, 0.9, 1.1))
    att = cv2.warpAffine(np.clip(att, 0, 1).astype(np.float32), M, (S, S))
    return _xray_finish(att, rng, size)


def _ood_cropped_hand(rng, size):
    """A zoomed-in part of a hand (a few fingers, the wrist, an edge), as from a badly set crop."""
    ph = hand_phantom(int(rng.integers(len(CLASS_NAMES))), rng, size)
    c = int(size * _uniform(rng, 0.3, 0.5))
    ys, xs = np.nonzero(ph.masks["hand"])
    j = int(rng.integers(len(ys))) if len(ys) else 0
    cy, cx = (int(ys[j]), int(xs[j])) if len(ys) else (size // 2, size // 2)
    y0 = int(np.clip(cy - c // 2, 0, size - c))
    x0 = int(np.clip(cx - c // 2, 0, size - c))
    return cv2.resize(ph.image[y0 : y0 + c, x0 : x0 + c], (size, size), interpolation=cv2.INTER_LINEAR)


def _ood_rotated_hand(rng, size):
    h = hand_phantom(int(rng.integers(len(CLASS_NAMES))), rng, size).image
    return np.ascontiguousarray(np.rot90(h, int(rng.integers(1, 4))))


def _ood_inverted_hand(rng, size):
    return 1.0 - hand_phantom(int(rng.integers(len(CLASS_NAMES))), rng, size).image


def _ood_noisy_hand(rng, size):
    h = hand_phantom(int(rng.integers(len(CLASS_NAMES))), rng, size).image
    h = h + _uniform(rng, 0.25, 0.45) * rng.standard_normal((size, size), dtype=np.float32)
    sp = rng.random((size, size)) < _uniform(rng, 0.02, 0.1)  # salt and pepper
    h[sp] = (rng.random(int(sp.sum())) < 0.5).astype(np.float32)
    return np.clip(h, 0, 1)


def _ood_texture(rng, size):
    kind = int(rng.integers(3))
    base = _powerlaw_noise(rng, size, _uniform(rng, 2.2, 3.0))  # fractal, cloud/stone-like
    if kind == 0:
        return base
    warp = _powerlaw_noise(rng, size, 3.2)  # smooth turbulence for the grain
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == 1:  # wood: rings around an off-image centre, perturbed by fractal noise
        r = np.hypot(xx - _uniform(rng, -0.5, 1.5), (yy - _uniform(rng, -0.5, 1.5)) * 0.2)
        x = np.sin(2 * math.pi * (_uniform(rng, 8, 25) * r + 1.2 * warp))
    else:  # marble: veins from a sine of a turbulent coordinate
        x = np.sin(2 * math.pi * (_uniform(rng, 2, 6) * (xx + yy) + 2.0 * warp))
    x = _normalise(0.5 + 0.5 * x) * 0.8 + 0.2 * base  # fine grain on top
    return _normalise(x)


def _ood_photo(rng, size):
    S = size
    img = np.zeros((S, S), np.float32)
    horizon = int(S * _uniform(rng, 0.35, 0.7))
    sky = np.linspace(_uniform(rng, 0.5, 0.9), _uniform(rng, 0.7, 1.0), horizon, dtype=np.float32)
    img[:horizon] = sky[:, None]
    ground = np.linspace(_uniform(rng, 0.2, 0.5), _uniform(rng, 0.05, 0.35), S - horizon, dtype=np.float32)
    img[horizon:] = ground[:, None]
    if rng.random() < 0.6:  # sun
        cv2.circle(
            img,
            (int(rng.integers(S)), int(rng.integers(horizon // 3 + 1))),
            int(S * _uniform(rng, 0.04, 0.1)),
            1.0,
            -1,
            cv2.LINE_AA,
        )
    # hills
    xs = np.linspace(0, S, int(rng.integers(4, 9)))
    pts = [(0, horizon)] + [(int(x), int(horizon - rng.integers(0, max(2, S // 5)))) for x in xs] + [(S, horizon)]
    cv2.fillPoly(
        img, [np.array(pts + [(S, horizon + 2), (0, horizon + 2)], np.int32)], _uniform(rng, 0.2, 0.5), cv2.LINE_AA
    )
    # buildings / trees
    for _ in range(int(rng.integers(1, 7))):
        w, h = int(S * _uniform(rng, 0.04, 0.15)), int(S * _uniform(rng, 0.08, 0.35))
        x = int(rng.integers(0, S - w))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, horizon - h), (x + w, horizon + S // 40), _uniform(rng, 0.05, 0.6), -1)
        else:
            cv2.ellipse(
                img,
                (x + w // 2, horizon - h // 2),
                (w // 2 + 1, h // 2 + 1),
                0,
                0,
                360,
                _uniform(rng, 0.05, 0.4),
                -1,
                cv2.LINE_AA,
            )
    img = img + 0.08 * (_powerlaw_noise(rng, S, 2.0) - 0.5)
    img = cv2.GaussianBlur(img, (0, 0), _uniform(rng, 0.3, 1.2) * S / 256)
    img = img + 0.015 * rng.standard_normal((S, S), dtype=np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


_OOD = {
    "noise": _ood_noise,
    "blobs": _ood_blobs,
    "text": _ood_text,
    "geometric": _ood_geometric,
    "knee": _ood_knee,
    "cropped_hand": _ood_cropped_hand,
    "chest": _ood_chest,
    "rotated_hand": _ood_rotated_hand,
    "inverted_hand": _ood_inverted_hand,
    "noisy_hand": _ood_noisy_hand,
    "texture": _ood_texture,
    "photo": _ood_photo,
    "flat": _ood_flat,
}
assert set(_OOD) == set(OOD_KINDS)
# The seed salt of each kind, fixed once: a kind added later gets the next number, so that it changes
# no other kind's images (OOD_KINDS itself is ordered garbage-first, which a new garbage kind reorders).
_SALT = {kind: 1 + i for i, kind in enumerate(_OOD)}


def ood_image(kind: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """One off-distribution image of ``kind`` (see ``OOD_KINDS``): float32 ``size x size`` in [0, 1]."""
    try:
        fn = _OOD[kind]
    except KeyError:
        raise ValueError(f"unknown off-distribution kind {kind!r}; known: {', '.join(OOD_KINDS)}") from None
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    img = fn(rng, size)
    return np.clip(np.nan_to_num(img, nan=0.0), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# deterministic sets
def _child_rngs(seed: int, n: int, salt: int) -> list[np.random.Generator]:
    """One independent generator per image, so image i depends only on (seed, salt, i)."""
    ss = np.random.SeedSequence([int(seed), salt])
    return [np.random.default_rng(s) for s in ss.spawn(n)]


def iter_phantoms(n_per_class: int, seed: int, size: int = 256, *, acquisition: bool = True):
    """Yield the :class:`Phantom` objects of :func:`phantom_set` (same order, same pixels) with masks/params."""
    n_per_class = int(n_per_class)
    if n_per_class < 0:
        raise ValueError(f"n_per_class must be >= 0, got {n_per_class}")
    n = len(CLASS_NAMES) * n_per_class
    for i, rng in enumerate(_child_rngs(seed, n, 0)):
        yield hand_phantom(i // n_per_class, rng, size, acquisition=acquisition)


def phantom_set(n_per_class: int, seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``n_per_class`` phantoms of every stage, class-major: images ``[N, H, W]`` float32, labels ``[N]`` int64."""
    n = len(CLASS_NAMES) * int(n_per_class)
    images = np.empty((n, size, size), np.float32)
    labels = np.repeat(np.arange(len(CLASS_NAMES), dtype=np.int64), int(n_per_class))
    for i, ph in enumerate(iter_phantoms(n_per_class, seed, size)):
        images[i] = ph.image
    return images, labels


def resolve_kinds(kinds) -> list[str]:
    """``"all"``, ``"all-garbage"``/``"garbage"``, ``"all-held-out"``/``"held-out"``, a kind or a list of them."""
    if isinstance(kinds, str):
        kinds = [kinds]
    out: list[str] = []
    for k in kinds:
        if k == "all":
            out += OOD_KINDS
        elif k in ("all-garbage", "garbage"):
            out += GARBAGE_TRAIN_KINDS
        elif k in ("all-held-out", "held-out"):
            out += HELD_OUT_KINDS
        elif k in _OOD:
            out.append(k)
        else:
            raise ValueError(
                f"unknown off-distribution kind {k!r}; known: {', '.join(OOD_KINDS)} "
                "(or all, all-garbage, all-held-out)"
            )
    return list(dict.fromkeys(out))  # de-duplicated, order kept


def ood_set(kinds, n_per_kind: int, seed: int, size: int = 256) -> tuple[np.ndarray, list[str]]:
    """``n_per_kind`` images of every kind, kind-major: images ``[N, H, W]`` float32 and the kind of each."""
    kinds = resolve_kinds(kinds)
    images = np.empty((len(kinds) * int(n_per_kind), size, size), np.float32)
    names: list[str] = []
    for i, (kind, image) in enumerate(iter_ood(kinds, n_per_kind, seed, size)):
        images[i] = image
        names.append(kind)
    return images, names


def iter_ood(kinds, n_per_kind: int, seed: int, size: int = 256):
    """Yield ``(kind, image)`` pairs of :func:`ood_set` (same order, same pixels)."""
    n_per_kind = int(n_per_kind)
    if n_per_kind < 0:
        raise ValueError(f"n_per_kind must be >= 0, got {n_per_kind}")
    for kind in resolve_kinds(kinds):
        salt = _SALT[kind]
        for rng in _child_rngs(seed, n_per_kind, salt):
            yield kind, ood_image(kind, rng, size)
