"""`gamguard data`: generate the embedded demo data (hand/wrist radiograph phantoms, off-distribution images),
and write images as input files for third-party load generators (Triton's perf_analyzer)."""

from __future__ import annotations

import argparse

# Kept in sync with gamguard.runtime.demo.phantoms by a test; not imported here so --help stays light.
_GARBAGE = ("noise", "blobs", "text", "geometric", "knee", "cropped_hand", "flat")
_HELD_OUT = ("chest", "rotated_hand", "inverted_hand", "noisy_hand", "texture", "photo")

HELP = "generate demo data (hand radiograph phantoms, off-distribution images); perf_analyzer input files"
DESCRIPTION = f"""\
Generate the project's own demo data, procedurally (no download, no network).

  gamguard data synth --out DIR --per-class N --seed S
      hand/wrist radiograph phantoms, N per skeletal-maturity stage
      (infant, child, adolescent, adult), as DIR/<class>/NNNN.png plus DIR/manifest.json

  gamguard data synth --out DIR --per-class N --seed S --kind chest --kind photo
      off-distribution images instead, N per kind, as DIR/<kind>/NNNN.png

Kinds used to train the garbage class : {", ".join(_GARBAGE)}   (--kind all-garbage)
Held-out kinds, never trained on      : {", ".join(_HELD_OUT)}   (--kind all-held-out)

  gamguard data perf-input IMAGE_OR_FOLDER ... --out data.json
      the images as Triton perf_analyzer --input-data (gamguard's BYTES input `image`)

Examples:
  gamguard data synth --out /tmp/hands --per-class 100 --seed 0
  gamguard data synth --out /tmp/dcm --per-class 5 --seed 1 --format dicom --photometric MONOCHROME1
  gamguard data synth --out /tmp/ood --per-class 20 --seed 2 --kind all-held-out --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser(
        "synth",
        help="write phantoms (or off-distribution images) as an ImageFolder tree + manifest.json",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        required=True,
        help="output directory (must be empty or absent, or hold an earlier data synth dataset with --overwrite)",
    )
    p.add_argument(
        "--per-class", type=int, required=True, metavar="N", help="images per maturity stage (or per kind with --kind)"
    )
    p.add_argument("--seed", type=int, required=True, help="random seed; same seed, same images")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="off-distribution generator instead of hand phantoms (repeatable): one of "
        f"{', '.join(_GARBAGE + _HELD_OUT)}, or all, all-garbage, all-held-out",
    )
    p.add_argument(
        "--format",
        choices=("png", "dicom"),
        default="png",
        help="16-bit grayscale PNG (default) or DICOM DX (12 bits stored)",
    )
    p.add_argument(
        "--photometric",
        choices=("MONOCHROME2", "MONOCHROME1"),
        default="MONOCHROME2",
        help="DICOM photometric interpretation; MONOCHROME1 stores inverted values (dicom only)",
    )
    p.add_argument(
        "--masks",
        action="store_true",
        help="also write each phantom's masks as <class>/NNNN.masks.npz (hand phantoms only)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset that data synth wrote into --out before (its files are deleted first; a "
        "folder holding anything else is still refused)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")

    q = sub.add_parser(
        "perf-input",
        help="write images as Triton perf_analyzer --input-data JSON",
        description=PERF_INPUT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument(
        "paths",
        nargs="+",
        metavar="IMAGE_OR_FOLDER",
        help="image files (taken as they are) or folders (their image files, recursively, as `gamguard verify` "
        "finds them)",
    )
    q.add_argument("--out", required=True, metavar="FILE", help="the JSON file to write (replaced if it exists)")
    q.add_argument(
        "--limit",
        type=int,
        default=100,
        metavar="N",
        help="at most N images, the first in sorted order (default 100: perf_analyzer holds them all in memory)",
    )


PERF_INPUT_DESCRIPTION = """\
Write images as an --input-data file for Triton's perf_analyzer, so that it sends real images to
`gamguard serve` instead of random data (which the guard refuses). Each image becomes one step of
gamguard's `image` input (BYTES: the encoded file as it is), base64 of its length-prefixed raw form
as perf_analyzer expects for BYTES tensors. perf_analyzer cycles through the steps.

Example (bash scripts/get_perf_analyzer.sh fetches perf_analyzer into .cache/perf_analyzer):
  gamguard data synth --out /tmp/ph --per-class 4 --seed 0 --format dicom
  gamguard data perf-input /tmp/ph --out /tmp/ph.json
  gamguard serve --insecure --port 8001 &
  .cache/perf_analyzer/perf_analyzer -m gamguard-demo-hand -i grpc -u 127.0.0.1:8001 \\
      --input-data /tmp/ph.json --concurrency-range 1:16:5
"""


def run(args) -> int:
    from gamguard.runtime.cli import CommandError

    if args.data_command == "perf-input":
        return _perf_input(args)
    if args.data_command != "synth":  # pragma: no cover - argparse enforces the choice
        raise CommandError(f"unknown action {args.data_command!r}")
    return _synth(args)


def _perf_input(args) -> int:
    import json
    import sys
    from pathlib import Path

    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.datasets import DatasetError, iter_image_files
    from gamguard.runtime.perf_input import input_data

    if args.limit < 1:
        raise CommandError(f"--limit must be at least 1, got {args.limit}")
    out = Path(args.out)
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder; give the JSON file to write")
    try:
        files = iter_image_files(args.paths)
    except DatasetError as exc:
        raise CommandError(str(exc)) from exc
    taken = files[: args.limit]
    data = input_data(taken)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data))
    skipped = f" (the first {len(taken)} of {len(files)}: --limit)" if len(taken) < len(files) else ""
    print(
        f"wrote {len(taken)} image(s){skipped} to {out} as perf_analyzer input `image` (BYTES); run: "
        f"perf_analyzer -m MODEL -i grpc -u HOST:PORT --input-data {out}",
        file=sys.stderr,
    )
    return 0


def _synth(args) -> int:
    import json
    import sys

    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.demo import synth

    try:
        summary = synth.synth_dataset(
            args.out,
            per_class=args.per_class,
            seed=args.seed,
            size=args.size,
            kind=args.kind,
            fmt=args.format,
            photometric=args.photometric,
            masks=args.masks,
            overwrite=args.overwrite,
            progress=synth.stderr_progress("data synth"),
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"wrote {summary['total']} {args.format} images to {summary['out_dir']} "
            f"({', '.join(f'{k}: {v}' for k, v in summary['counts'].items())}) in {summary['seconds']} s; "
            f"manifest {summary['manifest']}",
            file=sys.stderr,
        )
    return 0
