"""The ``gamguard`` command line: one console script, one module per subcommand.

Each subcommand lives in ``gamguard.runtime.commands.<name>`` and exposes

* ``HELP`` – a one-line summary shown by ``gamguard --help``;
* ``add_arguments(parser)`` – its flags (module import must stay light: no torch,
  no onnxruntime at import time, so ``--help`` is instant and works without extras);
* ``run(args) -> int`` – the work; heavy imports happen here.

Exporter subcommands (``train``, ``export``) import torch lazily through
:func:`require_export_extra`, which explains how to install it when it is missing.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from gamguard.runtime import package_version

# Order is the order shown in --help.
COMMANDS = (
    "demo",
    "data",
    "train",
    "export",
    "build-engine",
    "calibrate",
    "sign",
    "verify",
    "suitability",
    "drift",
    "serve",
    "dicom-node",
    "predict",
    "bench",
    "evaluate",
)


class CommandError(Exception):
    """A user-facing error: printed as ``gamguard: error: ...`` with exit status 2, no traceback."""


def require_export_extra():
    """Import torch for an exporter command, or fail with install instructions."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CommandError(
            "this command needs the exporter extra (torch, onnx, onnxscript): "
            "pip install 'gamguard[export]'  (on a CPU-only machine install torch first, "
            "e.g. pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu)"
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gamguard",
        description=(
            "Guarded inference for X-ray classifiers: a prediction is served only after the input "
            "passes a garbage-class check, a Grad-CAM attention check and an early-feature check "
            "calibrated on in-distribution data."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    parser.add_argument("--version", action="version", version=f"gamguard {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"gamguard.runtime.commands.{name.replace('-', '_')}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args._module.run(args) or 0)
    except CommandError as exc:
        print(f"gamguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    # Run the installed module's main so CommandError is the class the commands raise
    # (as __main__, this file's classes are distinct objects from gamguard.runtime.cli's).
    from gamguard.runtime.cli import main as _main

    sys.exit(_main())
