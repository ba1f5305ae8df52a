"""`gamguard bench`: what the guard costs, as ratios measured in one run (see gamguard.runtime.bench)."""

HELP = "measure the guard's cost: overhead vs logits-only, vs PyTorch Grad-CAM, gRPC efficiency"
DESCRIPTION = """\
Measure what the guard costs on this machine, as ratios of variants timed in the same run
(interleaved, medians), with absolute times only as context:

  guard_overhead              full guarded call (fused engine + every check + decision, what the
                              server runs per batch) / a logits-only ONNX Runtime session of the same
                              model (cut out of model.onnx), batch 1 and 8, at 224² and 512²
                              (goal <= 1.10; a bundle without dynamic H/W: its own size only);
                              the checks' arithmetic runs where --arithmetic says, and each case is
                              also timed with it on the other side (in-graph vs host numpy)
  measures_cost               7 similarity measures + early-feature check per image / engine time
  speedup_vs_pytorch_gradcam  PyTorch eager forward+backward Grad-CAM (pytorch-grad-cam semantics, CAM
                              only) / gamguard's guarded call, smallest over the cases (goal >= 4);
                              null without torch or without the bundle's torch --checkpoint
  guard_overhead_large        (--large) the same ratio on a realistic-size model (GuardNet 64/128/256,
                              2 blocks per stage, random weights, exported and calibrated on the fly)
  zoo_overhead                (--zoo) fused / logits-only ONNX Runtime call for the exporter's zoo,
                              the fused graph as the engine serves it (full-size heatmaps on the host
                              when read: also reported with them, and as exported)
                              (ResNet-18/50, DenseNet-121, EfficientNet-B0, MobileNetV3-Small,
                              ConvNeXt-T, VGG-11-BN; real widths unless --zoo-width says otherwise;
                              random weights; first --sizes entry; each case at least --repeats
                              rounds and about 1 s of calls; needs torch)
  grpc_efficiency             gRPC server throughput (1, 4, 16 concurrent clients in another process)
                              / in-process guarded calls on the very batches the server formed;
                              also vs in-process DataPlane calls; p50/p99 latency (goal >= 0.85 at 16)
  dicom_efficiency            C-STORE images/s to the DICOM node over gRPC Verify images/s (1, 4 associations;
                              dcmtk storescu as the client where installed, see --dicom-client;
                              256² DX phantoms, --dicom-size for radiograph sizes; goal >= 0.7)

Progress goes to stderr; --json prints one JSON object on stdout. Benchmarks are not tests: the
numbers depend on the machine and its load (recorded in "machine").

examples:
  gamguard bench                                   # tables, embedded demo bundle, 1 thread
  gamguard bench --quick --json                    # < 1 min, machine-readable
  gamguard bench --bundle out/bench --checkpoint out/demo.ckpt --threads 2 --json > bench.json
  gamguard bench --providers cuda --json           # ONNX Runtime CUDA provider (GPU machines)
  GAMGUARD_CUDA_GRAPHS=1 gamguard bench --providers cuda   # both sides replay captured CUDA graphs
  gamguard bench --providers tensorrt,cuda --skip grpc
"""


