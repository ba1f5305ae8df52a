"""The package layout and the CLI's contract with its subcommand modules."""

import subprocess
import sys

from gamguard.runtime import cli


def test_every_subcommand_has_help():
    parser = cli.build_parser()
    for name in cli.COMMANDS:
        out = subprocess.run(
            [sys.executable, "-m", "gamguard.runtime.cli", name, "--help"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        assert f"gamguard {name}" in out.stdout
    assert parser.prog == "gamguard"


def test_runtime_does_not_import_torch():
    code = (
        "import sys, importlib, pkgutil, gamguard.runtime as r\n"
        "for m in pkgutil.walk_packages(r.__path__, 'gamguard.runtime.'):\n"
        "    importlib.import_module(m.name)\n"
        "import gamguard.runtime.cli as c; c.build_parser()\n"
        "assert 'torch' not in sys.modules, 'runtime imported torch'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
