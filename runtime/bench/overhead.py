"""What the guard costs on top of the classifier: the guarded call over a logits-only session of the same
model (``guard_overhead``, ``guard_overhead_large``) and PyTorch eager Grad-CAM over it
(``speedup_vs_pytorch_gradcam``; the torch half is :mod:`gamguard.exporter.bench_torch`).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np

from .common import (
    LARGE_CASES,
    LARGE_MODEL,
    LogitsOnly,
    batch_at,
    guard_at_size,
    interleaved,
    median_ms,
    phantom_images,
)


def arithmetic_of(guard) -> str:
    """Where ``guard`` computes the checks' arithmetic: ``graph`` (in the engine) or ``host`` (numpy)."""
    return "graph" if getattr(guard.engine, "guarded", False) else "host"


def measure_overhead(
    guard, logits_only, images, sizes, batches, repeats, progress, alternative=None
) -> tuple[list, list]:
    """``guard_overhead`` and ``measures_cost`` rows, from one interleaved loop per case.

    ``logits_only``: the baseline (:class:`~.common.LogitsOnly`). At every size both sides run a
    session for that size (:func:`~.common.guard_at_size`): a dynamic-H/W bundle's engine is fixed to
    the size it serves, as a bundle exported at that size would be.

    ``alternative``: the same bundle loaded with the checks' arithmetic on the other side (graph vs
    host, :mod:`gamguard.runtime.checks.graph`), timed in the same interleaved loop; each row then
    also says what the guarded call costs that way (``alternative_ms``, ``alternative_ratio``)."""
    from gamguard.runtime.similarity import batch_scores

    cal = guard.calibration
    overhead, measures = [], []
    for size in sizes:
        g = guard_at_size(guard, size)
        alt = guard_at_size(alternative, size) if alternative is not None else None
        logits_session = logits_only.session(size)
        for n in batches:
            x = batch_at(images, guard.spec, size, n)
            out = g.engine.run(x)
            deferred = out.cam_maps()  # the engine leaves the full-size heatmaps to the host (computed when read)
            real = cal.real
            pred_real_pos = np.asarray(out.logits, np.float64)[:, real].argmax(axis=1)
            refs = cal.ref_prepared[pred_real_pos]
            verdicts = g.verify_tensor(x)
            errors = [v.detail for v in verdicts if "GUARD_ERROR" in v.reasons or "INVALID_INPUT" in v.reasons]
            if errors:
                raise RuntimeError(f"guarded call failed at {size}x{size}, batch {n}: {errors[0]}")
            mode = arithmetic_of(guard)
            # the plain fused model and, with the graph arithmetic, the fused model + guard subgraph
            engines = {mode: g.engine}
            if alt is not None:
                engines[arithmetic_of(alternative)] = alt.engine
            variants = {
                "logits_only": lambda: logits_session.run(["logits"], {"image": x}),
                "guarded": lambda: g.verify_tensor(x),
                "measures": lambda: batch_scores(out.cam, refs, grid=cal.grid),
                "feature": lambda: cal.feature_ref.score(out.early),
                **{f"engine_{k}": (lambda e=e: e.run(x)) for k, e in engines.items()},
            }
            if alt is not None:
                variants["alternative"] = lambda: alt.verify_tensor(x)
            if deferred is not None:  # what a call that returns every image's heatmap adds
                variants["heatmaps"] = deferred
            t = interleaved(variants, repeats)
            ms = {k: median_ms(v) for k, v in t.items()}
            ratio = ms["guarded"] / ms["logits_only"]
            checks = ms["measures"] + ms["feature"]
            fused = ms.get("engine_host")  # the plain fused model (None: graph guard without an alternative)
            row = {
                "batch": n,
                "size": size,
                "ratio": round(ratio, 4),
                # of the fastest calls in the same rounds: load from other processes only adds time
                "ratio_of_minima": round(min(t["guarded"]) / min(t["logits_only"]), 4),
                "arithmetic": mode,
                "guarded_ms": round(ms["guarded"], 3),
                "logits_only_ms": round(ms["logits_only"], 3),
                "fused_engine_ms": None if fused is None else round(fused, 3),
                "fused_engine_ratio": None if fused is None else round(fused / ms["logits_only"], 4),
                # the fused model with the guard subgraph (graph arithmetic), and what the subgraph adds
                "graph_engine_ms": round(ms["engine_graph"], 3) if "engine_graph" in ms else None,
                # (less the full-size CAM, which the guarded engine leaves to the host: heatmaps_ms)
                "graph_ms": round(ms["engine_graph"] - fused, 3) if "engine_graph" in ms and fused else None,
                # the batch's full-size heatmaps computed on the host, for a call that returns them (None:
                # the engine computes them); ratio_with_heatmaps: that call / logits-only
                "heatmaps_ms": round(ms["heatmaps"], 3) if "heatmaps" in ms else None,
                "ratio_with_heatmaps": round((ms["guarded"] + ms.get("heatmaps", 0.0)) / ms["logits_only"], 4),
                # host arithmetic: the numpy measures + feature score (part of the call only on the host side)
                "checks_ms": round(checks, 3),
                # the rest of the guarded call: p-values, decision, verdict objects
                "decision_ms": round(ms["guarded"] - ms[f"engine_{mode}"] - (checks if mode == "host" else 0.0), 3),
                "repeats": repeats,
            }
            if alt is not None:
                row.update(
                    alternative_arithmetic=arithmetic_of(alternative),
                    alternative_ms=round(ms["alternative"], 3),
                    alternative_ratio=round(ms["alternative"] / ms["logits_only"], 4),
                )
            overhead.append(row)
            engine_ms = fused if fused is not None else ms[f"engine_{mode}"]
            measures.append(
                {
                    "batch": n,
                    "size": size,
                    "measures_ms_per_image": round(ms["measures"] / n, 4),
                    "feature_ms_per_image": round(ms["feature"] / n, 4),
                    "engine_ms_per_image": round(engine_ms / n, 4),
                    "fraction_of_engine": round(checks / engine_ms, 4),
                }
            )
            progress(
                f"{size}x{size} batch {n}: guarded ({row['arithmetic']} arithmetic) {ms['guarded']:.2f} ms, "
                f"logits-only {ms['logits_only']:.2f} ms (x{ratio:.3f}); measures+feature {checks:.3f} ms"
                + (
                    f"; {row['alternative_arithmetic']} arithmetic {ms['alternative']:.2f} ms "
                    f"(x{row['alternative_ratio']:.3f})"
                    if alt is not None
                    else ""
                )
            )
    return overhead, measures