def add_arguments(parser):
    parser.add_argument("--bundle", metavar="DIR", help="calibrated bundle (default: the embedded demo bundle)")
    parser.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="torch checkpoint of the bundle's model, for the PyTorch Grad-CAM comparison "
        "(default: exporter/demo.ckpt for the demo bundle)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="intra-op threads for ONNX Runtime and torch alike (default 1)"
    )
    parser.add_argument(
        "--providers",
        default="cpu",
        help="ONNX Runtime providers for the guard and the logits-only baseline, e.g. cpu, "
        "cuda, tensorrt,cuda (default: cpu)",
    )
    parser.add_argument(
        "--arithmetic",
        choices=("auto", "graph", "host"),
        help="where the guard computes its checks: in the engine's graph or on the host (numpy); auto "
        "(default, env GAMGUARD_GUARD_ARITHMETIC) is graph. Both are timed either way; this picks the one "
        "every section uses",
    )
    parser.add_argument("--quick", action="store_true", help="few repeats (well under a minute); for smoke tests")
    parser.add_argument("--repeats", type=int, help="timed rounds per case (default 5 with --quick, else 30)")
    parser.add_argument("--sizes", default="224,512", help="input sizes for dynamic-H/W bundles (default 224,512)")
    parser.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent gRPC clients (default 1,4,16)")
    parser.add_argument(
        "--skip", action="append", choices=("pytorch", "grpc", "dicom"), default=[], help="skip a section (repeatable)"
    )
    parser.add_argument(
        "--dicom-client",
        choices=("auto", "storescu", "pynetdicom"),
        default="auto",
        help="the C-STORE client of dicom_efficiency: dcmtk's storescu (a native DICOM stack, as consoles "
        "have) or pynetdicom's SCU (Python; its own cost slows the C-STORE side); auto (default) = storescu "
        "when installed",
    )
    parser.add_argument(
        "--dicom-size",
        type=int,
        metavar="N",
        help="dicom_efficiency's phantoms resampled to NxN before they are written as DICOM (default: "
        "their own 256x256, 132 kB; radiographs are 2000-3000 px a side, e.g. --dicom-size 2048)",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help="also measure guard overhead on a realistic-size model (random weights, exported "
        "and calibrated on the fly; needs torch; about a minute)",
    )
    parser.add_argument(
        "--zoo",
        action="store_true",
        help="also measure fused / logits-only for common architectures (exported on the fly; needs torch; minutes)",
    )
    parser.add_argument(
        "--zoo-width",
        type=_zoo_width,
        default=1.0,
        metavar="F",
        help="channel-width factor of the zoo models (default 1: the architectures' real widths, a few minutes; "
        "'reduced': each architecture's reduced test width, a fast option whose ratios are pessimistic because "
        "the models are tiny)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _zoo_width(text: str) -> float | None:
    """``--zoo-width``: a positive factor, or ``reduced`` (None: each architecture's test width)."""
    import argparse

    if text.strip().lower() == "reduced":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'reduced', got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'reduced', got {text!r}")
    return value


def _ints(text: str, flag: str) -> tuple[int, ...]:
    from gamguard.runtime.cli import CommandError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CommandError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise CommandError(f"{flag}: expected positive integers, got {text!r}")
    return values


def run(args) -> int:
    import json
    import sys
    from pathlib import Path

    from gamguard.runtime.bench import BenchConfig, BenchError, format_tables, run_bench
    from gamguard.runtime.bundle import BundleError
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.engines import EngineError

    if args.threads < 1:
        raise CommandError("--threads must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        raise CommandError("--repeats must be >= 1")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise CommandError(f"--checkpoint {args.checkpoint}: file not found")
    if args.dicom_size is not None and not 16 <= args.dicom_size <= 8192:
        raise CommandError("--dicom-size must be 16..8192 pixels")
    if "dicom" not in args.skip:
        from gamguard.runtime.dicomnode.bench import resolve_client

        try:  # before minutes of other sections
            resolve_client(args.dicom_client)
        except ValueError as exc:
            raise CommandError(f"--dicom-client: {exc}") from None
    cfg = BenchConfig(
        bundle=Path(args.bundle) if args.bundle else None,
        checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        threads=args.threads,
        providers=args.providers,
        quick=args.quick,
        repeats=args.repeats,
        sizes=_ints(args.sizes, "--sizes"),
        batches=_ints(args.batches, "--batches"),
        clients=_ints(args.clients, "--clients"),
        skip=tuple(args.skip),
        dicom_client=args.dicom_client,
        dicom_size=args.dicom_size,
        large=args.large,
        arithmetic=args.arithmetic,
        zoo=args.zoo,
        zoo_width=args.zoo_width,
        progress=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True),
    )
    try:
        result = run_bench(cfg)
    except (BenchError, BundleError, EngineError) as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps(result, allow_nan=False))
    else:
        print(format_tables(result))
    return 0
