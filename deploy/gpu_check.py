"""GPU check for gamguard (run by deploy/gpu-check.sh on a machine with an NVIDIA GPU).

1. builds TensorRT plans for a calibrated bundle on this GPU (FP32, FP16 and, for the unguarded
   baseline, an FP16 plan pruned to the logits output), into a temporary copy of the bundle;
2. parity: TensorRT FP32, TensorRT FP16 and ONNX Runtime CUDA against ONNX Runtime FP32 on the CPU,
   over in-distribution images: max |difference| of logits / CAM / early features, the worst
   per-image CAM cosine, top-1 agreement, and the guard's false-rejection rate on each engine
   against the calibrated alpha and, paired on the same images, against ONNX Runtime CPU's
   (gamguard.runtime.engines.drift: an engine fails only when it rejects more than the CPU does,
   beyond chance, and its FRR is above the alpha bound; exit 1 then);
3. throughput, images per second: the full guarded call (gamguard.runtime.guard.Guard.verify_tensor:
   engine + attention/feature scoring + decision) vs the logits-only call, for TensorRT FP16 and
   ONNX Runtime CUDA, at batch 1 and 32 (--batches) — each with the checks' arithmetic on the host (numpy) and in
   the graph (runtime/checks/graph.py: an FP16 plan built with --guard-graph, and an ONNX Runtime CUDA
   session over the guarded model), plus how far the in-graph scores and p-values are from the host's
   on the same engine outputs;
and prints one table (and --json FILE for the numbers). Sized to finish in a few minutes. Columns
named "in-graph" compute the checks in the engine's graph; the others on the host (numpy).

Without TensorRT (onnxruntime-gpu alone) it says so, leaves the TensorRT columns out and checks ONNX
Runtime CUDA only; --no-tensorrt does the same on purpose.
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
    ap.add_argument("--no-tensorrt", action="store_true", help="check ONNX Runtime CUDA only")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from gamguard.runtime.bundle import MODEL_FILE, InputSpec, load_manifest, resolve_bundle
    from gamguard.runtime.checks import CalibrationData
    from gamguard.runtime.checks.graph import guarded_model_bytes, scores_from_graph
    from gamguard.runtime.engines import OnnxEngine
    from gamguard.runtime.engines.drift import OrtCpuReference, drift_report, guard_decider
    from gamguard.runtime.engines.plan import TensorRTUnavailable, current_device_tag
    from gamguard.runtime.engines.tensorrt import PlanRunner, TensorRTEngine
    from gamguard.runtime.guard import Guard, parse_checks

    t_start = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",")]
    src = resolve_bundle(args.bundle)
    manifest = load_manifest(src, require_calibration=True)
    spec = InputSpec.from_manifest(manifest["input"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("gpu_check: onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (one distribution)")
    trt_missing = "skipped (--no-tensorrt)" if args.no_tensorrt else None
    if trt_missing is None:
        try:
            tag = current_device_tag()
        except TensorRTUnavailable as exc:
            trt_missing = "not available (columns left out)"
            print(f"gpu_check: {exc}: checking ONNX Runtime CUDA only", file=sys.stderr)
    gpu, capability = (tag.gpu, tag.compute_capability) if trt_missing is None else _gpu_from_nvidia_smi()
    work = Path(tempfile.mkdtemp(prefix="gamguard-gpu-check-"))
    res: dict = {
        "gpu": gpu,
        "compute_capability": capability,
        "tensorrt": tag.tensorrt_version if trt_missing is None else None,
        "tensorrt_missing": trt_missing,
        "onnxruntime": ort.__version__,
        "bundle": str(src),
    }
    try:
        max_b = max(batches + [32])
        calibration = CalibrationData.load(src, manifest)
        built, guard_plan_error, logits_plan = {}, None, None
        if trt_missing is None:
            built, guard_plan_error, logits_plan = _build_plans(src, spec, (1, min(8, max_b), max_b), work)
        res["guard_graph_plan_error"] = guard_plan_error
        res["build_s"] = built

        x = _load_images(args, spec, work)
        res["n_images"] = int(x.shape[0])
        engines = {}
        if trt_missing is None:
            engines = {"TensorRT FP32": TensorRTEngine(work / "fp32"), "TensorRT FP16": TensorRTEngine(work / "fp16")}
        # kernel by kernel, whatever GAMGUARD_CUDA_GRAPHS says: the logits-only baseline below is too
        # (scripts/gpu_guard_probe.py measures captured CUDA graphs on both sides)
        engines |= {
            "ORT CUDA": OnnxEngine(src / MODEL_FILE, providers="cuda", cuda_graphs=False),
            "ORT CUDA in-graph": OnnxEngine(
                src / MODEL_FILE,
                providers="cuda",
                guarded=guarded_model_bytes(src, calibration),
                cuda_graphs=False,
            ),
        }
        if trt_missing is None and guard_plan_error is None:
            engines["TensorRT FP16 in-graph"] = TensorRTEngine(work / "fp16-graph")
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
        # in-graph scores vs the host's numpy scores on the very same engine outputs
        res["graph_vs_host"] = {}
        for name in ("ORT CUDA in-graph", "TensorRT FP16 in-graph"):
            if name not in engines:
                continue
            diffs = {"scores": 0.0, "pvalues": 0.0}
            for i in range(0, x.shape[0], 32):
                out = engines[name].run(x[i : i + 32])
                s_g, pv_g = scores_from_graph(out.guard, out.logits, calibration)
                s_h = calibration.score(out.logits, out.cam, out.early)
                pv_h = calibration.null.pvalues(s_h)
                diffs["scores"] = max(diffs["scores"], float(np.abs(s_g.sims - s_h.sims).max()))
                for field in ("measures", "feature", "garbage"):
                    d = float(np.abs(getattr(pv_g, field) - getattr(pv_h, field)).max())
                    diffs["pvalues"] = max(diffs["pvalues"], d)
            res["graph_vs_host"][name] = diffs
        section = manifest.get("guard") or {}
        key = parse_checks(section.get("enforced_checks") or "all")
        policy = section.get("policy") or "calibrated"
        timed = [
            n for n in ("TensorRT FP16", "TensorRT FP16 in-graph", "ORT CUDA", "ORT CUDA in-graph") if n in engines
        ]
        guards = {
            name: Guard(src, manifest, engines[name], calibration, policy=policy, enforced_checks=key) for name in timed
        }
        logits_only = {
            "ORT CUDA": engines["ORT CUDA"].run_logits,
            "ORT CUDA in-graph": engines["ORT CUDA"].run_logits,
        }
        if logits_plan is not None:
            logits_runner = PlanRunner(logits_plan)
            logits_only["TensorRT FP16"] = logits_only["TensorRT FP16 in-graph"] = lambda b: logits_runner.run(b)[
                "logits"
            ]
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
    frrs = [r["frr"] for r in res["parity"].values() if r["frr"]]
    if frrs and not frrs[0]["reference"]["holds"]:
        ref = frrs[0]["reference"]
        print(
            f"gpu_check: on ONNX Runtime CPU as well, the FRR on these images ({ref['frr']:.3f}) is above the bound "
            f"{ref['bound']:.3f}: the images or the calibration, not an engine (see the engines' paired rows)",
            file=sys.stderr,
        )
    bad = [n for n, r in res["parity"].items() if r["frr"] and not r["frr"]["engine_keeps_promise"]]
    if bad:
        print(f"gpu_check: calibrated false-rejection rate does NOT hold on: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def _build_plans(src: Path, spec, batch: tuple[int, int, int], work: Path):
    """Builds the FP32 and FP16 plans into ``work``, then the in-graph FP16 plan and the logits-only FP16
    baseline: ``(build seconds by plan, the in-graph plan's error or None, the baseline's plan bytes)``."""
    from gamguard.runtime.bundle import MODEL_FILE
    from gamguard.runtime.engines.plan import build_engine_for_bundle, build_plan_bytes

    built, guard_plan_error = {}, None
    for prec in ("fp32", "fp16"):
        t0 = time.perf_counter()
        build_engine_for_bundle(src, precision=prec, batch=batch, out_dir=work / prec)
        built[prec] = time.perf_counter() - t0
        print(f"gpu_check: built {prec} plan in {built[prec]:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    try:  # the in-graph guard: does TensorRT take the subgraph, and what does it cost?
        build_engine_for_bundle(src, precision="fp16", batch=batch, out_dir=work / "fp16-graph", guard_graph=True)
        built["fp16-graph"] = time.perf_counter() - t0
        print(f"gpu_check: built fp16 plan with the guard graph in {built['fp16-graph']:.1f} s", file=sys.stderr)
    except Exception as exc:  # reported in the table, the rest of the check still runs
        guard_plan_error = f"{type(exc).__name__}: {exc}"
        print(f"gpu_check: FP16 plan with the guard graph failed: {guard_plan_error}", file=sys.stderr)
    t0 = time.perf_counter()
    logits_plan, _ = build_plan_bytes(src / MODEL_FILE, spec, precision="fp16", batch=batch, outputs=("logits",))
    built["fp16-logits"] = time.perf_counter() - t0
    return built, guard_plan_error, logits_plan


def _gpu_from_nvidia_smi() -> tuple[str, str]:
    """GPU name and compute capability without TensorRT/cuda-python (for the ONNX Runtime-only check)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.splitlines()[0]
        name, cap = (part.strip() for part in out.split(","))
        return name, cap
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return "unknown GPU", "?"


