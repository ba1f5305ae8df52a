"""`gamguard build-engine`: build a native TensorRT engine (model.plan) on the target device."""

from __future__ import annotations

HELP = "build a native TensorRT engine (model.plan) for a bundle on this GPU; check its drift"
DESCRIPTION = """\
Build model.plan from the bundle's fused model.onnx with the TensorRT Python API, on the device that
will serve it (a TensorRT engine only runs on the TensorRT version and GPU architecture it was built
for; both are recorded in bundle.json and checked when the engine is loaded). Needs TensorRT 10 and
cuda-python: pip install 'gamguard[gpu]' on x86-64, JetPack's TensorRT on a Jetson.

The batch axis gets an optimisation profile MIN:OPT:MAX; height and width stay fixed at the bundle's
input size unless the model was exported with dynamic spatial axes and --spatial gives a range.

--guard-graph builds the plan from the fused model with the guard's arithmetic appended (the seven
measures, the feature score and their p-values against the calibrated tables; see
runtime/checks/graph.py), so the checks run on the GPU as well and the host reads a few numbers per
image. The plan then belongs to this calibration: recalibrating makes it stale (it is refused and
must be rebuilt; --alpha re-derivations do not).

--check-drift DIR runs the TensorRT engine and ONNX Runtime FP32 (CPU) over in-distribution images in
DIR (PNG/JPEG/DICOM, searched recursively; use images not used to build the references) and reports
how far logits, CAM and early features drift, and whether the calibrated false-rejection rate still
holds on the TensorRT engine.

examples:
  gamguard build-engine --bundle bundles/wrist --fp16
  gamguard build-engine --bundle /ro/bundle --out /var/lib/gamguard/bundle --fp16 --batch 1:8:32
  gamguard build-engine --bundle bundles/wrist --fp16 --guard-graph --check-drift data/calib --json
  gamguard build-engine --bundle bundles/wrist --no-build --check-drift data/calib --json
"""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def add_arguments(parser):
    parser.add_argument("--bundle", metavar="DIR", help="bundle directory (default: the embedded demo bundle)")
    parser.add_argument("--fp16", action="store_true", help="build an FP16 engine (default FP32)")
    parser.add_argument(
        "--batch",
        default="1:8:32",
        metavar="MIN:OPT:MAX",
        help="batch sizes of the optimisation profile (default 1:8:32; 'N' means 1:N:N)",
    )
    parser.add_argument(
        "--spatial", metavar="MIN:MAX", help="side-length range for a model exported with dynamic height/width"
    )
    parser.add_argument(
        "--workspace-mb", type=int, default=1024, metavar="MB", help="TensorRT builder workspace limit (default 1024)"
    )
    parser.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    parser.add_argument(
        "--guard-graph",
        action="store_true",
        help="also put the guard's arithmetic (measures, feature score, p-values) in the plan "
        "(needs a calibrated bundle)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="write a copy of the bundle with the plan here instead of modifying --bundle"
    )
    parser.add_argument(
        "--no-build", action="store_true", help="do not build; only run --check-drift on the bundle's existing plan"
    )
    parser.add_argument(
        "--check-drift", metavar="DIR", help="in-distribution images to measure TensorRT vs ONNX Runtime FP32 drift on"
    )
    parser.add_argument("--max-images", type=int, default=512, help="cap for --check-drift (default 512)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _validated(args):
    """Turn flags into build parameters, failing with a clear message (no GPU needed)."""
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.engines.plan import parse_batch_range, parse_spatial_range

    try:
        batch = parse_batch_range(args.batch)
        spatial = parse_spatial_range(args.spatial) if args.spatial else None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    if args.workspace_mb < 64:
        raise CommandError("--workspace-mb must be at least 64")
    if args.no_build and not args.check_drift:
        raise CommandError("--no-build only makes sense with --check-drift DIR")
    if args.no_build and args.out:
        raise CommandError("--out builds a new bundle; it cannot be combined with --no-build")
    if args.max_images < 1:
        raise CommandError("--max-images must be positive")
    return batch, spatial


def _image_paths(root, limit: int):
    from pathlib import Path

    from gamguard.runtime.cli import CommandError

    root = Path(root)
    if not root.is_dir():
        raise CommandError(f"--check-drift {root}: not a directory")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise CommandError(f"--check-drift {root}: no PNG/JPEG/DICOM images found")
    return paths[:limit]


def _batches(paths, spec, batch_size: int):
    import numpy as np

    from gamguard.runtime.decode import decode_file
    from gamguard.runtime.preprocess import preprocess

    for i in range(0, len(paths), batch_size):
        yield np.stack([preprocess(decode_file(p).pixels, spec) for p in paths[i : i + batch_size]])


def run(args):
    import json
    import logging
    import sys
    from pathlib import Path

    from gamguard.runtime.bundle import MODEL_FILE, BundleError, InputSpec, load_manifest, resolve_bundle
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.engines.plan import PlanMismatch, TensorRTUnavailable, build_engine_for_bundle
    from gamguard.runtime.preprocess import InvalidInput

    log = logging.getLogger("gamguard.build_engine")
    batch, spatial = _validated(args)
    if not args.no_build and not args.out and not args.bundle:
        raise CommandError(
            "build-engine writes model.plan into the bundle: pass --bundle DIR, or --out DIR for "
            "a copy (the embedded demo bundle is never modified in place)"
        )
    bundle_dir = resolve_bundle(args.bundle)
    result: dict = {"bundle": str(bundle_dir)}
    try:
        if not args.no_build:
            section = build_engine_for_bundle(
                bundle_dir,
                precision="fp16" if args.fp16 else "fp32",
                batch=batch,
                spatial=spatial,
                workspace_mb=args.workspace_mb,
                out_dir=args.out,
                device=args.device,
                guard_graph=args.guard_graph,
            )
            bundle_dir = Path(args.out) if args.out else bundle_dir
            result.update(bundle=str(bundle_dir), tensorrt=section)
            log.info(
                "wrote %s/model.plan (%s, TensorRT %s, %s sm %s)",
                bundle_dir,
                section["precision"],
                section["tensorrt_version"],
                section["gpu"],
                section["compute_capability"],
            )
        if args.check_drift:
            from gamguard.runtime.engines.drift import OrtCpuReference, drift_report, guard_decider
            from gamguard.runtime.engines.tensorrt import TensorRTEngine

            manifest = load_manifest(bundle_dir, require_calibration=False)
            spec = InputSpec.from_manifest(manifest["input"])
            paths = _image_paths(args.check_drift, args.max_images)
            trt_engine = TensorRTEngine(bundle_dir, manifest, device=args.device)
            try:  # the engine holds GPU memory and a CUDA context: release it even if the check fails
                reference = OrtCpuReference(bundle_dir / MODEL_FILE)
                decide, alpha = (None, None)
                if manifest.get("calibration"):
                    decide, alpha = guard_decider(bundle_dir, manifest)
                else:
                    log.warning("the bundle is not calibrated: reporting drift only, no false-rejection rate")
                report = drift_report(
                    reference,
                    trt_engine,
                    _batches(paths, spec, min(trt_engine.max_batch, 32)),
                    decide=decide,
                    alpha=alpha,
                    calibrated_frr=(manifest.get("calibration") or {}).get("measured_false_rejection_rate"),
                )
            finally:
                trt_engine.close()
            result["check"] = {"images": str(args.check_drift), **report}
    except (TensorRTUnavailable, PlanMismatch, BundleError, InvalidInput) as exc:
        raise CommandError(str(exc)) from None

    if args.json:
        print(json.dumps(result, indent=None, default=str))
    else:
        check = result.get("check")
        if "tensorrt" in result:
            t = result["tensorrt"]
            print(
                f"model.plan: {t['precision']}, TensorRT {t['tensorrt_version']}, {t['gpu']} "
                f"(sm {t['compute_capability']}), batch {t['profile']['min'][0]}..{t['profile']['max'][0]}"
            )
        if check:
            d = check["drift"]
            print(
                f"drift on {d['n']} images: top-1 agreement {d['top1_agreement']:.4f}; "
                + "; ".join(
                    f"{k} max|d| {d[k]['max_abs']:.3g} (rel {d[k]['max_rel']:.3g}), min cos {d[k]['min_cosine']:.4f}"
                    for k in ("logits", "cam", "early")
                )
            )
            frr = check.get("frr")
            if frr:
                c, r, ch = frr["candidate"], frr["reference"], frr["change"]
                print(
                    f"false-rejection rate on TensorRT: {c['frr']:.4f} (alpha {c['alpha']}, bound {c['bound']:.4f}), "
                    f"on ONNX Runtime CPU {r['frr']:.4f}; TensorRT rejects {ch['more_rejected']} images ONNX "
                    f"Runtime accepts and accepts {ch['fewer_rejected']} it rejects (p {ch['p']:.3g}) -> "
                    f"{'holds' if frr['engine_keeps_promise'] else 'DOES NOT HOLD: recalibrate on this engine'}; "
                    f"decision agreement {frr['decision_agreement']:.4f}"
                )
                if not r["holds"]:
                    print(
                        f"warning: on ONNX Runtime CPU too, the FRR on these images ({r['frr']:.4f}) is above the "
                        f"bound {r['bound']:.4f}: the images are not like the calibration images, or the "
                        "calibration is off (not the engine's doing); check them and `gamguard calibrate`",
                        file=sys.stderr,
                    )
    frr = (result.get("check") or {}).get("frr")
    if frr and not frr["engine_keeps_promise"]:
        print(
            "gamguard build-engine: the calibrated false-rejection rate does not hold on the TensorRT "
            "engine, which rejects more of these images than ONNX Runtime does; run `gamguard calibrate` "
            "on this engine",
            file=sys.stderr,
        )
        return 1
    return 0
