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

With the size fixed, the CAM's interpolation matrices are constants too: :func:`cam_min_max_on_small_map`
then moves the exported dynamic-size CAM's second min-max from the full-size map onto the small one, the
form a static-size export writes, and lets the guard subgraph resample the small map to its grid.

A guarded engine (the checks' arithmetic in the graph) stops at the small map: :func:`defer_cam_resize`
removes the last step to the full-size ``cam`` (a constant separable resize, in static-size exports and
after the rewrite above alike) and the host computes it only for the images whose map is read
(:class:`~gamguard.runtime.engines.base.ResizedMaps`): most calls ask for a verdict, not a heatmap.

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

#: A static-size CAM is mapped into [CAM_MARGIN, 1 - CAM_MARGIN / 2) on the small map, before the resize. The
#: resize is a convex combination (rows of both matrices sum to 1), so float32 rounding (a few ulp, about
#: 2e-7) keeps the full-size map inside [0, 1] without a clamping pass over it (one pass over H x W fewer on
#: every call). The map then differs from pytorch-grad-cam's by at most 2 * CAM_MARGIN. (Written as
#: ``(x - lo) / (den + 2 * CAM_MARGIN * den) + CAM_MARGIN``: the small map lies in [margin, 1 - margin / 2).)
CAM_MARGIN = 1e-6


def extreme_samples(interp: np.ndarray) -> np.ndarray:
    """Indices of the output samples of a 1-D interpolation matrix ``[n_out, n_in]`` (at most two taps a
    row, as :func:`bilinear_matrix`) at which a resampled map can take its extreme values.

    Between two neighbouring source samples the interpolated values are linear in the position, and
    the output samples between them form one run of rows with the same first tap: the smallest and
    largest value of the run are at its ends. In 2-D the bilinear map of a cell is linear along each
    axis, so its extremes over the sampled grid lie on (run-end rows) × (run-end columns): the min
    and max of the full-size map are those of the map resampled at these rows and columns only.
    """
    first_tap = np.argmax(np.asarray(interp) != 0, axis=1)
    keep = np.zeros(first_tap.size, bool)
    keep[0] = keep[-1] = True
    change = first_tap[1:] != first_tap[:-1]
    keep[1:] |= change
    keep[:-1] |= change
    return np.flatnonzero(keep)


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
    if any(isinstance(d, int) and d != v for d, v in zip(dims, (height, width))):
        raise EngineError(f"the model's input is {dims[0]}x{dims[1]}: it cannot serve {height}x{width}")
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


def pool_early_with_average_pool(model, output: str = "early", *, folded: bool = False):
    """``model`` (static size, e.g. from :func:`specialize_spatial`) with ONNX Runtime's constant folding
    applied and ``output`` computed by one ``AveragePool`` when it is ``rows @ (x @ cols)`` with constant
    equal-window averaging matrices and ``x`` has a multiple of :data:`POOL_CHANNEL_BLOCK` channels (see
    the module docstring). Returns ``(model, rewritten)``; a model without that pattern comes back as
    it was. The average is the same up to float rounding (summation order)."""
    import onnx
    from onnx import helper

    # Folding costs a session start: only a model whose output is a product of two MatMuls pays it.
    producer = {o: n for n in model.graph.node for o in n.output}
    outer = producer.get(output)
    if outer is None or outer.op_type != "MatMul" or getattr(producer.get(outer.input[1]), "op_type", "") != "MatMul":
        return model, False
    folded = _copy_model(model) if folded else fold_constants(model)  # the caller's model is not changed
    g = _GraphIndex(folded.graph)
    outer = g.node(output, "MatMul")
    inner = outer and g.node(outer.input[1], "MatMul")
    if inner is None or outer.input[0] not in g.inits or inner.input[1] not in g.inits or len(g.users(inner)) != 1:
        return model, False
    kh = _averaging_bins(g.const(outer.input[0]), axis=0)
    kw = _averaging_bins(g.const(inner.input[1]), axis=1)
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
    _set_nodes(folded.graph, [pool if n is outer else n for n in folded.graph.node if n is not inner])
    return folded, True


def _producer_through_identity(producer: dict, output: str):
    """The node that computes ``output`` (``producer``: tensor name → node), looking through one
    ``Identity`` (``gamguard export --onnx`` names its outputs that way)."""
    node = producer.get(output)
    if node is not None and node.op_type == "Identity":
        node = producer.get(node.input[0])
    return node


def _bypass_identity(graph, output: str) -> None:
    """``output = Identity(x)`` → the node computing ``x`` writes ``output`` itself (its readers follow), so
    that the rewrites below see the product that computes ``output``. Left as it is when ``x`` is a graph
    input, an initializer or a graph output."""
    producer = {o: n for n in graph.node for o in n.output}
    identity = producer.get(output)
    if identity is None or identity.op_type != "Identity":
        return
    source = identity.input[0]
    node = producer.get(source)
    if node is None or source in {o.name for o in graph.output}:
        return
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name == source:
                n.input[i] = output
    node.output[list(node.output).index(source)] = output
    graph.node.remove(identity)


def _copy_model(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


class _GraphIndex:
    """Who produces and who reads each tensor of a graph, and its constants (for the rewrites below)."""

    def __init__(self, graph):
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def node(self, tensor: str, op_type: str):
        """The node producing ``tensor`` when it is an ``op_type``, else None."""
        n = self.producer.get(tensor)
        return n if n is not None and n.op_type == op_type else None

    def users(self, node) -> list:
        """The nodes reading ``node``'s (first) output."""
        return self.consumers.get(node.output[0], [])

    def const(self, tensor: str) -> np.ndarray | None:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[tensor]) if tensor in self.inits else None


def _set_nodes(graph, nodes, new_initializers=()) -> None:
    """``graph`` with ``nodes`` (in that order) and ``new_initializers`` added, unused initializers dropped."""
    nodes = list(nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [i for i in (*graph.initializer, *new_initializers) if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fold_constants(model):
    """``model`` with ONNX Runtime's constant folding applied (basic level: no layout changes), as ONNX
    Runtime itself would fold it when a session starts; the rewrites below match the folded graph."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="gamguard-fold-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # folding, no layouts
        opts.optimized_model_filepath = str(Path(tmp) / "folded.onnx")
        ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def _is_interpolation(matrix: np.ndarray) -> bool:
    """``[n_out, n_in]`` rows of a 1-D linear interpolation at increasing positions: each row a convex
    combination (non-negative, summing to 1) of one source sample or two neighbouring ones, the first tap
    never decreasing and, within a run of rows on the same pair, the weight moving towards the second —
    what :func:`extreme_samples` needs (a bilinear resize's matrices, as the exporter builds them)."""
    m = np.asarray(matrix, np.float64)
    if m.ndim != 2 or m.size == 0 or (m < 0).any() or not np.allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-5):
        return False
    nz = m != 0
    first = np.argmax(nz, axis=1)
    last = m.shape[1] - 1 - np.argmax(nz[:, ::-1], axis=1)
    if (last - first > 1).any() or (np.diff(first) < 0).any():
        return False
    second = m[np.arange(m.shape[0]), np.minimum(first + 1, m.shape[1] - 1)] * (last > first)
    same_run = np.diff(first) == 0
    return bool((np.diff(second)[same_run] >= -1e-6).all())


def _reduce_axes(node, g: _GraphIndex) -> list[int] | None:
    """A Reduce node's axes: its constant second input (opset 18) or its ``axes`` attribute (older opsets)."""
    from onnx import helper

    if len(node.input) > 1 and node.input[1]:
        axes = g.const(node.input[1])
        return None if axes is None else [int(a) for a in axes.ravel()]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return [int(a) for a in attrs["axes"]] if "axes" in attrs else None


def cam_min_max_on_small_map(model, output: str = "cam", *, folded: bool = False):
    """``model`` (static size) with the dynamic-size CAM's second min-max moved onto the small map, as a
    static-size export writes it (:func:`gamguard.exporter.gradcam.gradcam_map`). Returns ``(model,
    rewritten)``; a model without the pattern comes back unchanged.

    A ``--dynamic-spatial`` export resizes the normalised small map ``s`` with matrices built from the
    input size and then min-max normalises the full-size map ``X = R s C``: four more passes over
    ``[N, H, W]`` (min, max, subtract, divide: 3.4 of the 9 ms the fused outputs add at 512², batch 8, on
    the demo model). Once the size is fixed, ``R`` and ``C`` are constants; the resize is a convex
    combination, so it commutes with the normalisation, and the full map's min and max are those of the
    map resampled at :func:`extreme_samples` only. The rewrite computes ``lo``/``hi`` there, normalises
    ``s`` into [CAM_MARGIN, 1 - CAM_MARGIN / 2) and resizes once: the same map within 3e-6, inside [0, 1].

    Any other consumer of ``cam`` of the form ``A @ (cam @ B)`` with constant ``A``, ``B`` — the guard
    subgraph's area resampling to the comparison grid (:mod:`gamguard.runtime.checks.graph`) — then reads
    the small map through ``(A R)`` and ``(C B)`` instead of the full one (the same product, a different
    rounding)."""
    from onnx import helper, numpy_helper

    producer = {o: n for n in model.graph.node for o in n.output}
    if getattr(_producer_through_identity(producer, output), "op_type", "") != "Div":  # cheap test before folding
        return model, False
    folded_model = _copy_model(model) if folded else fold_constants(model)  # the caller's model is not changed
    _bypass_identity(folded_model.graph, output)
    g = _GraphIndex(folded_model.graph)
    node, const, consumers = g.node, g.const, g.consumers
    div = node(output, "Div")
    num = div and node(div.input[0], "Sub")
    den = div and node(div.input[1], "Add")
    if num is None or den is None:
        return model, False
    full, lo = num.input
    eps_in = [i for i in den.input if i in g.inits and const(i).size == 1]
    spread = [node(i, "Sub") for i in den.input if i not in eps_in]
    mat = node(full, "MatMul")
    inner = mat and node(mat.input[1], "MatMul")
    if len(eps_in) != 1 or len(spread) != 1 or spread[0] is None or inner is None:
        return model, False
    hi = spread[0].input[0]
    lo_node, hi_node = node(lo, "ReduceMin"), node(hi, "ReduceMax")
    rows, cols = const(mat.input[0]), const(inner.input[1])
    if (
        lo_node is None
        or hi_node is None
        or spread[0].input[1] != lo
        or lo_node.input[0] != full
        or hi_node.input[0] != full
        or rows is None
        or cols is None
        or rows.ndim != 2
        or cols.ndim != 2
        or not (_is_interpolation(rows) and _is_interpolation(cols.T))
        or {id(n) for n in consumers.get(full, [])} != {id(lo_node), id(hi_node), id(num)}
        or len(g.users(inner)) != 1
    ):
        return model, False
    declared = next((o for o in folded_model.graph.output if o.name == output), None)
    if declared is None or len(declared.type.tensor_type.shape.dim) != 3:  # [N, H, W]: the axes below assume it
        return model, False
    for reduce in (lo_node, hi_node):
        axes = _reduce_axes(reduce, g)
        attrs = {a.name: helper.get_attribute_value(a) for a in reduce.attribute}
        if axes is None or sorted(a % 3 for a in axes) != [1, 2] or attrs.get("keepdims", 1) != 1:
            return model, False
    small = inner.input[0]
    eps = float(const(eps_in[0]).ravel()[0])
    added: list = []

    def add_const(name, value, dtype=np.float32):
        added.append(numpy_helper.from_array(np.asarray(value, dtype), f"gamguard/cam_{name}"))
        return added[-1].name

    def op(op_type, *inputs, out=None, **attrs):
        out = out or f"gamguard/cam_{op_type.lower()}_{len(new_nodes)}"
        new_nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    new_nodes: list = []
    axes = add_const("axes", [1, 2], np.int64)
    ext = op(
        "MatMul",
        add_const("rows_ext", rows[extreme_samples(rows)]),
        op("MatMul", small, add_const("cols_ext", cols[:, extreme_samples(cols.T)])),
    )
    lo2, hi2 = op("ReduceMin", ext, axes, keepdims=1), op("ReduceMax", ext, axes, keepdims=1)
    d = op("Add", op("Sub", hi2, lo2), add_const("eps", eps))
    d = op("Add", d, op("Mul", d, add_const("two_margin", 2.0 * CAM_MARGIN)))
    scaled = op("Add", op("Div", op("Sub", small, lo2), d), add_const("margin", CAM_MARGIN))
    op("MatMul", mat.input[0], op("MatMul", scaled, inner.input[1]), out=output)
    gone = {id(n) for n in (div, num, den, spread[0], lo_node, hi_node, mat, inner)}
    gone |= _resample_from_small_map(g, output, scaled, rows, cols, add_const, op)
    _replace_nodes(folded_model.graph, gone, new_nodes, added)
    return folded_model, True


def _resample_from_small_map(g: _GraphIndex, output: str, small: str, rows, cols, add_const, op) -> set:
    """Every consumer of ``output`` = ``rows @ small @ cols`` of the form ``A @ (output @ B)`` with constant
    ``A``, ``B`` (the guard subgraph's area resampling, :mod:`gamguard.runtime.checks.graph`) rewritten to
    read the small map: ``(A rows) @ (small @ (cols B))``, the same product with a different rounding.
    Returns the ids of the nodes replaced."""
    gone = set()
    for user in g.consumers.get(output, []):
        if user.op_type != "MatMul" or user.input[0] != output or g.const(user.input[1]) is None:
            continue
        outer = g.users(user)
        if len(outer) != 1 or outer[0].op_type != "MatMul" or g.const(outer[0].input[0]) is None:
            continue
        a, b = g.const(outer[0].input[0]).astype(np.float64), g.const(user.input[1]).astype(np.float64)
        if a.ndim != 2 or b.ndim != 2:
            continue
        left = add_const(f"resample_rows_of_{user.output[0]}", a @ np.asarray(rows, np.float64))
        right = add_const(f"resample_cols_of_{user.output[0]}", np.asarray(cols, np.float64) @ b)
        op("MatMul", left, op("MatMul", small, right), out=outer[0].output[0])
        gone |= {id(user), id(outer[0])}
    return gone


def _replace_nodes(graph, gone: set, new_nodes: list, new_initializers: list) -> None:
    """``graph`` without the nodes whose ids are in ``gone``, ``new_nodes`` in their place (at the first
    of them: topological order, the new nodes' inputs come before it)."""
    nodes = list(graph.node)
    at = min((i for i, n in enumerate(nodes) if id(n) in gone), default=len(nodes))
    kept = [n for n in nodes[:at] if id(n) not in gone] + new_nodes + [n for n in nodes[at:] if id(n) not in gone]
    _set_nodes(graph, kept, new_initializers)


def defer_cam_resize(model, output: str = "cam", *, folded: bool = False):
    """``model`` (a guarded fused model, static size) without its last step to the full-size ``cam``, when
    that step is a constant separable resize ``cam = R @ (s @ C)`` (the exporter's bilinear resize to the
    input size, also after :func:`cam_min_max_on_small_map`): the graph outputs the small map ``s``
    instead, and the host computes ``R @ s @ C`` for the images whose heatmap is read
    (:class:`~gamguard.runtime.engines.base.ResizedMaps`). The guard subgraph's resampling of ``cam``
    reads ``s`` through composed matrices (:func:`_resample_from_small_map`).

    Returns ``(model, None)`` when the pattern is not there or ``cam`` is read by anything else, else
    ``(model, (small_output_name, R, C))`` with ``R`` ``[H, h]`` and ``C`` ``[w, W]`` float32."""
    from onnx import TensorProto, helper, numpy_helper

    producer = {o: n for n in model.graph.node for o in n.output}
    outer = _producer_through_identity(producer, output)
    if outer is None or outer.op_type != "MatMul" or getattr(producer.get(outer.input[1]), "op_type", "") != "MatMul":
        return model, None
    rewritten = _copy_model(model) if folded else fold_constants(model)
    _bypass_identity(rewritten.graph, output)
    g = _GraphIndex(rewritten.graph)
    mat = g.node(output, "MatMul")
    inner = mat and g.node(mat.input[1], "MatMul")
    rows = None if mat is None else g.const(mat.input[0])
    cols = None if inner is None else g.const(inner.input[1])
    if rows is None or cols is None or rows.ndim != 2 or cols.ndim != 2 or len(g.users(inner)) != 1:
        return model, None
    small = inner.input[0]
    added, new_nodes = [], []

    def add_const(name, value):
        added.append(numpy_helper.from_array(np.asarray(value, np.float32), f"gamguard/resample_{name}"))
        return added[-1].name

    def op(op_type, *inputs, out=None):
        out = out or f"gamguard/resample_{op_type.lower()}_{len(new_nodes)}"
        new_nodes.append(helper.make_node(op_type, list(inputs), [out], name=out))
        return out

    gone = {id(mat), id(inner)} | _resample_from_small_map(g, output, small, rows, cols, add_const, op)
    if any(id(n) not in gone for n in g.consumers.get(output, [])):
        return model, None  # the full map is read inside the graph: keep it
    _replace_nodes(rewritten.graph, gone, new_nodes, added)
    outputs = [o for o in rewritten.graph.output if o.name != output]
    outputs.append(helper.make_tensor_value_info(small, TensorProto.FLOAT, None))
    del rewritten.graph.output[:]
    rewritten.graph.output.extend(outputs)
    return rewritten, (small, np.asarray(rows, np.float32), np.asarray(cols, np.float32))