def _print_table(res: dict, batches) -> None:
    cols = [
        c
        for c in ("TensorRT FP32", "TensorRT FP16", "TensorRT FP16 in-graph", "ORT CUDA", "ORT CUDA in-graph")
        if c in res["parity"]
    ]

    def row(label, values):
        print(f"| {label:<38} | " + " | ".join(f"{v:>19}" for v in values) + " |")

    print(
        f"\ngamguard GPU check: {res['gpu']} (sm {res['compute_capability']}), "
        f"TensorRT {res['tensorrt'] or res['tensorrt_missing']}, "
        f"onnxruntime {res['onnxruntime']}, {res['n_images']} images, {res['wall_s']:.0f} s\n"
    )
    row("", cols)
    print("|" + "-" * 40 + "|" + "|".join("-" * 21 for _ in cols) + "|")
    build = res["build_s"]
    plan_of = {"TensorRT FP32": "fp32", "TensorRT FP16": "fp16", "TensorRT FP16 in-graph": "fp16-graph"}
    row("plan build time (s)", [f"{build[plan_of[c]]:.1f}" if c in plan_of else "-" for c in cols])
    p = res["parity"]
    for out in ("logits", "cam", "early"):
        row(f"max |diff| {out} vs ORT CPU FP32", [f"{p[c]['drift'][out]['max_abs']:.2e}" for c in cols])
    row("worst per-image CAM cosine", [f"{p[c]['drift']['cam']['min_cosine']:.5f}" for c in cols])
    row("top-1 agreement with ORT CPU", [f"{p[c]['drift']['top1_agreement']:.4f}" for c in cols])
    row(
        "FRR on this engine (alpha bound)",
        [f"{p[c]['frr']['candidate']['frr']:.3f} (<={p[c]['frr']['candidate']['bound']:.3f})" for c in cols],
    )
    row("FRR on ORT CPU FP32, same images", [f"{p[c]['frr']['reference']['frr']:.3f}" for c in cols])
    row(
        "rejected here, not on CPU / vice versa",
        [f"{p[c]['frr']['change']['more_rejected']} / {p[c]['frr']['change']['fewer_rejected']}" for c in cols],
    )
    row("engine keeps the FRR promise", ["yes" if p[c]["frr"]["engine_keeps_promise"] else "NO" for c in cols])
    row("guard decisions equal to ORT CPU's", [f"{p[c]['frr']['decision_agreement']:.4f}" for c in cols])
    gh = res.get("graph_vs_host", {})
    row("in-graph vs host: max |diff| scores", [f"{gh[c]['scores']:.1e}" if c in gh else "-" for c in cols])
    row("in-graph vs host: max |diff| p-values", [f"{gh[c]['pvalues']:.1e}" if c in gh else "-" for c in cols])
    t = res["throughput"]
    for b in batches:
        for kind, label in (("guarded_ips", "guarded img/s"), ("logits_ips", "logits-only img/s")):
            row(f"batch {b}: {label}", [f"{t[f'{c} b{b}'][kind]:.0f}" if f"{c} b{b}" in t else "-" for c in cols])
        row(
            f"batch {b}: guarded time / logits-only",
            [f"{t[f'{c} b{b}']['ratio']:.2f}" if f"{c} b{b}" in t else "-" for c in cols],
        )
    if res.get("guard_graph_plan_error"):
        print(f"\nTensorRT plan with the guard graph: FAILED: {res['guard_graph_plan_error']}")
    print()


if __name__ == "__main__":
    sys.exit(main())
