"""`gamguard export`: a trained checkpoint, or an ONNX classifier, → bundle directory with the fused
Grad-CAM ONNX model."""

from __future__ import annotations

HELP = "export a checkpoint or an ONNX classifier as a bundle: ONNX model with logits, Grad-CAM map and early features"

DESCRIPTION = """\
Export a checkpoint written by `gamguard train` as a gamguard bundle directory:

  model.onnx   one call returns `logits` [N,K], `cam` [N,H,W] (Grad-CAM of the predicted class,
               in [0,1], same as pytorch-grad-cam's GradCAM) and `early` [N,C,h,w] (early features);
               the gradient is computed inside the graph with standard ONNX ops only
  bundle.json  manifest: classes, garbage class, input spec, layers, export facts, file hashes

The export is checked with onnx.checker and run with ONNX Runtime (CPU) against the torch model;
any disagreement is an error. The bundle has no calibration yet: run `gamguard calibrate` next.

Needs the exporter extra (torch): pip install 'gamguard[export]'.

--onnx guards an ONNX classifier (one float image input; its output the logits or their Softmax,
which is then taken off: Grad-CAM and the guard work on the logits, and the served probabilities are
the model's own) without torch: name the tensor of the Grad-CAM layer (--target-tensor, [N,C,h,w];
typically the input of the global pooling) and of an early feature map (--early-tensor); look the
names up in Netron. The head's gradient is written into the graph with ONNX ops; the fused model is
checked against the original with ONNX Runtime. A 3-channel (RGB) model is fed the grey X-ray
replicated to its channels, with per-channel --mean/--std. A TensorFlow/Keras model converted with
tf2onnx keeps its channels-last (NHWC) input: the bundle reads it through a Transpose
(--input-layout); its target and early tensors are the channels-first ones tf2onnx computes the
convolutions in (e.g. `model/out_relu/Relu6:0`).

examples:
  gamguard export --checkpoint runs/demo/model.pt --out bundles/demo
  gamguard export --checkpoint model.pt --out bundle-trt8 --opset 17      # TensorRT 8.x
  gamguard export --checkpoint model.pt --out bench --dynamic-spatial --json
  gamguard export --onnx classifier.onnx --target-tensor relu_16 --early-tensor relu_3 \\
      --class-names normal,pneumonia,garbage --garbage-class garbage --out bundles/vendor
  gamguard export --onnx rgb.onnx --target-tensor t --early-tensor e --class-names a,b,garbage \\
      --garbage-class 2 --input-shape 3,224,224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --out b
"""


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="CKPT", help="checkpoint file written by `gamguard train`")
    source.add_argument(
        "--onnx",
        metavar="MODEL.onnx",
        help="an ONNX classifier to guard (no torch needed; opset 9-12 is converted to 13 first)",
    )
    onnx_args = parser.add_argument_group("--onnx options")
    onnx_args.add_argument("--target-tensor", metavar="NAME", help="tensor of the Grad-CAM layer, [N,C,h,w]")
    onnx_args.add_argument("--early-tensor", metavar="NAME", help="tensor of the early feature layer")
    onnx_args.add_argument("--class-names", metavar="A,B,...", help="comma-separated class names, garbage included")
    onnx_args.add_argument("--garbage-class", metavar="NAME|INDEX", help="the garbage class, by name or index")
    onnx_args.add_argument(
        "--input-shape", metavar="C,H,W", help="input size; needed only when the model's H/W are dynamic"
    )
    onnx_args.add_argument(
        "--input-layout",
        choices=("auto", "nchw", "nhwc"),
        default="auto",
        help="the model's input layout: auto (default: NHWC when the last axis is 1 or 3 channels, as "
        "TensorFlow/Keras models converted with tf2onnx have it) or as given; the bundle's input is NCHW",
    )
    onnx_args.add_argument(
        "--mean", default="0", metavar="M[,M,M]", help="normalisation mean of pixels in [0,1] (default 0)"
    )
    onnx_args.add_argument(
        "--std", default="1", metavar="S[,S,S]", help="normalisation std of pixels in [0,1] (default 1)"
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


def _floats(text: str, flag: str) -> list[float]:
    from gamguard.runtime.cli import CommandError

    try:
        return [float(v) for v in text.split(",")]
    except ValueError as exc:
        raise CommandError(f"{flag}: expected comma-separated numbers, got {text!r}") from exc


def _run_onnx(args) -> dict:
    """`--onnx`: guard an ONNX classifier (torch-free)."""
    from gamguard.exporter.onnx_checks import ExportError
    from gamguard.exporter.onnx_fuse import UnsupportedOnnxOpError, export_onnx_bundle
    from gamguard.runtime.cli import CommandError

    missing = [
        flag
        for flag, value in (
            ("--target-tensor", args.target_tensor),
            ("--early-tensor", args.early_tensor),
            ("--class-names", args.class_names),
            ("--garbage-class", args.garbage_class),
        )
        if not value
    ]
    if missing:
        raise CommandError(f"--onnx needs {', '.join(missing)}")
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise CommandError(f"--input-shape: expected C,H,W (e.g. 3,224,224), got {args.input_shape!r}")
    try:
        return export_onnx_bundle(
            args.onnx,
            args.out,
            target_tensor=args.target_tensor,
            early_tensor=args.early_tensor,
            class_names=[n.strip() for n in args.class_names.split(",") if n.strip()],
            garbage_class=args.garbage_class,
            input_shape=shape,
            normalization=(_floats(args.mean, "--mean"), _floats(args.std, "--std")),
            model_name=args.name,
            model_version=args.version,
            early_pool=(args.early_pool, args.early_pool) if args.early_pool else None,
            input_layout=args.input_layout,
        )
    except (ValueError, UnsupportedOnnxOpError, ExportError) as exc:
        raise CommandError(str(exc)) from exc


def run(args) -> int:
    import logging
    import sys

    from gamguard.runtime.bundle import BundleError, InputSpec
    from gamguard.runtime.cli import CommandError, require_export_extra

    if args.early_pool < 0:
        raise CommandError("--early-pool must be 0 (no pooling) or a positive grid size")
    onnx_only = {
        "--target-tensor": args.target_tensor,
        "--early-tensor": args.early_tensor,
        "--class-names": args.class_names,
        "--garbage-class": args.garbage_class,
        "--input-shape": args.input_shape,
        "--input-layout": args.input_layout != "auto",
        "--mean": args.mean != "0",
        "--std": args.std != "1",
    }
    if args.onnx and (args.opset != 18 or args.dynamic_spatial):
        raise CommandError("--opset and --dynamic-spatial apply to --checkpoint exports only")
    if args.checkpoint and any(onnx_only.values()):
        given = ", ".join(flag for flag, value in onnx_only.items() if value)
        raise CommandError(f"{given}: only with --onnx (a checkpoint carries its own layers, classes and input spec)")
    if args.onnx:
        manifest = _run_onnx(args)
        facts = manifest["export"]
        parity = facts["parity"]
        print(f"ONNX op types ({len(facts['op_types'])}): {', '.join(facts['op_types'])}", file=sys.stderr)
        print(
            f"fused {args.onnx} in {facts['seconds']:.2f} s; head: {' → '.join(facts['head'])}; ONNX Runtime vs "
            f"the original: logits {parity['logits_max_rel']:.1e} rel, early {parity['early_max_rel']:.1e} rel "
            f"(batches {parity['batches']})"
            + ("; the model's NHWC input is read through a Transpose" if facts["source_input_layout"] == "nhwc" else "")
            + (
                f"; converted from ONNX opset {facts['source_opset']} to {facts['opset']} with "
                f"{facts['opset_converted_by']} (parity checked against the unconverted original)"
                if facts.get("opset_converted_by")
                else ""
            )
            + (
                f"; the model's final {facts['output_activation_removed']} was taken off (the bundle's logits are "
                "its input; parity checked on the model's own output)"
                if facts.get("output_activation_removed")
                else ""
            ),
            file=sys.stderr,
        )
        return _print_result(args, manifest)

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
    return _print_result(args, manifest)


def _print_result(args, manifest: dict) -> int:
    import json

    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(f"wrote {args.out} (model.onnx + bundle.json); next: gamguard calibrate --bundle {args.out}")
    return 0
