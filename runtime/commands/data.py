"""`gamguard data`: generate the embedded demo data (hand/wrist radiograph phantoms, off-distribution images)."""

from __future__ import annotations

import argparse

# Kept in sync with gamguard.runtime.demo.phantoms by a test; not imported here so --help stays light.
_GARBAGE = ("noise", "blobs", "text", "geometric", "knee", "cropped_hand", "flat")
_HELD_OUT = ("chest", "rotated_hand", "inverted_hand", "noisy_hand", "texture", "photo")

HELP = "generate demo data: hand radiograph phantoms or off-distribution images"
DESCRIPTION = f"""\
Generate the project's own demo data, procedurally (no download, no network).

  gamguard data synth --out DIR --per-class N --seed S
      hand/wrist radiograph phantoms, N per skeletal-maturity stage
      (infant, child, adolescent, adult), as DIR/<class>/NNNN.png plus DIR/manifest.json

  gamguard data synth --out DIR --per-class N --seed S --kind chest --kind photo
      off-distribution images instead, N per kind, as DIR/<kind>/NNNN.png

Kinds used to train the garbage class : {", ".join(_GARBAGE)}   (--kind all-garbage)
Held-out kinds, never trained on      : {", ".join(_HELD_OUT)}   (--kind all-held-out)

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


def run(args) -> int:
    import json
    import sys

    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.demo import synth

    if args.data_command != "synth":  # pragma: no cover - argparse enforces the choice
        raise CommandError(f"unknown action {args.data_command!r}")
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
