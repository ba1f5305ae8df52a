"""``gamguard bench --zoo``: what the fused graph costs for common architectures (needs torch).

For every model of :mod:`gamguard.exporter.zoo` (random weights, batch-norm statistics randomised as
after training; 1 input channel): export the fused model with :func:`gamguard.exporter.export_bundle`
at the bench size, cut the logits-only classifier out of it (the same graph surgery as
``guard_overhead``) and time both with ONNX Runtime, interleaved, at each batch size. The ratio is
fused / logits-only: the price of the in-graph gradient, Grad-CAM map and early features.
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
            fused = ort_session(bundle / "model.onnx", providers, threads)
            logits_only = ort_session(logits_only_model(bundle / "model.onnx", bundle), providers, threads)
            params = sum(p.numel() for p in model.parameters())
            for n in batches:
                x = rng.standard_normal((n, 1, size, size)).astype(np.float32)
                variants = {
                    "fused": lambda: fused.run(None, {"image": x}),
                    "logits": lambda: logits_only.run(["logits"], {"image": x}),
                }
                rounds = rounds_for(variants, repeats)
                times = interleaved(variants, rounds)
                f, lo = median_ms(times["fused"]), median_ms(times["logits"])
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
                        "rounds": rounds,
                    }
                )
                progress(
                    f"zoo: {name} batch {n}: fused {f:.1f} ms, logits-only {lo:.1f} ms, ratio {f / lo:.3f} "
                    f"(fastest calls: {ratio_min:.3f}; {rounds} rounds)"
                )
    return {
        "status": "measured",
        "weights": "random (seeded): timings only",
        "width": width,
        "rows": rows,
        "exports": exports,
    }
