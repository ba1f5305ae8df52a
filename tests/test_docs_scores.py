"""The score names the guard serves are the ones docs/architecture.md documents (and vice versa)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def documented_scores() -> list[str]:
    text = DOC.read_text()
    section = text.split("### Served scores", 1)[1].split("###", 1)[0]
    listing = section.split("\n\n")[2]  # heading, prose, then the list of names
    return re.findall(r"`([^`]+)`", listing)


def test_served_score_names_match_the_documentation(demo_bundle):
    import numpy as np

    from gamguard.runtime.guard import Guard

    documented = documented_scores()
    assert "attention.sliced_wasserstein" in documented and "attention.wasserstein" not in documented
    for policy, expected in (("calibrated", documented), ("strict", documented[:-1])):
        guard = Guard.from_bundle(demo_bundle, threads=1, policy=policy)
        x = np.random.default_rng(0).random((1, guard.spec.channels, guard.spec.height, guard.spec.width))
        (verdict,) = guard.verify_tensor(x.astype(np.float32))
        assert list(verdict.scores) == expected, policy
        assert set(verdict.thresholds) <= set(verdict.scores) - {"garbage_prob"}
