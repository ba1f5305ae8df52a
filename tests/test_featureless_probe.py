"""scripts/featureless_probe.py: flat fields (blank exposures) through a bundle's guard, as documented in
docs/architecture.md "Known gaps"."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_bundle_rejects_every_flat_field():
    """The demo model's garbage class saw noise images: every flat field is rejected (a retrained demo model
    that let blank exposures through would fail here), and the count and reasons are printed."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "featureless_probe.py"), "--n", "20", "--seed", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    match = re.search(r"(\d+) of 20 flat fields rejected", done.stdout)
    assert match, done.stdout
    assert int(match.group(1)) == 20, done.stdout
    assert "GARBAGE_CLASS" in done.stdout and "accepted as" not in done.stdout


def test_flat_fields_are_featureless_and_seeded():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import featureless_probe
    finally:
        sys.path.remove(str(REPO / "scripts"))
    a = featureless_probe.flat_fields(4, seed=1)
    b = featureless_probe.flat_fields(4, seed=1)
    assert all((x == y).all() for x, y in zip(a, b))
    for im in a:
        assert im.shape == (256, 256) and 0.0 <= im.min() and im.max() <= 1.0
        assert im.std() < 0.05  # nothing in it but a faint gradient and noise
