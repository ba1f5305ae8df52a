"""Fix a dynamic-H/W fused model to the one input size it serves, so ONNX Runtime can fold its shape arithmetic.

A bundle exported with ``--dynamic-spatial`` computes, on every call, what depends on the input size:
the CAM's bilinear interpolation matrices, the early features' averaging matrices and (with the guard
subgraph, :mod:`gamguard.runtime.checks.graph`) the comparison grid's resampling matrices — a few
dozen small nodes (``Shape`` → ``Range`` → comparisons → ``Resize`` of an identity …) whose fixed cost
per node weighs on small models at batch 1. The guard only ever runs a bundle at its input spec's size
(:meth:`gamguard.runtime.guard.Guard.verify_tensor` refuses any other), so the engine fixes the input's
height and width there (the batch axis stays dynamic) and replaces every ``Shape`` of the input whose
sliced dims are now static by a constant. ONNX Runtime's constant folding then turns those chains into
constant matrices when the session is created: same graph, same numbers, fewer nodes per call.

Once the size is fixed, the early features' pooling is a plain average over equal windows whenever
the grid divides the early map: :func:`pool_early_with_average_pool` then swaps the exporter's two
averaging-matrix MatMuls (the only form a dynamic size allows) for one ``AveragePool``, which ONNX
Runtime runs in its convolutions' blocked channel layout. The MatMul pair re-reads the full-size
early map through a badly shaped GEMM (N = the grid's 8 columns) after reordering it out of that
layout: on the demo model at batch 8 it was about half of what the fused outputs add to the
classifier's own time (224²: ~1.7 ms of ~3.6 ms; 512²: ~6 ms of ~11 ms, ONNX Runtime profile).

The model on disk is unchanged (and still dynamic: a TensorRT plan with a spatial profile, or another
size, is built from it as before); only the session's copy is specialised.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .base import INPUT_NAME, EngineError

log = logging.getLogger(__name__)

#: Channel counts an ``AveragePool`` is used for: ONNX Runtime's CPU convolutions keep activations in a
#: blocked layout of 8 (AVX2) or 16 (AVX-512) channels and pool them there only when the channel count
#: is a multiple of the block; otherwise the pool runs on plain NCHW after a reorder, and its plain
#: kernel is slow for large windows (28x28 windows of an 8-channel 224² map: 5 ms at batch 8), where
#: the two averaging-matrix products are cheaper. The exporter imports this rule for static sizes.
POOL_CHANNEL_BLOCK = 16


def spatial_dims(model) -> tuple[object, object] | None:
    """The input's (H, W) dims as ints (static) or strings (symbolic), or None for a non-4-D input."""
    inputs = [i for i in model.graph.input if i.name == INPUT_NAME]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    if len(dims) != 4:
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims[2:])


def is_spatially_dynamic(model) -> bool:
    dims = spatial_dims(model)
    return dims is not None and not all(isinstance(d, int) for d in dims)


def specialize_spatial(model, height: int, width: int):
    """A copy of ``model`` (``onnx.ModelProto``) whose input is ``[N, C, height, width]``, with the
    input's ``Shape`` nodes over static dims replaced by constants and the ``cam`` output declared
    ``[N, height, width]`` (the fused model's contract). A model with a static input is returned as
    is when its size matches, and refused when it does not."""
    import onnx
    from onnx import helper, numpy_helper

    dims = spatial_dims(model)
    if dims is None:
        raise EngineError(f"the model's input {INPUT_NAME!r} is not [N, C, H, W]")
    if all(isinstance(d, int) for d in dims):
        if tuple(dims) != (height, width):
            raise EngineError(f"the model's input is {dims[0]}x{dims[1]}, not {height}x{width}")
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inp = next(i for i in graph.input if i.name == INPUT_NAME)
    shape = inp.type.tensor_type.shape.dim
    for d, v in zip(shape[2:], (height, width)):
        d.Clear()
        d.dim_value = int(v)
    static = [None] + [d.dim_value if d.HasField("dim_value") else None for d in shape[1:]]
    kept = []
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] == INPUT_NAME:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            part = static[slice(attrs.get("start", 0), attrs.get("end", None))]
            if part and all(v is not None for v in part):
                graph.initializer.append(numpy_helper.from_array(np.asarray(part, np.int64), node.output[0]))
                continue
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    for o in graph.output:
        if o.name == "cam" and len(o.type.tensor_type.shape.dim) == 3:
            for d, v in zip(o.type.tensor_type.shape.dim[1:], (height, width)):
                d.Clear()
                d.dim_value = int(v)
    # intermediate shapes recorded by the exporter are symbolic in H/W: let ONNX Runtime infer them again
    del graph.value_info[:]
    return out


def _averaging_bins(matrix: np.ndarray, axis: int) -> int | None:
    """The window length ``k`` when ``matrix`` averages consecutive, equal, non-overlapping windows
    along ``axis`` (rows ``[bins, size]`` for ``axis=0``, columns ``[size, bins]`` for ``axis=1``), else None."""
    m = np.asarray(matrix, np.float64)
    m = m if axis == 0 else m.T
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] % m.shape[0]:
        return None
    k = m.shape[1] // m.shape[0]
    expected = np.kron(np.eye(m.shape[0]), np.full((1, k), 1.0 / k))
    return k if np.allclose(m, expected, rtol=1e-6, atol=1e-9) else None


def pool_early_with_average_pool(model, output: str = "early"):
    """``model`` (static size, e.g. from :func:`specialize_spatial`) with ONNX Runtime's constant folding
    applied and ``output`` computed by one ``AveragePool`` when it is ``rows @ (x @ cols)`` with constant
    equal-window averaging matrices and ``x`` has a multiple of :data:`POOL_CHANNEL_BLOCK` channels (see
    the module docstring). Returns ``(model, rewritten)``; a model without that pattern comes back as
    it was. The average is the same up to float rounding (summation order)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    # Folding costs a session start: only a model whose output is a product of two MatMuls pays it.
    producer = {o: n for n in model.graph.node for o in n.output}
    outer = producer.get(output)
    if outer is None or outer.op_type != "MatMul" or getattr(producer.get(outer.input[1]), "op_type", "") != "MatMul":
        return model, False
    with tempfile.TemporaryDirectory(prefix="gamguard-fold-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # folding, no layouts
        opts.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        folded = onnx.load(opts.optimized_model_filepath)
    graph = folded.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outer = producer.get(output)
    if outer is None or outer.op_type != "MatMul" or outer.input[0] not in inits:
        return model, False
    inner = producer.get(outer.input[1])
    if inner is None or inner.op_type != "MatMul" or inner.input[1] not in inits or consumers.get(inner.output[0]) != 1:
        return model, False
    kh = _averaging_bins(numpy_helper.to_array(inits[outer.input[0]]), axis=0)
    kw = _averaging_bins(numpy_helper.to_array(inits[inner.input[1]]), axis=1)
    source = inner.input[0]
    inferred = onnx.shape_inference.infer_shapes(folded).graph
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in (*inferred.input, *inferred.value_info)
    }
    dims = shapes.get(source)
    if kh is None or kw is None or dims is None or len(dims) != 4 or dims[1] is None:
        return model, False
    if dims[1] % POOL_CHANNEL_BLOCK:
        log.debug("early pooling kept as averaging matrices: %d channels", dims[1])
        return model, False
    pool = helper.make_node(
        "AveragePool", [source], [output], name="gamguard/early_average_pool", kernel_shape=[kh, kw], strides=[kh, kw]
    )
    nodes = [pool if output in n.output else n for n in graph.node if inner.output[0] not in n.output]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return folded, True
