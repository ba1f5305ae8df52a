"""`gamguard export`: a trained checkpoint → bundle directory with the fused Grad-CAM ONNX model."""

from __future__ import annotations

HELP = "export a checkpoint as a bundle: ONNX model with logits, Grad-CAM map and early features"

DESCRIPTION = """\
Export a checkpoint written by `gamguard train` as a gamguard bundle directory:

  model.onnx   one call returns `logits` [N,K], `cam` [N,H,W] (Grad-CAM of the predicted class,
               in [0,1], same as pytorch-grad-cam's GradCAM) and `early` [N,C,h,w] (early features);
               the gradient is computed inside the graph with standard ONNX ops only
  bundle.json  manifest: classes, garbage class, input spec, layers, export facts, file hashes

The export is checked with onnx.checker and run with ONNX Runtime (CPU) against the torch model;
any disagreement is an error. The bundle has no calibration yet: run `gamguard calibrate` next.

Needs the exporter extra (torch): pip install 'gamguard[export]'.

examples:
  gamguard export --checkpoint runs/demo/model.pt --out bundles/demo
  gamguard export --checkpoint model.pt --out bundle-trt8 --opset 17      # TensorRT 8.x
  gamguard export --checkpoint model.pt --out bench --dynamic-spatial --json
"""


def add_arguments(parser):
    parser.add_argument(
        "--checkpoint", required=True, metavar="CKPT", help="checkpoint file written by `gamguard train`"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="bundle directory to write (created; must hold no foreign files)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        choices=(17, 18),
        default=18,
        help="ONNX opset: 18 (default, torch.export exporter) or 17 (legacy TorchScript exporter, for TensorRT 8.x)",
    )
    parser.add_argument(
        "--name", default=None, help="model name in the manifest (default: the checkpoint's architecture)"
    )
    parser.add_argument("--version", default="1", help="model version in the manifest (default 1)")
    parser.add_argument(
        "--dynamic-spatial",
        action="store_true",
        help="make input height/width dynamic too (e.g. for benchmarks at 224/512)",
    )
    parser.add_argument(
        "--early-pool",
        type=int,
        default=8,
        metavar="S",
        help="pool early features to SxS inside the graph (0 keeps full size; default 8)",
    )
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")


def run(args) -> int:
    import json
    import logging
    import sys

    from gamguard.runtime.bundle import BundleError, InputSpec
    from gamguard.runtime.cli import CommandError, require_export_extra

    require_export_extra()
    from gamguard.exporter.export import ExportError, export_bundle
    from gamguard.exporter.gradcam import UnsupportedHeadError
    from gamguard.exporter.train import load_checkpoint

    log = logging.getLogger("gamguard.export")
    try:
        model, ckpt = load_checkpoint(args.checkpoint)
        spec = InputSpec.from_manifest(ckpt["input"])
    except (ValueError, BundleError) as exc:
        raise CommandError(str(exc)) from exc
    if args.early_pool < 0:
        raise CommandError("--early-pool must be 0 (no pooling) or a positive grid size")
    log.info(
        "exporting %s (%d classes, target %s, early %s) to %s, opset %d",
        args.checkpoint,
        len(ckpt["class_names"]),
        ckpt["target_layer"],
        ckpt["early_layer"],
        args.out,
        args.opset,
    )
    try:
        manifest = export_bundle(
            model,
            args.out,
            class_names=ckpt["class_names"],
            garbage_class=ckpt["garbage_class"],
            target_layer=ckpt["target_layer"],
            early_layer=ckpt["early_layer"],
            input_shape=(spec.channels, spec.height, spec.width),
            normalization={"mean": spec.mean, "std": spec.std},
            model_name=args.name or str(ckpt.get("arch", "model")),
            model_version=args.version,
            early_pool=(args.early_pool, args.early_pool) if args.early_pool else None,
            opset=args.opset,
            dynamic_spatial=args.dynamic_spatial,
            resize=spec.resize,
            photometric=spec.photometric,
        )
    except (ValueError, UnsupportedHeadError, ExportError) as exc:
        raise CommandError(str(exc)) from exc

    facts = manifest["export"]
    print(f"ONNX op types ({len(facts['op_types'])}): {', '.join(facts['op_types'])}", file=sys.stderr)
    print(
        f"export: {facts['seconds']:.2f} s ({facts['exporter']} exporter, opset {facts['opset']}, "
        f"head {facts['head_kind']}); total with checks {facts['total_seconds']:.2f} s",
        file=sys.stderr,
    )
    parity = facts["parity"]
    print(
        f"ONNX Runtime vs torch: logits {parity['logits_max_rel']:.1e} rel, cam "
        f"{parity['cam_max_abs']:.1e} abs, early {parity['early_max_rel']:.1e} rel "
        f"(batches {parity['batches']})",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(f"wrote {args.out} (model.onnx + bundle.json); next: gamguard calibrate --bundle {args.out}")
    return 0
