"""GPU check for gamguard (run by deploy/gpu-check.sh on a machine with an NVIDIA GPU).

1. builds TensorRT plans for a calibrated bundle on this GPU (FP32, FP16 and, for the unguarded
   baseline, an FP16 plan pruned to the logits output), into a temporary copy of the bundle;
2. parity: TensorRT FP32, TensorRT FP16 and ONNX Runtime CUDA against ONNX Runtime FP32 on the CPU,
   over in-distribution images: max |difference| of logits / CAM / early features, the worst
   per-image CAM cosine, top-1 agreement, and the guard's false-rejection rate on each engine
   against the calibrated alpha (gamguard.runtime.engines.drift);
3. throughput, images per second: the full guarded call (gamguard.runtime.guard.Guard.verify_tensor:
   engine + attention/feature scoring + decision) vs the logits-only call, for TensorRT FP16 and
   ONNX Runtime CUDA, at batch 1 and 32;
and prints one table (and --json FILE for the numbers). Sized to finish in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _load_images(args, spec, workdir: Path) -> np.ndarray:
    from gamguard.runtime.decode import decode_file
    from gamguard.runtime.preprocess import preprocess

    images = Path(args.images) if args.images else None
    if images is None:
        images = workdir / "phantoms"
        per_class = max(1, args.n_images // 4)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "gamguard.runtime.cli",
                "data",
                "synth",
                "--out",
                str(images),
                "--per-class",
                str(per_class),
                "--seed",
                "12345",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    paths = sorted(p for p in images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".dcm"))
    if not paths:
        sys.exit(f"gpu_check: no images under {images}")
    return np.stack([preprocess(decode_file(p).pixels, spec) for p in paths[: args.n_images]])


def _throughput(fn, x: np.ndarray, seconds: float) -> float:
    fn(x)  # warm-up (lazy allocations, cuDNN/TensorRT tactic caches)
    fn(x)
    n, t0 = 0, time.perf_counter()
    while True:
        fn(x)
        n += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and n >= 3:
            return n * x.shape[0] / elapsed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="calibrated bundle (default: the embedded demo bundle)")
    ap.add_argument("--images", help="in-distribution images for parity/FRR (default: synthesized phantoms)")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=3.0, help="timing window per throughput cell")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--json", metavar="FILE", help="also write the numbers as JSON here")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from gamguard.runtime.bundle import MODEL_FILE, InputSpec, load_manifest, resolve_bundle
    from gamguard.runtime.checks import CalibrationData
    from gamguard.runtime.engines import OnnxEngine
    from gamguard.runtime.engines.drift import OrtCpuReference, drift_report, guard_decider
    from gamguard.runtime.engines.plan import build_engine_for_bundle, build_plan_bytes, current_device_tag
    from gamguard.runtime.engines.tensorrt import PlanRunner, TensorRTEngine
    from gamguard.runtime.guard import Guard, parse_checks

    t_start = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    src = resolve_bundle(args.bundle)
    manifest = load_manifest(src, require_calibration=True)
    spec = InputSpec.from_manifest(manifest["input"])
    tag = current_device_tag()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("gpu_check: onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (one distribution)")
    work = Path(tempfile.mkdtemp(prefix="gamguard-gpu-check-"))
    res: dict = {
        "gpu": tag.gpu,
        "compute_capability": tag.compute_capability,
        "tensorrt": tag.tensorrt_version,
        "onnxruntime": ort.__version__,
        "bundle": str(src),
    }
    try:
        max_b = max(batches + [32])
        built = {}
        for prec in ("fp32", "fp16"):
            t0 = time.perf_counter()
            build_engine_for_bundle(src, precision=prec, batch=(1, min(8, max_b), max_b), out_dir=work / prec)
            built[prec] = time.perf_counter() - t0
            print(f"gpu_check: built {prec} plan in {built[prec]:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        logits_plan, _ = build_plan_bytes(
            src / MODEL_FILE, spec, precision="fp16", batch=(1, min(8, max_b), max_b), outputs=("logits",)
        )
        built["fp16-logits"] = time.perf_counter() - t0
        res["build_s"] = built

        x = _load_images(args, spec, work)
        res["n_images"] = int(x.shape[0])
        engines = {
            "TensorRT FP32": TensorRTEngine(work / "fp32"),
            "TensorRT FP16": TensorRTEngine(work / "fp16"),
            "ORT CUDA": OnnxEngine(src / MODEL_FILE, providers="cuda"),
        }
        if engines["ORT CUDA"].providers[0] != "CUDAExecutionProvider":
            sys.exit(f"gpu_check: ORT session fell back to {engines['ORT CUDA'].providers}")
        decide, alpha = guard_decider(src, manifest)
        reference = OrtCpuReference(src / MODEL_FILE)
        res["parity"] = {}
        for name, eng in engines.items():
            chunks = [x[i : i + 32] for i in range(0, x.shape[0], 32)]
            res["parity"][name] = drift_report(
                reference,
                eng,
                chunks,
                decide=decide,
                alpha=alpha,
                calibrated_frr=(manifest.get("calibration") or {}).get("measured_false_rejection_rate"),
            )
        calibration = CalibrationData.load(src, manifest)
        section = manifest.get("guard") or {}
        key = parse_checks(section.get("enforced_checks") or "all")
        policy = section.get("policy") or "calibrated"
        guards = {
            name: Guard(src, manifest, engines[name], calibration, policy=policy, enforced_checks=key)
            for name in ("TensorRT FP16", "ORT CUDA")
        }
        logits_runner = PlanRunner(logits_plan)
        logits_only = {
            "TensorRT FP16": lambda b: logits_runner.run(b)["logits"],
            "ORT CUDA": engines["ORT CUDA"].run_logits,
        }
        res["throughput"] = {}
        for name in guards:
            for b in batches:
                xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
                g = _throughput(guards[name].verify_tensor, xb, args.seconds)
                lo = _throughput(logits_only[name], xb, args.seconds)
                res["throughput"][f"{name} b{b}"] = {"guarded_ips": g, "logits_ips": lo, "ratio": lo / g}
        res["wall_s"] = time.perf_counter() - t_start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    _print_table(res, batches)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")
    bad = [n for n, r in res["parity"].items() if r["frr"] and not r["frr"]["candidate"]["holds"]]
    if bad:
        print(f"gpu_check: calibrated false-rejection rate does NOT hold on: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _print_table(res: dict, batches) -> None:
    cols = ["TensorRT FP32", "TensorRT FP16", "ORT CUDA"]

    def row(label, values):
        print(f"| {label:<38} | " + " | ".join(f"{v:>14}" for v in values) + " |")

    print(
        f"\ngamguard GPU check: {res['gpu']} (sm {res['compute_capability']}), TensorRT {res['tensorrt']}, "
        f"onnxruntime {res['onnxruntime']}, {res['n_images']} images, {res['wall_s']:.0f} s\n"
    )
    row("", cols)
    print("|" + "-" * 40 + "|" + "|".join("-" * 16 for _ in cols) + "|")
    build = res["build_s"]
    row("plan build time (s)", [f"{build['fp32']:.1f}", f"{build['fp16']:.1f}", "-"])
    p = res["parity"]
    for out in ("logits", "cam", "early"):
        row(f"max |diff| {out} vs ORT CPU FP32", [f"{p[c]['drift'][out]['max_abs']:.2e}" for c in cols])
    row("worst per-image CAM cosine", [f"{p[c]['drift']['cam']['min_cosine']:.5f}" for c in cols])
    row("top-1 agreement with ORT CPU", [f"{p[c]['drift']['top1_agreement']:.4f}" for c in cols])
    row(
        "FRR on this engine (alpha bound)",
        [f"{p[c]['frr']['candidate']['frr']:.3f} (<={p[c]['frr']['candidate']['bound']:.3f})" for c in cols],
    )
    row("calibrated FRR holds", ["yes" if p[c]["frr"]["candidate"]["holds"] else "NO" for c in cols])
    row("guard decisions equal to ORT CPU's", [f"{p[c]['frr']['decision_agreement']:.4f}" for c in cols])
    t = res["throughput"]
    for b in batches:
        for kind, label in (("guarded_ips", "guarded img/s"), ("logits_ips", "logits-only img/s")):
            row(f"batch {b}: {label}", ["-"] + [f"{t[f'{c} b{b}'][kind]:.0f}" for c in cols[1:]])
        row(f"batch {b}: guarded time / logits-only", ["-"] + [f"{t[f'{c} b{b}']['ratio']:.2f}" for c in cols[1:]])
    print()


if __name__ == "__main__":
    sys.exit(main())
