"""``gamguard bench --zoo``: what the fused graph costs for common architectures (needs torch).

For every model of :mod:`gamguard.exporter.zoo` (random weights, batch-norm statistics randomised as
after training; 1 input channel): export the fused model with :func:`gamguard.exporter.export_bundle`
at the bench size, cut the logits-only classifier out of it (the same graph surgery as
``guard_overhead``) and time, interleaved with ONNX Runtime at each batch size:

* the fused call as the runtime serves it: the graph an engine runs for a guarded bundle
  (:func:`gamguard.runtime.engines.onnx.serving_graph`), which stops at the small Grad-CAM map and leaves
  the full-size heatmap to the host for the images whose heatmap a client reads (the guard's checks read
  the small map; ``guard_overhead`` measures the same way);
* the fused model as exported (``model.onnx``: the full-size heatmap computed in the graph);
* the logits-only classifier.

The ratio is served fused / logits-only: the price of the in-graph gradient, Grad-CAM map and early
features. ``heatmaps_ms`` is what computing every image's full-size heatmap on the host adds, and
``ratio_with_heatmaps`` a call that returns them all; ``ratio_as_exported`` the exported model's.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from gamguard.runtime.bench.common import interleaved, logits_only_model, median_ms, ort_session

# A 2 ms model timed in 15 rounds gives a median ratio that moves by several per cent between runs:
# each case is timed for at least `repeats` rounds and about this many seconds (capped).
MIN_CASE_SECONDS = 1.0
MAX_ROUNDS = 1000


def rounds_for(variants: dict, repeats: int) -> int:
    """Interleaved rounds for one case: at least ``repeats``, and enough for about
    :data:`MIN_CASE_SECONDS` of calls (one round timed after a warm-up round), at most :data:`MAX_ROUNDS`."""
    for call in variants.values():
        call()
    t0 = time.perf_counter()
    for call in variants.values():
        call()
    per_round = time.perf_counter() - t0
    return max(repeats, min(MAX_ROUNDS, int(MIN_CASE_SECONDS / max(per_round, 1e-9))))


def _randomise_batchnorm(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def measure_zoo(
    size: int, batches, repeats: int, threads: int, providers: list[str], width: float | None, progress
) -> dict:
    """Rows ``{model, head_kind, size, batch, fused_ms, logits_only_ms, ratio, ratio_of_minima, rounds}`` for
    every zoo model (``ratio``: of the medians; ``ratio_of_minima``: of the fastest calls, less sensitive to
    load; ``rounds``: interleaved rounds timed, at least ``repeats``, more for fast models: :func:`rounds_for`)."""
    import torch

    from gamguard.exporter.export import export_bundle
    from gamguard.exporter.zoo import ZOO

    torch.manual_seed(0)
    rows, exports = [], []
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="gamguard-bench-zoo-") as tmp:
        for i, (name, build) in enumerate(ZOO.items()):
            model, target, early = build(3, 1) if width is None else build(3, 1, width=width)
            _randomise_batchnorm(model, i)
            model.eval()
            t0 = time.perf_counter()
            progress(f"zoo: exporting {name} at {size}² ...")
            bundle = Path(tmp) / name
            manifest = export_bundle(
                model,
                bundle,
                class_names=["a", "b", "garbage"],
                garbage_class=2,
                target_layer=target,
                early_layer=early,
                input_shape=(1, size, size),
                normalization=([0.5], [0.25]),
                model_name=name,
            )
            exports.append({"model": name, "seconds": round(time.perf_counter() - t0, 1)})
            exported = ort_session(bundle / "model.onnx", providers, threads)
            served, heatmaps = _served_session(bundle / "model.onnx", providers, threads)
            logits_only = ort_session(logits_only_model(bundle / "model.onnx", bundle), providers, threads)
            params = sum(p.numel() for p in model.parameters())
            for n in batches:
                x = rng.standard_normal((n, 1, size, size)).astype(np.float32)
                variants = {
                    "fused": lambda: served.run(None, {"image": x}),
                    "exported": lambda: exported.run(None, {"image": x}),
                    "logits": lambda: logits_only.run(["logits"], {"image": x}),
                }
                if heatmaps is not None:
                    variants["heatmaps"] = heatmaps(served.run(None, {"image": x}))
                rounds = rounds_for(variants, repeats)
                times = interleaved(variants, rounds)
                f, lo = median_ms(times["fused"]), median_ms(times["logits"])
                heat = median_ms(times["heatmaps"]) if heatmaps is not None else 0.0
                exported_ms = median_ms(times["exported"])
                # load from other processes only adds time: the ratio of the fastest calls is the
                # noise check on the median ratio (both from the same interleaved rounds)
                ratio_min = min(times["fused"]) / min(times["logits"])
                rows.append(
                    {
                        "model": name,
                        "head_kind": manifest["export"]["head_kind"],
                        "params": int(params),
                        "target_layer": target,
                        "size": size,
                        "batch": n,
                        "fused_ms": round(f, 3),
                        "logits_only_ms": round(lo, 3),
                        "ratio": round(f / lo, 4),
                        "ratio_of_minima": round(ratio_min, 4),
                        # the full-size heatmaps: left to the host (null: the graph computes them)
                        "heatmaps_ms": round(heat, 3) if heatmaps is not None else None,
                        "ratio_with_heatmaps": round((f + heat) / lo, 4),
                        "exported_ms": round(exported_ms, 3),
                        "ratio_as_exported": round(exported_ms / lo, 4),
                        "rounds": rounds,
                    }
                )
                progress(
                    f"zoo: {name} batch {n}: fused {f:.1f} ms, logits-only {lo:.1f} ms, ratio {f / lo:.3f} "
                    f"(fastest calls: {ratio_min:.3f}; with heatmaps {(f + heat) / lo:.3f}; as exported "
                    f"{exported_ms / lo:.3f}; {rounds} rounds)"
                )
    return {
        "status": "measured",
        "weights": "random (seeded): timings only",
        "width": width,
        "rows": rows,
        "exports": exports,
    }


def _served_session(model: Path, providers: list[str], threads: int | None):
    """``(session, heatmaps)``: the fused graph an engine serves for a guarded bundle (the exported model
    when nothing is rewritten) and, when the engine stops at the small map, ``heatmaps(outputs)``: a
    call computing every image's full-size heatmap from that session's outputs on the host (else None)."""
    import onnxruntime as ort

    from gamguard.runtime.engines import provider_entries, session_options
    from gamguard.runtime.engines.base import ResizedMaps
    from gamguard.runtime.engines.onnx import serving_graph

    source, _, resize = serving_graph(str(model), model, None, defer_cam=True)
    session = ort.InferenceSession(source, sess_options=session_options(threads), providers=provider_entries(providers))
    if resize is None:
        return session, None
    small_name, *matrices = resize
    index = [o.name for o in session.get_outputs()].index(small_name)
    return session, lambda outputs: ResizedMaps(np.asarray(outputs[index], np.float32), *matrices)
