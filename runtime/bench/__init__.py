"""``gamguard bench``: what the guard costs, measured as ratios within one run.

The machine this runs on is usually shared and noisy, so every figure that matters is a *ratio* of two
variants measured in the same run, interleaved (A B, B A, A B, ...) so that load drift hits both alike,
and summarised by medians. Absolute milliseconds are reported only as context.

Sections of the result (``run_bench`` returns one JSON-able dict, format :data:`BENCH_FORMAT`):

* ``guard_overhead`` — per batch (1, 8) and input size (224², 512²): the *full guarded call*
  (:meth:`Guard.verify_tensor` on a preprocessed batch: fused engine + every check + decision + verdicts,
  exactly what the server's worker runs per batch) over a *logits-only* ONNX Runtime session of the same
  model. The logits-only model is cut out of the bundle's fused ``model.onnx`` with
  :class:`onnx.utils.Extractor` (only the nodes ``logits`` depends on), and its session gets the same
  providers and thread settings as the guard's engine. Goal: ratio <= 1.10.
  ``Guard.verify_tensor`` checks the batch against the bundle's input size; at other sizes the guard
  runs as a shallow copy whose input spec says that size (same engine session, references, thresholds:
  Grad-CAM maps are resampled to the comparison grid and early features are pooled to a fixed grid in
  the graph, so every check runs unchanged). The *timing* is representative; the *decisions* at a size
  the bundle was not calibrated for are not, and are not reported. A bundle exported without dynamic
  height/width is measured at its own size only (``sizes_note`` says so).
* ``guard_overhead_large`` (only with ``BenchConfig.large``; needs torch) — the same measurement on a
  realistic-size classifier (:data:`LARGE_MODEL`: GuardNet at ResNet-18 widths, 2 blocks per stage)
  with *random* seeded weights, exported through :func:`gamguard.exporter.export_bundle` (dynamic
  H/W) and calibrated on phantoms here: timings are representative, verdicts are not.
  ``{"status": "skipped", "reason": ...}`` without torch. The demo model is tiny (about 0.1 GMAC at
  224²), so the guard's fixed costs (Python checks, small graph nodes) weigh far more on it.
* ``measures_cost`` — the seven similarity measures (:func:`similarity.batch_scores`) and the
  early-feature score per image, as a fraction of the fused engine's time per image.
* ``speedup_vs_pytorch_gradcam`` — PyTorch eager forward + backward Grad-CAM as pytorch-grad-cam's
  ``GradCAM`` computes it (CAM only, no checks) over gamguard's full guarded call; the smallest
  speedup over the cases (``pytorch_gradcam`` holds each case). pytorch-grad-cam is used when it
  imports; otherwise an equivalent autograd implementation (:func:`_autograd_gradcam`, same hooks,
  same numpy post-processing) and ``pytorch_gradcam.implementation`` says which. Needs torch and the
  bundle's torch checkpoint (``--checkpoint``; the demo bundle's is ``exporter/demo.ckpt``); ``null``
  when either is absent. The torch code lives in :mod:`gamguard.exporter.bench_torch` (the runtime
  never imports torch); it is called only when torch is installed.
* ``grpc_efficiency`` — throughput of a real gRPC server (:class:`BackgroundServer`, loopback,
  plaintext, default serving configuration) driven by 1, 4 and 16 concurrent :class:`GuardClient`
  threads (one channel each, in a separate spawned process, as real clients are) sending encoded PNGs.
  ``ratio`` = that throughput over *in-process guarded calls with the same batching*: the batches the
  server's micro-batcher actually formed in that round, replayed in-process (decode + preprocess +
  :func:`run_guard_batch` per batch, one thread) — what the same work costs without the server.
  ``ratio_vs_inprocess_dataplane`` compares with the same number of concurrent in-process
  :meth:`DataPlane.verify` calls instead (same guard object, same micro-batching configuration and
  decode pool, no metrics/audit): in-process callers wake in lock-step and so form fuller batches
  (``grpc_mean_batch`` / ``inprocess_mean_batch``). p50/p99 are client-side gRPC latencies; the client
  process's CPU per request is recorded too (it shares the machine's cores). Goal: ratio >= 0.85 at
  16 clients. Runs at the bundle's input size.
  Fairness notes: both sides decode the same PNGs with the same code (``decode_bytes`` +
  ``preprocess``) and run the same batches, but throughput on a shared machine still charges the
  server with the client process's CPU (same cores) and with other people's load (consecutive rounds
  differ by 30 % and more on a shared 2-core box), while the replay runs on one thread and the server
  may overlap decoding with the engine on a second core. ``cpu_ratio`` is the load-robust figure:
  CPU time per request of the replay over that of the server process during the gRPC rounds
  (``server_cpu_ms_per_request``: the server runs in this process, the clients in the other one, so
  client work is not included) — the server's own per-request overhead, independent of how many
  cores it managed to get. The server's CPU time and the batches it formed (replayed, and
  ``grpc_mean_batch``) are counted over the timed requests only: the client process signals when its
  channels are connected and warm, and waits for the go.

* ``dicom_efficiency`` — images per second over C-STORE (``gamguard dicom-node``; dcmtk ``storescu``
  processes where installed, else pynetdicom SCUs, started from a spawned process; 1 and 4 concurrent
  associations) over the same DICOM images through gRPC ``Verify`` at the same concurrency, medians of
  interleaved rounds; goal ratio >= 0.7. Beside it, a do-nothing pynetdicom SCP with the same SCUs
  (``null_scp_ips``) and the ratio that leaves if the node added nothing (``ratio_if_node_free``).
  ``dicom.client`` names the SCU. See :mod:`gamguard.runtime.dicomnode.bench`.

GPU: ``providers`` (e.g. ``"cuda"``, ``"tensorrt,cuda"``) selects the ONNX Runtime provider chain for
the guard and the logits-only session alike; the providers actually used are recorded in ``machine``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .common import (
    BenchError,
    LogitsOnly,
    batch_at,
    gpu_name,
    guard_at_size,
    machine_facts,
    phantom_images,
)
from .overhead import arithmetic_of, default_checkpoint, measure_overhead, measure_overhead_large, measure_pytorch
from .serving import measure_grpc

BENCH_FORMAT = "gamguard-bench/1"


SIZES = (224, 512)


BATCHES = (1, 8)


CLIENT_LEVELS = (1, 4, 16)
DICOM_LEVELS = (1, 4)  # concurrent associations of dicom_efficiency (consoles send one image at a time)


GOALS = {"guard_overhead_max": 1.10, "speedup_vs_pytorch_gradcam_min": 4.0, "grpc_efficiency_min_at_16": 0.85}


@dataclass
class BenchConfig:
    bundle: Path | None = None  # None: the embedded demo bundle
    checkpoint: Path | None = None  # torch checkpoint of the same model (PyTorch comparison)
    threads: int = 1  # intra-op threads for ONNX Runtime and torch alike
    providers: str | None = None  # ONNX Runtime provider chain (None: "cpu")
    quick: bool = False
    large: bool = False  # also guard_overhead_large: a realistic-size model (needs torch; slow)
    zoo: bool = False  # also zoo_overhead: fused / logits-only for common architectures (needs torch; slow)
    zoo_width: float | None = 1.0  # width factor of the zoo models (1: real widths; None: reduced test widths)
    sizes: tuple[int, ...] = SIZES
    batches: tuple[int, ...] = BATCHES
    clients: tuple[int, ...] = CLIENT_LEVELS
    repeats: int | None = None  # timed rounds per case (default: 5 quick, 30 full)
    grpc_rounds: int | None = None  # interleaved gRPC / in-process rounds per level (1 quick, 3 full)
    skip: tuple[str, ...] = ()  # sections to skip: "pytorch", "grpc", "dicom"
    dicom_client: str = "auto"  # C-STORE client of dicom_efficiency: auto (storescu if installed), storescu, pynetdicom
    dicom_size: int | None = None  # dicom_efficiency's images resampled to this side (None: the phantoms' 256)
    arithmetic: str | None = None  # where the checks' arithmetic runs: auto (default), graph, host
    progress: Callable[[str], None] | None = None  # progress lines (the CLI prints them to stderr)

    @property
    def n_repeats(self) -> int:
        return self.repeats or (5 if self.quick else 30)

    @property
    def n_grpc_rounds(self) -> int:
        return self.grpc_rounds or (1 if self.quick else 3)


def run_bench(cfg: BenchConfig) -> dict:
    """Every measurement of ``gamguard bench``; returns the JSON-able result (see module docstring).

    numpy's BLAS gets the same thread count as ONNX Runtime and torch (``--threads``): its idle
    worker threads otherwise keep spinning after a numpy call and slow the ONNX Runtime call timed
    next in the interleaved loop.
    """
    try:
        from threadpoolctl import threadpool_limits  # installed with scikit-learn
    except ImportError:  # pragma: no cover - depends on the environment
        return _run_bench(cfg)
    with threadpool_limits(limits=cfg.threads or None, user_api="blas"):
        return _run_bench(cfg)


def _run_bench(cfg: BenchConfig) -> dict:
    from gamguard.runtime.bundle import resolve_bundle
    from gamguard.runtime.engines import resolve_providers
    from gamguard.runtime.guard import Guard

    progress = cfg.progress or (lambda msg: None)
    started = time.perf_counter()
    bundle_dir = resolve_bundle(cfg.bundle)
    providers = resolve_providers(cfg.providers or "cpu")
    facts = machine_facts(cfg.threads)
    progress(
        f"bundle {bundle_dir}, providers {providers}, threads {cfg.threads}, {'quick' if cfg.quick else 'full'} run"
    )
    guard = Guard.from_bundle(
        bundle_dir, providers=providers, threads=cfg.threads, prefer="onnxruntime", arithmetic=cfg.arithmetic
    )
    used = arithmetic_of(guard)
    # the same bundle with the checks' arithmetic on the other side, timed alongside (see guard_arithmetic)
    alternative = Guard.from_bundle(
        bundle_dir,
        providers=providers,
        threads=cfg.threads,
        prefer="onnxruntime",
        arithmetic="host" if used == "graph" else "graph",
    )
    facts["providers_used"] = list(guard.engine.providers)
    if any(p != "CPUExecutionProvider" for p in guard.engine.providers):
        facts["gpu"] = gpu_name()
    logits_only = LogitsOnly.for_engine(guard.engine, cfg.threads)
    facts["cuda_graphs"] = logits_only.cuda_graphs
    facts["logits_only_providers"] = list(logits_only.session(guard.spec.height).get_providers())

    bundle_size = guard.spec.height
    if logits_only.dynamic:
        sizes, sizes_note = tuple(cfg.sizes), "input height/width are dynamic: measured at the requested sizes"
    else:
        sizes = (bundle_size,)
        sizes_note = (
            f"the bundle's model.onnx has a static {guard.spec.height}x{guard.spec.width} input "
            f"(exported without --dynamic-spatial): measured at that size only, not at "
            f"{', '.join(f'{s}x{s}' for s in cfg.sizes)}"
        )
        progress(sizes_note)
    images = phantom_images(max(max(cfg.batches), 16))
    # the logits-only model must be the fused model's classifier, exactly
    x = batch_at(images, guard.spec, sizes[0], 2)
    got = guard_at_size(guard, sizes[0]).engine.run(x).logits
    diff = float(np.abs(logits_only.session(sizes[0]).run(["logits"], {"image": x})[0] - got).max())
    if diff > 1e-4:
        raise RuntimeError(f"the logits-only model disagrees with the fused model (max diff {diff:.3g})")

    overhead, measures = measure_overhead(
        guard, logits_only, images, sizes, cfg.batches, cfg.n_repeats, progress, alternative=alternative
    )
    del alternative
    result = {
        "format": BENCH_FORMAT,
        "quick": cfg.quick,
        "bundle": str(bundle_dir),
        "bundle_input_size": [guard.spec.height, guard.spec.width],
        "sizes": list(sizes),
        "sizes_note": sizes_note,
        "machine": facts,
        "goals": dict(GOALS),
        "guard_overhead": overhead,
        "guard_arithmetic": arithmetic_summary(used, cfg.arithmetic, providers, overhead),
        "measures_cost": measures,
    }
    if cfg.large:
        result["guard_overhead_large"] = measure_overhead_large(cfg, list(guard.engine.providers), progress)
    if cfg.zoo:
        result["zoo_overhead"] = measure_zoo_overhead(cfg, list(guard.engine.providers), progress)
    if "pytorch" in cfg.skip:
        pt = {"status": "skipped", "reason": "--skip pytorch"}
    else:
        ckpt = cfg.checkpoint or default_checkpoint(bundle_dir)
        pt = measure_pytorch(guard, ckpt, images, sizes, cfg.batches, max(3, cfg.n_repeats // 2), cfg.threads, progress)
    result["pytorch_gradcam"] = pt
    result["speedup_vs_pytorch_gradcam"] = (
        min(r["speedup"] for r in pt["cases"]) if pt.get("status") == "measured" else None
    )
    if "grpc" in cfg.skip:
        result["grpc_efficiency"] = []
        result["grpc"] = {"status": "skipped"}
    else:
        grpc = measure_grpc(guard, bundle_dir, images, cfg.clients, cfg.n_grpc_rounds, cfg.quick, progress)
        result["grpc_efficiency"] = grpc.pop("rows")
        result["grpc"] = grpc
    if "dicom" in cfg.skip:
        result["dicom_efficiency"] = []
        result["dicom"] = {"status": "skipped"}
    else:
        from gamguard.runtime.dicomnode.bench import measure_dicom

        dicom = measure_dicom(
            guard, bundle_dir, images, DICOM_LEVELS, cfg.quick, progress, cfg.dicom_client, cfg.dicom_size
        )
        result["dicom_efficiency"] = dicom.pop("rows")
        result["dicom"] = dicom
    facts["load_avg_end"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def arithmetic_summary(used: str, requested: str | None, providers: list[str], overhead: list[dict]) -> dict:
    """``guard_arithmetic``: which side computed the checks' arithmetic in ``guard_overhead`` (and in
    every other section), why, and which side was faster per case in this run."""
    from gamguard.runtime.checks.graph import ARITHMETIC_ENV

    how = requested or os.environ.get(ARITHMETIC_ENV) or "auto"
    faster = {
        f"{r['size']}x{r['batch']}": (
            r["arithmetic"] if r["guarded_ms"] <= r["alternative_ms"] else r["alternative_arithmetic"]
        )
        for r in overhead
        if "alternative_ms" in r
    }
    return {
        "used": used,
        "requested": how,
        "providers": list(providers),
        "rule": "auto = graph on every provider (host = the numpy reference)",
        "faster_in_this_run": faster,
    }


def measure_zoo_overhead(cfg: BenchConfig, providers: list[str], progress) -> dict:
    """Fused / logits-only ONNX Runtime time for every architecture of the exporter's zoo, at the
    first bench size (224 by default); torch exports the models, so this needs the exporter extra."""
    try:
        from gamguard.exporter.bench_zoo import measure_zoo  # torch lives on the exporter side
    except ImportError as exc:
        return {"status": "skipped", "reason": f"needs the exporter extra (torch): {exc}", "rows": []}
    repeats = cfg.repeats or 10  # each round runs seven models
    return measure_zoo(cfg.sizes[0], cfg.batches, repeats, cfg.threads, providers, cfg.zoo_width, progress)


def format_tables(result: dict) -> str:
    """Human-readable tables of a :func:`run_bench` result."""

    def ms(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    def overhead_row(r: dict) -> str:  # a guard_overhead / guard_overhead_large row
        return (
            f"{r['size']:>6} {r['batch']:>5} {r['ratio']:>7.3f} {r.get('ratio_of_minima', float('nan')):>9.3f} "
            f"{r['guarded_ms']:>11.2f} "
            f"{r['logits_only_ms']:>10.2f} {ms(r.get('fused_engine_ms')):>9} {ms(r.get('graph_ms')):>9} "
            f"{r['checks_ms']:>10.2f} {r['decision_ms']:>12.2f} {ms(r.get('heatmaps_ms')):>11} "
            f"{r.get('ratio_with_heatmaps', float('nan')):>12.3f}"
            + (f" {r['alternative_ratio']:>11.3f}" if "alternative_ratio" in r else "")
        )

    m = result["machine"]
    lines = [
        f"gamguard bench ({'quick' if result['quick'] else 'full'}) — {m['cpu_model']}, "
        f"{m['cpus_usable']} CPU(s), onnxruntime {m['onnxruntime']} {m['providers_used']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + (", CUDA graphs (both sides)" if m.get("cuda_graphs") else "")
        + f", threads {m['threads']}, "
        f"load {m['load_avg_start'][0]} → {m.get('load_avg_end', ['?'])[0]}",
        f"bundle {result['bundle']} (input {result['bundle_input_size'][0]}²); {result['sizes_note']}",
        "",
        f"Guard overhead (goal ≤ {GOALS['guard_overhead_max']:.2f}×): full guarded call / logits-only ORT",
        "  (fused = the fused engine alone; graph = what the guard subgraph adds to it; checks = numpy's 7 "
        "measures + feature score (part of the call with host arithmetic); decision = the rest: p-values, "
        "decision, verdicts); 'min ratio' = of the fastest calls of the same rounds (load only adds time: "
        "a large gap to 'ratio' means a noisy run); the guarded engine leaves the full-size heatmaps to the "
        "host, computed only for a call that returns them: 'heatmaps ms' = all of the batch's, "
        "'+heatmaps' = the ratio of such a call ('-': the engine computes them)",
    ]
    arith = result.get("guard_arithmetic")
    if arith:
        other = "host" if arith["used"] == "graph" else "graph"
        lines.append(
            f"  checks' arithmetic: {arith['used']} ({arith['requested']}; {arith['rule']}); "
            f"'{other} ratio' = the same call with the arithmetic on the {other} side; faster in this run: "
            + ", ".join(f"{k}: {v}" for k, v in arith["faster_in_this_run"].items())
        )
    lines.append(
        f"{'size':>6} {'batch':>5} {'ratio':>7} {'min ratio':>9} {'guarded ms':>11} {'logits ms':>10} {'fused ms':>9} "
        f"{'graph ms':>9} {'checks ms':>10} {'decision ms':>12} {'heatmaps ms':>11} {'+heatmaps':>12}"
        + (f" {('graph' if arith['used'] == 'host' else 'host') + ' ratio':>11}" if arith else "")
    )
    lines += [overhead_row(r) for r in result["guard_overhead"]]
    large = result.get("guard_overhead_large")
    if large is not None:
        lines += [
            "",
            "Guard overhead, realistic-size model (GuardNet widths "
            f"{large.get('model', {}).get('widths')}, {large.get('model', {}).get('blocks')} blocks/stage; "
            f"{large.get('weights', '')})"
            if large.get("status") == "measured"
            else f"Guard overhead, realistic-size model: not measured: {large.get('reason')}",
        ]
        lines += [overhead_row(r) for r in large.get("rows", [])]
    zoo = result.get("zoo_overhead")
    if zoo is not None:
        lines += [
            "",
            f"Zoo: fused / logits-only ONNX Runtime call (goal ≤ {GOALS['guard_overhead_max']:.2f}×), "
            f"{zoo.get('weights', '')}; "
            + (
                "real widths"
                if zoo.get("width") == 1
                else "REDUCED test widths (tiny models: pessimistic ratios)"
                if zoo.get("width") is None
                else f"width factor {zoo.get('width')}"
            ),
        ]
        if zoo.get("status") == "measured":
            lines += [
                "  fused = the graph the engine serves (it stops at the small Grad-CAM map); ratio of the medians;",
                "  'min ratio' = of the fastest calls of the same rounds (load only adds time: a large gap between",
                "  the two means a noisy run); '+heatmaps' = a call that also returns every image's full-size",
                "  heatmap, computed on the host; 'exported' = model.onnx as exported (full-size heatmap in the graph)",
            ]
            lines.append(
                f"{'model':<20} {'head':<10} {'params':>7} {'size':>5} {'batch':>5} {'ratio':>7} {'min ratio':>9} "
                f"{'+heatmaps':>9} {'exported':>8} {'fused ms':>9} {'logits ms':>10}"
            )
            nan = float("nan")  # rows of an older bench JSON lack the newer columns
            for r in zoo["rows"]:
                lines.append(
                    f"{r['model']:<20} {r['head_kind']:<10} {r['params'] / 1e6:>6.1f}M {r['size']:>5} {r['batch']:>5} "
                    f"{r['ratio']:>7.3f} {r.get('ratio_of_minima', nan):>9.3f} "
                    f"{r.get('ratio_with_heatmaps', nan):>9.3f} {r.get('ratio_as_exported', nan):>8.3f} "
                    f"{r['fused_ms']:>9.2f} {r['logits_only_ms']:>10.2f}"
                )
        else:
            lines.append(f"  not measured: {zoo.get('reason')}")
    lines += [
        "",
        "Measures cost per image (7 similarity measures + early-feature check) / fused engine time",
        f"{'size':>6} {'batch':>5} {'measures ms':>12} {'feature ms':>11} {'engine ms':>10} {'fraction':>9}",
    ]
    for r in result["measures_cost"]:
        lines.append(
            f"{r['size']:>6} {r['batch']:>5} {r['measures_ms_per_image']:>12.3f} "
            f"{r['feature_ms_per_image']:>11.3f} {r['engine_ms_per_image']:>10.3f} "
            f"{r['fraction_of_engine']:>9.3f}"
        )
    pt = result["pytorch_gradcam"]
    lines += [
        "",
        f"PyTorch eager Grad-CAM vs gamguard full guarded call (goal ≥ {GOALS['speedup_vs_pytorch_gradcam_min']:.0f}×)",
    ]
    if pt.get("status") == "measured":
        lines.append(f"  {pt['implementation']}; torch {pt['torch']}, {pt['torch_threads']} thread(s)")
        lines.append(f"{'size':>6} {'batch':>5} {'speedup':>8} {'pytorch ms':>11} {'gamguard ms':>12}")
        for r in pt["cases"]:
            lines.append(
                f"{r['size']:>6} {r['batch']:>5} {r['speedup']:>8.2f} {r['pytorch_ms']:>11.2f} "
                f"{r['gamguard_ms']:>12.2f}"
            )
    else:
        lines.append(f"  not measured: {pt.get('reason')}")
    lines += [
        "",
        f"gRPC serving efficiency (goal ≥ {GOALS['grpc_efficiency_min_at_16']:.2f} at 16 clients): "
        "gRPC server throughput / in-process throughput",
    ]
    if result["grpc_efficiency"]:
        g = result["grpc"]
        lines.append(
            f"  {g['input']} → {g['size']}², max batch {g['max_batch_size']}, queue delay {g['max_queue_delay_ms']} ms"
        )
        lines.append(
            "  ratio = gRPC / in-process guarded calls on the server's own batches; "
            "ratio DP = gRPC / in-process DataPlane, same concurrency;"
        )
        lines.append(
            "  CPU ratio = same-batch replay CPU per request / server process CPU per request (clients excluded)"
        )
        lines.append(
            f"{'clients':>7} {'ratio':>7} {'ratio DP':>8} {'CPU ratio':>9} {'gRPC req/s':>11} "
            f"{'same-batch':>11} {'DP req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'batch g/DP':>10} "
            f"{'CPU ms/req srv/replay/client':>29}"
        )
        for r in result["grpc_efficiency"]:
            cpu_ratio = r.get("cpu_ratio")
            lines.append(
                f"{r['clients']:>7} {r['ratio']:>7.3f} {r['ratio_vs_inprocess_dataplane']:>8.3f} "
                f"{cpu_ratio if cpu_ratio is not None else float('nan'):>9.3f} "
                f"{r['grpc_rps']:>11.1f} {r['same_batches_rps']:>11.1f} {r['inprocess_rps']:>9.1f} "
                f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
                f"{r['grpc_mean_batch']:>4.1f}/{r['inprocess_mean_batch']:<4.1f} "
                f"{r.get('server_cpu_ms_per_request', float('nan')):>11.2f}/"
                f"{r.get('same_batches_cpu_ms_per_request', float('nan')):.2f}/"
                f"{r['client_cpu_ms_per_request']:.2f}"
            )
    else:
        lines.append("  skipped")
    lines += ["", "DICOM node efficiency (goal ≥ 0.70): C-STORE images/s / gRPC Verify images/s, same DICOM images"]
    if result.get("dicom_efficiency"):
        lines.append("  CPU ratio = gRPC server CPU per image / DICOM node CPU per image (clients excluded)")
        image = result["dicom"].get("image") or {}
        lines.append(
            f"  C-STORE client: {result['dicom'].get('client', '?')}; images: DX {image.get('rows')}x"
            f"{image.get('columns')}, {image.get('bits')} bits, {(image.get('bytes') or 0) / 1e3:.0f} kB"
        )
        lines.append("  pynetdicom alone = img/s of a do-nothing pynetdicom SCP with the same SCUs")
        lines.append("  if node free = estimated ratio if the node added nothing to that and to the verification")
        lines.append(
            f"{'assocs':>7} {'ratio':>7} {'if node free':>12} {'CPU ratio':>9} {'C-STORE img/s':>14} "
            f"{'gRPC img/s':>11} {'pynetdicom alone':>16} {'p50 ms C/g':>12} {'CPU ms/img C/g':>15} "
            f"{'client CPU C/g':>15}"
        )
        for r in result["dicom_efficiency"]:
            lines.append(
                f"{r['associations']:>7} {r['ratio']:>7.3f} {r['ratio_if_node_free']:>12.3f} {r['cpu_ratio']:>9.3f} "
                f"{r['cstore_ips']:>14.1f} {r['grpc_ips']:>11.1f} {r['null_scp_ips']:>16.1f} "
                f"{r['cstore_p50_ms']:>6.1f}/{r['grpc_p50_ms']:<5.1f} "
                f"{r['cstore_cpu_ms']:>7.2f}/{r['grpc_cpu_ms']:<6.2f} "
                f"{r['cstore_client_cpu_ms']:>7.2f}/{r['grpc_client_cpu_ms']:<6.2f}"
            )
        d = result["dicom"]
        lines.append(
            f"  journal write (file + folder fsync, overlapped with the verification) {d['durable_write_ms']:.1f} ms "
            f"per image on this disk; SR + overlay built after the association: "
            f"{d['results_ms_per_image']} ms per image"
        )
    else:
        lines.append("  skipped")
    lines.append(f"\n({result['seconds']} s)")
    return "\n".join(lines)


__all__ = ["BENCH_FORMAT", "BenchConfig", "BenchError", "format_tables", "run_bench"]
