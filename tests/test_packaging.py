"""The wheel holds exactly what the tests import: every module and data file of the three source folders,
under the one import package ``gamguard``, and nothing generic at the top of site-packages.

The tests themselves import the checkout (pytest runs from the repository root), so only building the
wheel can show a subpackage or data file that packaging would leave out.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"exporter": "gamguard/exporter", "runtime": "gamguard/runtime", "proto": "gamguard/proto"}
#: data files that must ship beside the code (the embedded demo, the .proto sources)
DATA_SUFFIXES = (".json", ".onnx", ".npz", ".ckpt", ".proto")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (wheel,) = out.glob("gamguard-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def _tracked(folder: str) -> list[str]:
    run = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip("not a git checkout")
    return [f for f in run.stdout.splitlines() if f.endswith((".py", *DATA_SUFFIXES))]


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_every_tracked_module_and_data_file_is_in_the_wheel(wheel_names, folder):
    files = _tracked(folder)
    assert files, f"no tracked files under {folder}/"
    missing = [f for f in files if FOLDERS[folder] + f[len(folder) :] not in wheel_names]
    assert not missing, f"left out of the wheel: {missing}"


def test_nothing_generic_at_the_top_of_site_packages(wheel_names):
    tops = {name.split("/")[0] for name in wheel_names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"gamguard"}
