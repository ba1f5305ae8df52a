"""Three measurements of the guard subgraph on ONNX Runtime CUDA (a GPU machine with onnxruntime-gpu).

    python scripts/gpu_guard_probe.py [--bundle DIR] [--size 224] [--n-images 128]

1. TF32: the guarded model (fused model + guard subgraph, checks/graph.py) on CUDA with ``use_tf32`` 1
   and 0, against ONNX Runtime CPU on the same phantoms: the largest difference of each ``guard``
   column (NaN where a p-value became NaN). This is why gamguard's CUDA sessions set ``use_tf32=0``
   (engines/onnx.py, ``PROVIDER_OPTIONS``).
2. CUDA graphs: time per call of the logits-only model, the fused model and the guarded model at
   ``--size``, batch 1/8/32, with plain ``session.run`` and with IO binding plus ``enable_cuda_graph``
   (one session per batch size, input copied into the captured buffer, outputs copied back), TF32 off.
3. gamguard's engine with ``GAMGUARD_CUDA_GRAPHS=1`` (engines/cuda_graphs.py) at the bundle's size:
   its outputs against the same engine without capture at batch 1, 3, 8 and 40 (padding and slicing),
   and the full guarded call (Guard.verify_tensor) against the logits-only model, both captured.

Prints four tables (the third measurement has two). Numbers are for one run on one machine
(docs/architecture.md, "On a GPU").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _cuda(graph: bool = False, tf32: bool = False) -> list:
    opts = {"use_tf32": "1" if tf32 else "0", "enable_cuda_graph": "1" if graph else "0"}
    return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]


def _ms_per_call(fn, rounds: int = 7, calls: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return float(np.median(times))


def tf32_table(guarded: bytes, x: np.ndarray) -> None:
    import onnxruntime as ort

    from gamguard.runtime.checks.graph import GUARD_COLUMNS
    from gamguard.runtime.engines import session_options

    def run(providers):
        s = ort.InferenceSession(guarded, sess_options=session_options(None), providers=providers)
        return np.concatenate([s.run(["guard"], {"image": x[i : i + 32]})[0] for i in range(0, len(x), 32)])

    cpu = run(["CPUExecutionProvider"])
    diffs = {tf32: np.abs(run(_cuda(tf32=tf32)) - cpu).max(axis=0) for tf32 in (True, False)}
    print(f"\nguard columns, max |CUDA - CPU| over {len(x)} phantoms")
    print("| column | TF32 on | TF32 off |\n|---|---|---|")
    for j, name in enumerate(GUARD_COLUMNS):
        print(f"| {name} | {diffs[True][j]:.1e} | {diffs[False][j]:.1e} |")


def cuda_graph_table(models: dict, size: int) -> None:
    import onnxruntime as ort

    from gamguard.runtime.engines import session_options

    rng = np.random.default_rng(0)
    print(f"\nms per call at {size}x{size}, TF32 off")
    print("| model | batch | session.run | IO binding + CUDA graph |\n|---|---|---|---|")
    for name, (model, outputs) in models.items():
        for b in (1, 8, 32):
            x = rng.random((b, 1, size, size), dtype=np.float32)
            plain = ort.InferenceSession(model, sess_options=session_options(None), providers=_cuda())
            expected = plain.run(outputs, {"image": x})
            graphed = ort.InferenceSession(model, sess_options=session_options(None), providers=_cuda(graph=True))
            x_dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
            y_dev = [ort.OrtValue.ortvalue_from_shape_and_type(a.shape, np.float32, "cuda", 0) for a in expected]
            binding = graphed.io_binding()
            binding.bind_ortvalue_input("image", x_dev)
            for out, y in zip(outputs, y_dev):
                binding.bind_ortvalue_output(out, y)
            graphed.run_with_iobinding(binding)  # the first run captures the graph

            def call(x=x, x_dev=x_dev, graphed=graphed, binding=binding, y_dev=y_dev):
                x_dev.update_inplace(x)
                graphed.run_with_iobinding(binding)
                return [y.numpy() for y in y_dev]

            err = max(float(np.abs(a - e).max()) for a, e in zip(call(), expected))
            t_plain = _ms_per_call(lambda plain=plain, x=x, outputs=outputs: plain.run(outputs, {"image": x}))
            print(f"| {name} | {b} | {t_plain:.3f} | {_ms_per_call(call):.3f} (max diff {err:.0e}) |")


def engine_table(src: Path, x: np.ndarray) -> None:
    import onnx

    from gamguard.runtime.bench.common import logits_only_model
    from gamguard.runtime.bundle import MODEL_FILE
    from gamguard.runtime.engines import OnnxEngine
    from gamguard.runtime.engines.cuda_graphs import CapturedRuns
    from gamguard.runtime.engines.onnx import provider_entries, serving_graph, session_options
    from gamguard.runtime.guard import Guard

    plain = Guard.from_bundle(src, providers="cuda", prefer="onnxruntime")
    plain.engine = OnnxEngine(  # uncaptured whatever GAMGUARD_CUDA_GRAPHS says
        plain.engine.model_path,
        providers="cuda",
        guarded=plain.engine._guarded_source,
        input_hw=plain.engine.input_hw,
        cuda_graphs=False,
    )
    captured = Guard.from_bundle(src, providers="cuda", prefer="onnxruntime")
    captured.engine = OnnxEngine(
        plain.engine.model_path,
        providers="cuda",
        guarded=plain.engine._guarded_source,
        input_hw=plain.engine.input_hw,
        cuda_graphs=True,
    )
    print(f"\ngamguard engine with CUDA graphs (captured at {captured.engine._captured.batches}), bundle size")
    print("| batch | max diff vs uncaptured (logits, cam, early, guard) | verdicts equal |\n|---|---|---|")
    for b in (1, 3, 8, 40):
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
        a, c = plain.engine.run(xb), captured.engine.run(xb)
        diff = max(float(np.abs(getattr(a, f) - getattr(c, f)).max()) for f in ("logits", "cam", "early", "guard"))
        same = [v.accepted for v in plain.verify_tensor(xb)] == [v.accepted for v in captured.verify_tensor(xb)]
        print(f"| {b} | {diff:.1e} | {same} |")

    with tempfile.TemporaryDirectory() as tmp:
        lo = onnx.load(str(logits_only_model(src / MODEL_FILE, Path(tmp))))
    lo_src, *_ = serving_graph(lo.SerializeToString(), src / MODEL_FILE, plain.engine.input_hw or x.shape[2:])
    import onnxruntime as ort

    lo_plain = ort.InferenceSession(
        lo_src, sess_options=session_options(None), providers=provider_entries(["CUDAExecutionProvider"])
    )
    lo_captured = CapturedRuns(lo_src, plain=lo_plain, outputs=["logits"])
    print("\nms per call, bundle size: full guarded call (verify_tensor) / logits-only")
    print("| batch | logits-only | guarded | ratio | logits-only, captured | guarded, captured | ratio |")
    print("|---|---|---|---|---|---|---|")
    for b in (1, 8, 32):
        xb = np.ascontiguousarray(np.resize(x, (b, *x.shape[1:])))
        t = [
            _ms_per_call(lambda xb=xb: lo_plain.run(["logits"], {"image": xb})),
            _ms_per_call(lambda xb=xb: plain.verify_tensor(xb)),
            _ms_per_call(lambda xb=xb: lo_captured.run(xb)),
            _ms_per_call(lambda xb=xb: captured.verify_tensor(xb)),
        ]
        print(f"| {b} | {t[0]:.3f} | {t[1]:.3f} | {t[1] / t[0]:.2f} | {t[2]:.3f} | {t[3]:.3f} | {t[3] / t[2]:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", help="calibrated bundle (default: the embedded demo bundle)")
    ap.add_argument("--size", type=int, default=224, help="input size of the CUDA-graph timings (dynamic H/W models)")
    ap.add_argument("--n-images", type=int, default=128)
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort

    from gamguard.runtime.bench.common import logits_only_model, phantom_images
    from gamguard.runtime.bundle import MODEL_FILE, InputSpec, load_manifest, resolve_bundle
    from gamguard.runtime.checks import CalibrationData
    from gamguard.runtime.checks.graph import guarded_model_bytes
    from gamguard.runtime.engines.onnx import serving_graph
    from gamguard.runtime.engines.specialize import is_spatially_dynamic, specialize_spatial
    from gamguard.runtime.preprocess import preprocess

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit("gpu_guard_probe: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    src = resolve_bundle(args.bundle)
    manifest = load_manifest(src, require_calibration=True)
    spec = InputSpec.from_manifest(manifest["input"])
    guarded = guarded_model_bytes(src, CalibrationData.load(src, manifest))
    x = np.stack([preprocess(p, spec) for p in phantom_images(args.n_images, seed=777)]).astype(np.float32)
    tf32_table(guarded, x)

    size, fused = args.size, src / MODEL_FILE
    with tempfile.TemporaryDirectory() as tmp:
        logits_only = onnx.load(str(logits_only_model(fused, Path(tmp))))
    if is_spatially_dynamic(logits_only):
        logits_only = specialize_spatial(logits_only, size, size)
    models = {
        "logits-only": (logits_only.SerializeToString(), ["logits"]),
        "fused (logits, cam, early)": (serving_graph(str(fused), fused, (size, size))[0], ["logits", "cam", "early"]),
        "guarded (logits, guard)": (serving_graph(guarded, fused, (size, size))[0], ["logits", "guard"]),
    }
    cuda_graph_table(models, size)
    engine_table(src, x)
    return 0


if __name__ == "__main__":
    sys.exit(main())
