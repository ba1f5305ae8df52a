"""`gamguard verify`: run the guarded model over image files, offline."""

from __future__ import annotations

HELP = "verify image files offline: guarded prediction or rejection with reasons, per file"
DESCRIPTION = """\
Decodes each file (PNG, JPEG, 16-bit PNG, DICOM; directories are searched for images), runs the
bundle's engine and guard, and prints one verdict per input.

With --json: one JSON object per input per line on stdout, with file, accepted, label and
label_index (null when rejected), probabilities (null when rejected), reasons, failed_measures,
scores, thresholds, detail and timings_ms. A rejected input carries no label, index or probabilities.
Without --json: a readable table (prob = the accepted label's probability).

Undecodable files give an INVALID_INPUT verdict, not a crash. Exit status: 0 when every input got a
verdict (accepted or rejected); 1 with --fail-on-reject when any input was rejected; 2 for usage or
bundle errors (uncalibrated or modified bundle) and when a path given does not exist (the others are
still verified).

--overlays DIR writes <file stem>.overlay.png per input (<folder>-<stem>-<extension>.overlay.png when
two inputs share a stem): the X-ray with its Grad-CAM blended in colour, and the predicted class's
reference map beside it.

examples:
  gamguard verify hand.png
  gamguard verify --bundle out/bundle --json --overlays ov/ scans/
  gamguard verify --checks garbage,feature --policy strict study.dcm
"""

BATCH = 32


def add_arguments(parser):
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR", help="image files or directories")
    parser.add_argument("--bundle", metavar="DIR", help="bundle directory (default: the embedded demo bundle)")
    parser.add_argument("--json", action="store_true", help="one JSON object per input per line on stdout")
    parser.add_argument("--overlays", metavar="DIR", help="write heatmap overlays (PNG) into DIR")
    parser.add_argument("--policy", choices=("calibrated", "strict"), help="override the bundle's guard policy")
    parser.add_argument(
        "--checks",
        metavar="LIST",
        help="enforced checks, comma-separated subset of garbage,attention,feature (or 'all')",
    )
    parser.add_argument("--providers", help="ONNX Runtime providers, e.g. cuda,cpu (default: TensorRT→CUDA→CPU)")
    parser.add_argument(
        "--threads",
        type=int,
        help="engine intra-op threads (default: env GAMGUARD_THREADS, else ONNX Runtime's: all cores)",
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "onnxruntime", "tensorrt"),
        default="auto",
        help="engine choice (default auto: native TensorRT plan when usable)",
    )
    parser.add_argument("--fail-on-reject", action="store_true", help="exit 1 when any input is rejected")
    parser.add_argument(
        "--frame",
        type=int,
        metavar="N",
        help="frame of multi-frame DICOM inputs to verify (0-based; required for such files)",
    )


def expand_paths(paths) -> list:
    """Files as given; directories searched recursively for image files (sorted)."""
    from pathlib import Path

    from gamguard.runtime.datasets import iter_image_files

    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(iter_image_files([p])))
        else:
            out.append(p)  # missing/undecodable files become INVALID_INPUT verdicts
    return out


def _row(name, v, class_names) -> str:
    if v.accepted:
        conf = max(v.probabilities.values()) if v.probabilities else float("nan")
        return f"{name:<40} ACCEPT  {v.label:<12} prob={conf:.3f}"
    why = ",".join(v.reasons)
    if v.failed_measures:
        why += f" [{','.join(v.failed_measures)}]"
    extra = f"  ({v.detail})" if v.reasons and v.reasons[0] in ("INVALID_INPUT", "GUARD_ERROR") else ""
    return f"{name:<40} REJECT  {'-':<12} {why}{extra}"


def run(args):
    import json
    import sys
    from pathlib import Path

    from gamguard.runtime.bundle import BundleError
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.guard import Guard

    try:
        guard = Guard.from_bundle(
            args.bundle,
            providers=args.providers,
            threads=args.threads,
            policy=args.policy,
            enforced_checks=args.checks,
            prefer=args.engine,
        )
    except (BundleError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from exc
    try:
        files = expand_paths(args.paths)
    except ValueError as exc:  # DatasetError: a folder without images
        raise CommandError(str(exc)) from exc
    if not files:
        raise CommandError("no image files found in the given paths")
    missing = [str(p) for p in args.paths if not Path(p).exists()]
    overlay_dir = Path(args.overlays) if args.overlays else None
    rejected = 0
    if not args.json:
        print(
            f"bundle {guard.bundle_dir} ({guard.bundle_hash[:12]}), policy {guard.policy}, "
            f"checks {guard.enforced_checks}, alpha {guard.alpha}"
        )
    used_names: set[str] = set()
    for start in range(0, len(files), BATCH):
        chunk = files[start : start + BATCH]
        for f, (pixels, v) in zip(chunk, guard.verify_files(chunk, frame=args.frame)):
            rejected += not v.accepted
            name = str(f)
            if overlay_dir is not None and v.cam is not None:
                from gamguard.runtime.overlays import overlay_path, write_overlay

                target = overlay_path(overlay_dir, f, used_names)
                title = f"{Path(f).parent.name}/{Path(f).name}" if Path(f).parent.name else Path(f).name
                write_overlay(target, pixels, v, guard.class_names, title=title)
            if args.json:
                # to_dict carries no class for a rejected input (label null, no argmax): never a prediction
                print(json.dumps({"file": name, **v.to_dict()}), flush=True)
            else:
                print(_row(name, v, guard.class_names), flush=True)
    if not args.json:
        print(f"{len(files)} input(s): {len(files) - rejected} accepted, {rejected} rejected", file=sys.stderr)
    if missing:
        print(f"error: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    return 1 if (args.fail_on_reject and rejected) else 0
