"""Check a GPU install: exactly one onnxruntime distribution, with the GPU execution providers.

``onnxruntime`` and ``onnxruntime-gpu`` both install the same ``onnxruntime`` import package; with
both present, whichever was installed last wins file by file and the result is undefined. The GPU
container images swap the CPU distribution out and run ``python -m gamguard.runtime.engines.packaging``
as the last build step, so a broken swap fails the build instead of a clinic's first request.

Exit status 0 when the install is sound; 1 with one line per problem otherwise. ``--allow-cpu``
accepts the plain CPU ``onnxruntime`` (for CPU images and the test suite).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

ORT_DISTRIBUTIONS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
)
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def onnxruntime_distributions() -> dict[str, str]:
    """Installed distributions that provide the ``onnxruntime`` import package: name → version."""
    found = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def problems(
    *, allow_cpu: bool = False, distributions: dict[str, str] | None = None, providers: list[str] | None = None
) -> list[str]:
    """What is wrong with this install (empty list: nothing)."""
    dists = onnxruntime_distributions() if distributions is None else distributions
    out = []
    if not dists:
        out.append("no onnxruntime distribution is installed")
    elif len(dists) > 1:
        out.append(
            "more than one onnxruntime distribution is installed ("
            + ", ".join(f"{k} {v}" for k, v in sorted(dists.items()))
            + "): uninstall all but one and reinstall it with --force-reinstall"
        )
    if providers is None:
        try:
            import onnxruntime as ort

            providers = list(ort.get_available_providers())
        except ImportError as exc:
            out.append(f"onnxruntime does not import: {exc}")
            providers = []
    if not allow_cpu and not any(p in providers for p in GPU_PROVIDERS):
        out.append(f"onnxruntime offers no GPU execution provider (has {providers}); install onnxruntime-gpu")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gamguard.runtime.engines.packaging", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--allow-cpu", action="store_true", help="accept the CPU-only onnxruntime")
    args = parser.parse_args(argv)
    found = problems(allow_cpu=args.allow_cpu)
    for line in found:
        print(f"gpu_packaging: {line}", file=sys.stderr)
    if not found:
        print(
            "gpu_packaging: ok: " + ", ".join(f"{k} {v}" for k, v in onnxruntime_distributions().items()),
            file=sys.stderr,
        )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
