"""Baseline OOD scores against independent computations."""

import numpy as np
from scipy.spatial.distance import mahalanobis

from gamguard.runtime import ood_baselines as ob


def test_logit_scores_match_definitions():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20, 3)) * 3
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(ob.msp_score(z), 1 - p.max(1), rtol=1e-12)
    np.testing.assert_allclose(ob.energy_score(z), -np.log(np.exp(z).sum(1)), rtol=1e-12)
    np.testing.assert_allclose(ob.max_logit_score(z), -z.max(1))
    # a confident input scores lower (more in-distribution) than a flat one on every logit score
    conf, flat = np.array([[10.0, 0.0, 0.0]]), np.array([[0.1, 0.0, 0.05]])
    for fn in (ob.msp_score, ob.energy_score, ob.max_logit_score):
        assert fn(conf)[0] < fn(flat)[0]


def test_mahalanobis_matches_scipy_and_separates():
    rng = np.random.default_rng(1)
    a = rng.normal([0, 0, 0], 1.0, size=(300, 3))
    b = rng.normal([5, 0, 0], 1.0, size=(300, 3))
    x = np.concatenate([a, b])
    y = np.r_[np.zeros(300), np.ones(300)]
    det = ob.MahalanobisDetector.fit(x, y, shrinkage=0.0)
    q = rng.normal(size=(5, 3)) * 4
    vi = det.precision
    expected = [min(mahalanobis(v, m, vi) ** 2 for m in det.means) for v in q]
    np.testing.assert_allclose(det.score(q), expected, rtol=1e-9)
    far = np.array([[2.5, 20.0, 0.0]])
    assert det.score(far)[0] > np.percentile(det.score(x), 99)
