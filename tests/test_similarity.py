"""The seven similarity measures: definitions against independent references (skimage, scipy,
POT), documented edge values, properties, and the batched form's equality with the per-pair one."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.stats import entropy, spearmanr

from gamguard.runtime import similarity as sim

G = sim.DEFAULT_GRID
FUNCS = {name: getattr(sim, name) for name in sim.MEASURES}
# The value each measure takes for two identical (non-constant) maps: its "most similar" end.
BEST = {
    "iou": 1.0,
    "dice": 1.0,
    "ssim": 1.0,
    "cosine": 1.0,
    "pearson": 1.0,
    "kl_divergence": 0.0,
    "sliced_wasserstein": 0.0,
}
SYMMETRIC = ("iou", "dice", "ssim", "cosine", "pearson", "sliced_wasserstein")


def smooth_map(rng, size=G, sigma=3.0):
    return gaussian_filter(rng.random((size, size)), sigma)


def blob(size=G, centre=(0.5, 0.5), sigma=0.06):
    """A Gaussian bump; centre and sigma in units of the image side."""
    c = (np.arange(size) + 0.5) / size
    ii, jj = np.meshgrid(c, c, indexing="ij")
    return np.exp(-((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2) / (2 * sigma**2))


def square(size=G, top=0, left=0, side=8):
    m = np.zeros((size, size))
    m[top : top + side, left : left + side] = 1.0
    return m


def exact_w1(a, b, grid=G):
    """Exact W1 between the prepared maps (the same masses the runtime uses), by POT."""
    ot = pytest.importorskip("ot")
    p = sim._mass(sim.prepare(a, grid)[None])[0]
    q = sim._mass(sim.prepare(b, grid)[None])[0]
    pts = sim.cell_centres(grid)
    return float(ot.emd2(p, q, ot.dist(pts, pts, metric="euclidean")))


# --- registry -------------------------------------------------------------------------------------
def test_measure_registry():
    assert sim.MEASURES == ("iou", "dice", "ssim", "cosine", "pearson", "kl_divergence", "sliced_wasserstein")
    assert set(sim.HIGHER_IS_SIMILAR) == set(sim.MEASURES)
    assert [n for n in sim.MEASURES if not sim.HIGHER_IS_SIMILAR[n]] == ["kl_divergence", "sliced_wasserstein"]


# --- prepare --------------------------------------------------------------------------------------
def test_prepare_area_resamples_then_normalises():
    rng = np.random.default_rng(0)
    m = rng.random((64, 64)) * 7 - 3
    got = sim.prepare(m)
    block_mean = m.reshape(32, 2, 32, 2).mean(axis=(1, 3))  # area interpolation for a 2x shrink
    ref = (block_mean - block_mean.min()) / (block_mean.max() - block_mean.min())
    np.testing.assert_allclose(got, ref, atol=1e-12)
    assert got.dtype == np.float64 and got.min() == 0.0 and got.max() == 1.0


def test_prepare_batch_equals_single_and_handles_constant_maps():
    rng = np.random.default_rng(1)
    batch = np.stack([rng.random((50, 70)), np.full((50, 70), 0.3), np.zeros((50, 70))]).astype(np.float32)
    out = sim.prepare(batch, grid=16)
    assert out.shape == (3, 16, 16)
    np.testing.assert_array_equal(out[0], sim.prepare(batch[0], grid=16))
    assert not out[1].any() and not out[2].any()  # constant -> all zeros
    up = sim.prepare(rng.random((8, 8)))  # small maps are upsampled
    assert up.shape == (G, G) and up.max() == 1.0
    ints = (rng.random((64, 64)) * 4000).astype(np.uint16)  # types OpenCV's resize lacks: cast
    np.testing.assert_allclose(sim.prepare(ints), sim.prepare(ints.astype(np.float64)), atol=1e-12)
    assert sim.prepare(ints.astype(np.int64)).max() == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(5),
        np.zeros((1, 2, 3, 4)),
        np.zeros((0, 4)),
        np.array([[0.0, np.nan], [1.0, 0.0]]),
        np.array([[np.inf, 0.0]]),
        np.array([[1e308, -1e308], [0.0, 0.0]]),
    ],
)
def test_prepare_rejects_bad_maps(bad):
    with pytest.raises(ValueError):
        sim.prepare(bad)


def test_grid_smaller_than_ssim_window_is_rejected():
    with pytest.raises(ValueError, match="grid"):
        sim.prepare(np.ones((20, 20)), grid=8)


# --- definitions against independent implementations ---------------------------------------------
def test_ssim_equals_skimage():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(2)
    for size_a, size_b, grid in [(32, 32, 32), (224, 32, 32), (64, 100, 24), (40, 40, 11)]:
        a, b = smooth_map(rng, size_a, 2.0), smooth_map(rng, size_b, 4.0)
        ref = structural_similarity(
            sim.prepare(a, grid),
            sim.prepare(b, grid),
            data_range=1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert sim.ssim(a, b, grid) == pytest.approx(ref, abs=1e-6)


def test_overlap_cosine_pearson_kl_match_reference_formulas():
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = smooth_map(rng), smooth_map(rng, 48, 5.0)
        x, y = sim.prepare(a).ravel(), sim.prepare(b).ravel()
        ma, mb = x >= 0.5, y >= 0.5
        assert sim.iou(a, b) == pytest.approx((ma & mb).sum() / (ma | mb).sum(), abs=1e-12)
        assert sim.dice(a, b) == pytest.approx(2 * (ma & mb).sum() / (ma.sum() + mb.sum()), abs=1e-12)
        assert sim.cosine(a, b) == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-12)
        assert sim.pearson(a, b) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
        assert sim.kl_divergence(a, b) == pytest.approx(entropy(x + 1e-8, y + 1e-8), abs=1e-10)


def test_pearson_of_inverted_map_is_minus_one():
    a = smooth_map(np.random.default_rng(4))
    assert sim.pearson(a, a.max() - a) == pytest.approx(-1.0, abs=1e-12)


# --- edge cases and properties --------------------------------------------------------------------
@pytest.mark.parametrize("name", sim.MEASURES)
def test_identical_maps_give_the_most_similar_value(name):
    rng = np.random.default_rng(5)
    for m in (smooth_map(rng), blob(48), square()):
        assert FUNCS[name](m, m) == pytest.approx(BEST[name], abs=1e-9)
        assert FUNCS[name](m, m * 3 + 1) == pytest.approx(BEST[name], abs=1e-9)  # min-max invariance


ZERO, CONST = np.zeros((G, G)), np.full((40, 40), 0.7)
# Documented values for degenerate pairs: (a, b, {measure: value, or a (low, high) range}).
EDGE_CASES = {
    "both_zero": (
        ZERO,
        ZERO,
        {
            "iou": 1.0,
            "dice": 1.0,
            "ssim": 1.0,
            "cosine": 0.0,
            "pearson": 0.0,
            "kl_divergence": 0.0,
            "sliced_wasserstein": 0.0,
        },
    ),
    "both_constant": (
        CONST,
        CONST * 2,
        {
            "iou": 1.0,
            "dice": 1.0,
            "ssim": 1.0,
            "cosine": 0.0,
            "pearson": 0.0,
            "kl_divergence": 0.0,
            "sliced_wasserstein": 0.0,
        },
    ),
    "zero_vs_blob": (
        ZERO,
        blob(),
        {
            "iou": 0.0,
            "dice": 0.0,
            "ssim": (-1.0, 0.9),
            "cosine": 0.0,
            "pearson": 0.0,
            "kl_divergence": (0.1, 30.0),
            "sliced_wasserstein": (0.1, 1.5),
        },
    ),
    "constant_vs_blob": (
        CONST,
        blob(),
        {
            "iou": 0.0,
            "dice": 0.0,
            "ssim": (-1.0, 0.9),
            "cosine": 0.0,
            "pearson": 0.0,
            "kl_divergence": (0.1, 30.0),
            "sliced_wasserstein": (0.1, 1.5),
        },
    ),
    "disjoint": (
        square(top=0, left=0),
        square(top=24, left=24),
        {
            "iou": 0.0,
            "dice": 0.0,
            "ssim": (-1.0, 0.9),
            "cosine": 0.0,
            "pearson": (-1.0, 0.0),
            "kl_divergence": (10.0, 30.0),
            "sliced_wasserstein": (1.04, 1.08),
        },
    ),  # shift 24/32 * sqrt 2
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_degenerate_pairs_have_documented_finite_values(case):
    a, b, expected = EDGE_CASES[case]
    got = sim.batch_scores(a[None], b)
    for name in sim.MEASURES:
        value = FUNCS[name](a, b)
        assert np.isfinite(value), (case, name)
        assert got[name][0] == pytest.approx(value, abs=1e-12)
        want = expected[name]
        if isinstance(want, tuple):
            assert want[0] <= value <= want[1], (case, name, value)
        else:
            assert value == pytest.approx(want, abs=1e-9), (case, name, value)


def test_ranges_on_random_pairs():
    rng = np.random.default_rng(10)
    a = np.stack([smooth_map(rng, 40, s) for s in rng.uniform(0.5, 6.0, 16)])
    b = np.stack([smooth_map(rng, 32, s) for s in rng.uniform(0.5, 6.0, 16)])
    got = sim.batch_scores(a, b)
    for name, (lo, hi) in {
        "iou": (0, 1),
        "dice": (0, 1),
        "cosine": (0, 1),
        "ssim": (-1, 1),
        "pearson": (-1, 1),
        "kl_divergence": (0, 30),
        "sliced_wasserstein": (0, 2**0.5),
    }.items():
        assert np.all((got[name] >= lo) & (got[name] <= hi)), name
        assert np.ptp(got[name]) > 0, name  # the scores do discriminate
    np.testing.assert_allclose(got["dice"], 2 * got["iou"] / (1 + got["iou"]), atol=1e-12)


def test_symmetry_and_kl_asymmetry():
    rng = np.random.default_rng(6)
    a, b = smooth_map(rng), blob(64, (0.3, 0.6), 0.1)
    for name in SYMMETRIC:
        assert FUNCS[name](a, b) == pytest.approx(FUNCS[name](b, a), abs=1e-9), name
    narrow, wide = blob(sigma=0.05), blob(sigma=0.2)
    assert abs(sim.kl_divergence(narrow, wide) - sim.kl_divergence(wide, narrow)) > 0.1


def test_scores_order_a_growing_shift():
    """Every measure moves towards 'less similar' as a blob drifts away from the reference."""
    ref = blob(centre=(0.5, 0.5), sigma=0.08)
    shifted = np.stack([blob(centre=(0.5, 0.5 + d), sigma=0.08) for d in (0.0, 0.05, 0.15, 0.3)])
    scores = sim.batch_scores(shifted, ref)
    for name in sim.MEASURES:
        seq = scores[name] if sim.HIGHER_IS_SIMILAR[name] else -scores[name]
        assert np.all(np.diff(seq) <= 1e-12) and seq[0] > seq[-1], (name, scores[name])


# --- batched form ---------------------------------------------------------------------------------
def test_batch_scores_equal_the_per_pair_functions():
    rng = np.random.default_rng(7)
    a = np.stack([smooth_map(rng, 56, s) for s in (1.0, 2.0, 3.0, 5.0)] + [np.zeros((56, 56))])
    refs = np.stack([smooth_map(rng, 32, 3.0) for _ in range(5)])
    for b in (refs, refs[0]):  # one reference each, or broadcast
        got = sim.batch_scores(a.astype(np.float32), b)
        assert set(got) == set(sim.MEASURES)
        for name in sim.MEASURES:
            assert got[name].shape == (5,) and got[name].dtype == np.float64
            want = [FUNCS[name](a[i].astype(np.float32), b if b.ndim == 2 else b[i]) for i in range(5)]
            np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12, err_msg=name)


def test_batch_scores_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        sim.batch_scores(np.zeros((3, 32, 32)), np.zeros((2, 32, 32)))
    with pytest.raises(ValueError):
        sim.batch_scores(np.zeros((3, 32, 32)), np.zeros(32))
    with pytest.raises(ValueError):
        sim.iou(np.zeros((2, 32, 32)), np.zeros((32, 32)))


# --- the exact Wasserstein (served offline) and the sliced one (served) against POT's exact EMD ------
def test_exact_wasserstein_equals_pot_emd2_on_the_grid():
    """``wasserstein`` is exact: POT's emd2 with an independently built cost matrix, and known transports."""
    rng = np.random.default_rng(11)
    for _ in range(3):
        a, b = smooth_map(rng, G, rng.uniform(1.0, 5.0)), smooth_map(rng, 48, rng.uniform(1.0, 6.0))
        assert sim.wasserstein(a, b) == pytest.approx(exact_w1(a, b), rel=1e-9)
    a, b = np.zeros((G, G)), np.zeros((G, G))
    a[4, 5], b[13, 17] = 1.0, 1.0  # moved by (9, 12) cells = 15/32
    assert sim.wasserstein(a, b) == pytest.approx(15 / 32, rel=1e-9)
    assert sim.wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)