def measure_overhead_large(cfg, providers: list[str], progress) -> dict:
    """``guard_overhead_large``: the ``guard_overhead`` measurement on :data:`LARGE_MODEL` (random
    weights, see :func:`build_large_bundle`), at :data:`LARGE_CASES`. Skipped without torch."""
    if importlib.util.find_spec("torch") is None:
        return {"status": "skipped", "reason": "torch is not installed (the large model is exported here)"}
    from gamguard.exporter.bench_torch import build_large_bundle  # torch lives on the exporter side
    from gamguard.runtime.guard import Guard

    with tempfile.TemporaryDirectory(prefix="gamguard-bench-large-") as tmp:
        bundle = build_large_bundle(Path(tmp), cfg.threads, progress)
        guard = Guard.from_bundle(bundle, providers=providers, threads=cfg.threads, prefer="onnxruntime")
        logits_only = LogitsOnly.for_engine(guard.engine, cfg.threads)
        images = phantom_images(max(b for _, b in LARGE_CASES))
        rows = []
        for size, n in LARGE_CASES:
            if size not in cfg.sizes or n not in cfg.batches:
                continue
            part, _ = measure_overhead(guard, logits_only, images, (size,), (n,), min(cfg.n_repeats, 5), progress)
            rows += part
    return {
        "status": "measured",
        "weights": "random (seeded): timings only, verdicts meaningless",
        "model": {
            "class": "GuardNet",
            **{k: list(v) if isinstance(v, tuple) else v for k, v in LARGE_MODEL.items()},
            "target_layer": "layer3",
            "early_layer": "layer1",
            "early_pool": [8, 8],
        },
        "rows": rows,
    }


def default_checkpoint(bundle_dir: Path) -> Path | None:
    """The demo bundle's torch checkpoint (``exporter/demo.ckpt``) when the bundle is the demo bundle."""
    from gamguard.runtime.bundle import default_bundle_dir

    if Path(bundle_dir).resolve() == default_bundle_dir().resolve():
        ckpt = Path(__file__).resolve().parents[2] / "exporter" / "demo.ckpt"  # gamguard/exporter
        return ckpt if ckpt.is_file() else None
    return None


def measure_pytorch(guard, checkpoint: Path | None, images, sizes, batches, repeats, threads, progress) -> dict:
    """``pytorch_gradcam`` section (see :func:`gamguard.exporter.bench_torch.measure_pytorch`); the
    runtime itself never imports torch, so the measurement lives on the exporter side."""
    if checkpoint is None:
        return {"status": "skipped", "reason": "no torch checkpoint for this bundle (--checkpoint)"}
    if importlib.util.find_spec("torch") is None:
        return {"status": "skipped", "reason": "torch is not installed"}
    from gamguard.exporter.bench_torch import measure_pytorch as measure

    return measure(guard, checkpoint, images, sizes, batches, repeats, threads, progress)