def test_served_transport_measure_is_named_for_what_it_computes():
    """The served measure is the sliced approximation and says so; ``wasserstein`` (exact) is not served."""
    assert "sliced_wasserstein" in sim.MEASURES and "wasserstein" not in sim.MEASURES
    assert "sliced" in sim.sliced_wasserstein.__doc__.lower()


def test_sliced_wasserstein_point_mass_moved_by_known_distance():
    a = np.zeros((G, G))
    b = np.zeros((G, G))
    a[4, 5] = 1.0
    b[4 + 9, 5 + 12] = 1.0  # moved by (9, 12) cells = 15/32
    assert exact_w1(a, b) == pytest.approx(15 / 32, rel=1e-9)
    assert sim.sliced_wasserstein(a, b) == pytest.approx(15 / 32, rel=0.01)
    c = np.zeros((G, G))
    c[4, 5 + 20] = 1.0  # axis-aligned move of 20/32
    assert sim.sliced_wasserstein(a, c) == pytest.approx(20 / 32, rel=0.01)


def test_sliced_wasserstein_matches_exact_emd_for_shifted_blobs():
    rng = np.random.default_rng(8)
    exact, approx = [], []
    for _ in range(6):
        c0 = rng.uniform(0.3, 0.7, 2)
        off = rng.uniform(-0.25, 0.25, 2)
        sigma = rng.uniform(0.04, 0.1)
        a, b = blob(centre=c0, sigma=sigma), blob(centre=c0 + off, sigma=sigma)
        e, w = exact_w1(a, b), sim.sliced_wasserstein(a, b)
        exact.append(e)
        approx.append(w)
        assert w == pytest.approx(e, rel=0.02), (c0, off, sigma)
    assert spearmanr(exact, approx)[0] > 0.95


def test_sliced_wasserstein_error_bounds_on_random_smooth_maps():
    """Sliced W1 is a lower bound that loosens for diffuse maps; bound the error and the ranking."""
    rng = np.random.default_rng(9)
    exact, approx = [], []
    for _ in range(12):  # ot.emd2 on 1024 points: ~0.2 s each
        a = smooth_map(rng, G, rng.uniform(1.0, 5.0))
        b = smooth_map(rng, 48, rng.uniform(1.0, 6.0))
        exact.append(exact_w1(a, b))
        approx.append(sim.sliced_wasserstein(a, b))
    rel = np.array(approx) / np.array(exact) - 1.0
    assert rel.min() > -0.5 and rel.max() < 0.01, (rel.min(), rel.max())
    assert np.median(rel) > -0.25, np.median(rel)
    assert spearmanr(exact, approx)[0] > 0.9


# --- benchmark entry point ------------------------------------------------------------------------
def test_bench_entry_point_reports_per_image_cost(capsys):
    assert sim.main(["--bench", "--repeats", "5", "--size", "64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["per_image_us"]) == {"N=1", "N=8"}
    assert all(v > 0 for v in out["per_image_us"].values())
