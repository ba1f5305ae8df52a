"""The checks' per-image arithmetic as an ONNX graph, appended to the fused model so that the engine
computes it where it runs (GPU providers, TensorRT) and the host reads a few numbers per image.

:func:`guarded_model` takes the fused ``model.onnx`` and the bundle's :class:`CalibrationData` and adds
one output, ``guard`` ``[N, len(GUARD_COLUMNS)]`` float32, computed from ``logits``, ``cam`` and
``early`` with the bundle's references as constants of the graph:

* the predicted real class (ArgMax over the real classes), the garbage probability (Softmax) and the
  garbage margin (garbage logit minus the largest real-class logit);
* :func:`gamguard.runtime.similarity.prepare` of the CAM: area resampling to the comparison grid as two
  MatMuls with :func:`~gamguard.runtime.similarity.area_matrix` (built in the graph from the CAM's
  dynamic size, same formula) and the same min-max normalisation;
* the seven measures against the predicted class's prepared reference map (one MatMul with the one-hot
  class selects every per-class constant): IoU/Dice, SSIM (the Gaussian filter as the same two
  matrices the numpy kernel uses), cosine, Pearson, KL, sliced Wasserstein (the directions' sort orders
  are one GatherElements, the cumulative sums block-wise MatMuls);
* the early-feature score (:func:`_feature_score`, a thin function of :class:`FeatureReference`'s
  arrays: ``min_k |x W - m_k|^2``);
* the p-value of every measure (per predicted class), of the feature score and of the garbage margin,
  in one lookup: :class:`TailPValue`'s interpolation between sorted knots (a count of knots below the
  value, GatherElements) and its exponential tail;
* ``finite``: 1 when every logit, early feature and resampled CAM cell is finite (a NaN/Inf anywhere in
  the CAM reaches the resampled grid: every source cell has a positive weight).

The graph is built when a bundle loads (a pure function of ``model.onnx`` and ``reference.npz``, both
covered by the bundle's hashes; a fraction of a second), never stored in the bundle; ``gamguard
build-engine --guard-graph`` bakes it into a TensorRT plan. The numpy implementation
(:mod:`.scores`, :mod:`gamguard.runtime.similarity`, :class:`NullModel`) is the reference; the graph
computes the same numbers in float32 (tests/test_guard_graph.py holds them to the tolerances in
:data:`PARITY_ATOL`). The attention check's own p-value (one lookup on the per-measure p-values), the
combination, the conformal cut and the verdict stay on the host: they depend on the serve-time policy
and enforced checks, and are a few operations per image in Python floats (:class:`~.combine.DecisionRule`,
held equal to the numpy :func:`~.combine.decide`). The attention lookup in the graph measured slower
than on the host: ~50 more nodes, whose dispatch cost more than the lookup itself.

Only standard opset-18 operators are used (no custom domains), meant for ONNX Runtime CPU/CUDA and
TensorRT alike (TensorRT's parser is exercised by ``deploy/gpu-check.sh``); ``gamguard bench`` times
the graph against the numpy path on the provider it runs on.
"""

from __future__ import annotations

import numpy as np

from .. import similarity as sim
from ..similarity import HIGHER_IS_SIMILAR, MEASURES
from .feature import NORM_EPS

GUARD_OUTPUT = "guard"
#: Columns of the ``guard`` output, in order.
GUARD_COLUMNS = (
    *(f"attention.{m}" for m in MEASURES),
    *(f"attention.{m}.p" for m in MEASURES),
    "feature",
    "feature.p",
    "garbage_prob",
    "garbage_margin",
    "garbage.p",
    "reference_position",  # predicted class as a position among the real classes (exact small integer)
    "finite",  # 1.0 when every engine output of the image is finite, else 0.0
)
#: Agreement of the graph with the numpy reference (float32 vs float64). The attention p-value's table
#: has steps (tied null values: the null images' own per-measure p-values sit on the same grid), so a
#: rounding difference that crosses one moves ``attention.p`` by one step, ``1 / (n_null + 1)``; a
#: decision can differ only where a p-value is that close to its level (``attention_step_tolerance``).
PARITY_ATOL = {"scores": 1e-4, "pvalues": 1e-4}


def attention_step_tolerance(calibration) -> float:
    """How far the in-graph ``attention.p`` may be from the host's: one step of its table (see PARITY_ATOL)."""
    return 1.0 / (calibration.null.n + 1) + PARITY_ATOL["pvalues"]


#: Where the checks' per-image arithmetic runs: ``graph`` (in the engine, :func:`guarded_model`),
#: ``host`` (numpy, :func:`gamguard.runtime.checks.score_outputs`) or ``auto`` (see :func:`resolve_arithmetic`).
ARITHMETIC = ("auto", "graph", "host")
ARITHMETIC_ENV = "GAMGUARD_GUARD_ARITHMETIC"

_FLOAT_MAX = float(np.finfo(np.float32).max)  # pads knot tables (never <= a finite value)
_OPSET = 18


class _Builder:
    """Nodes and constants of the guard subgraph, named under ``guard/``."""

    def __init__(self):
        self.nodes = []
        self.inits = []
        self._count = 0
        self._scalars: dict = {}

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"guard/{hint}_{self._count}"

    def const(self, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        arr = np.asarray(value, dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size == 1 else None
        if key in self._scalars:
            return self._scalars[key]
        name = self._name("const")
        self.inits.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self._scalars[key] = name
        return name

    def i64(self, value) -> str:
        return self.const(value, np.int64)

    def op(self, op_type: str, *inputs: str, outputs: int = 1, name: str | None = None, **attrs):
        from onnx import helper

        outs = [name] if name else [self._name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name(op_type), **attrs))
        return outs[0] if outputs == 1 else outs

    def sum(self, x: str, axes) -> str:  # keepdims: every reduction here keeps [N, 1]
        return self.op("ReduceSum", x, self.i64(list(axes)), keepdims=1)


class GuardGraphError(RuntimeError):
    """The guard subgraph cannot be added to this model (its arithmetic can still run on the host)."""


def guarded_model(fused, calibration):
    """``fused`` (an ``onnx.ModelProto`` with outputs logits/cam/early) with the ``guard`` output added.
    A model below opset 18 (``gamguard export --opset 17``, an ONNX-only model at opset 13-17) is
    converted to opset 18 first (``onnx.version_converter``): the subgraph's reductions and splits are
    written in opset 18's form. Raises :class:`GuardGraphError` when that fails."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto()
    model.CopyFrom(_at_least_opset(fused, _OPSET))
    b = _Builder()
    _build(b, "logits", "cam", "early", calibration, _cam_size_source(model))
    model.graph.node.extend(b.nodes)
    model.graph.initializer.extend(b.inits)
    model.graph.output.append(
        helper.make_tensor_value_info(GUARD_OUTPUT, TensorProto.FLOAT, [None, len(GUARD_COLUMNS)])
    )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise GuardGraphError(f"the guard subgraph does not fit this model: {str(exc).splitlines()[0]}") from None
    return model


def _at_least_opset(model, opset: int):
    """``model`` with its default-domain opset raised to ``opset`` when it is below (else as it is)."""
    from onnx import version_converter

    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current >= opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        raise GuardGraphError(
            f"the model's opset {current} cannot be raised to {opset} for the guard subgraph "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def guard_only_model(calibration, *, n_classes: int, early_shape):
    """The guard subgraph alone, with inputs ``logits``, ``cam``, ``early`` (tests, timing)."""
    import onnx
    from onnx import TensorProto, helper

    b = _Builder()
    _build(b, "logits", "cam", "early", calibration, ("cam", 1))
    graph = helper.make_graph(
        b.nodes,
        "gamguard-guard",
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, n_classes]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, [None, None, None]),
            helper.make_tensor_value_info("early", TensorProto.FLOAT, [None, *early_shape]),
        ],
        [helper.make_tensor_value_info(GUARD_OUTPUT, TensorProto.FLOAT, [None, len(GUARD_COLUMNS)])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    onnx.checker.check_model(model)
    return model


def requested_arithmetic(requested: str | None = None) -> str:
    """What was asked for, one of :data:`ARITHMETIC` (``requested``, else env ``GAMGUARD_GUARD_ARITHMETIC``,
    else ``auto``); ValueError for anything else."""
    import os

    requested = (requested or os.environ.get(ARITHMETIC_ENV) or "auto").strip().lower()
    if requested not in ARITHMETIC:
        raise ValueError(f"guard arithmetic must be one of {', '.join(ARITHMETIC)}, got {requested!r}")
    return requested


def resolve_arithmetic(requested: str | None = None) -> str:
    """``graph`` or ``host``. ``auto`` (the default; env ``GAMGUARD_GUARD_ARITHMETIC`` overrides it) is
    ``graph`` on every provider: on GPU providers it keeps the arithmetic on the device, and on ONNX
    Runtime CPU it measured faster than numpy as well (the feature score's whitener MatMul runs in
    ONNX Runtime's single-threaded kernels instead of numpy's threaded BLAS, and a batch needs no
    Python loop per class); ``gamguard bench`` times both sides on the chosen provider. ``host`` keeps
    the numpy reference on the hot path."""
    requested = requested_arithmetic(requested)
    return "graph" if requested == "auto" else requested


def guarded_model_bytes(bundle_dir, calibration) -> bytes:
    """The bundle's ``model.onnx`` with the guard subgraph, serialized for an ONNX Runtime session."""
    from pathlib import Path

    import onnx

    from ..bundle import MODEL_FILE

    return guarded_model(onnx.load(str(Path(bundle_dir) / MODEL_FILE)), calibration).SerializeToString()


def engine_pvalues(p: np.ndarray) -> np.ndarray:
    """p-values read from the engine, fail closed: NaN, ±Inf and anything not above 0 become 0 (reject).
    (A p-value is never negative or infinite; an engine that says so has gone wrong.)"""
    p = np.asarray(p, np.float64)
    return np.where(np.isfinite(p) & (p > 0.0), p, 0.0)


def scores_from_graph(guard: np.ndarray, logits: np.ndarray, calibration):
    """``(ScoreSet, PValues)`` from the ``guard`` output, as :func:`score_outputs` and
    :meth:`NullModel.pvalues` give them on the host (the attention p-value is computed here from the
    per-measure p-values: one table lookup). A p-value that is not a number is 0 (fail closed)."""
    from .combine import PValues
    from .scores import ScoreSet

    g = np.asarray(guard, np.float64)
    m = len(MEASURES)
    col = GUARD_COLUMNS.index
    logits = np.asarray(logits, np.float64)
    pred = logits.argmax(axis=1)
    garbage_pred = pred == calibration.garbage
    pos = np.rint(g[:, col("reference_position")]).astype(np.int64)
    scores = ScoreSet(
        sims=g[:, :m],
        feature=g[:, col("feature")],
        pred=pred,
        pred_real=calibration.real[pos],
        garbage_prob=g[:, col("garbage_prob")],
        garbage_pred=garbage_pred,
        garbage_margin=g[:, col("garbage_margin")],
    )
    pm = engine_pvalues(g[:, m : 2 * m])
    pvalues = PValues(
        measures=pm,
        attention=calibration.null.attention_p(pm),
        feature=engine_pvalues(g[:, col("feature.p")]),
        garbage=engine_pvalues(g[:, col("garbage.p")]),
        garbage_pred=garbage_pred,
    )
    return scores, pvalues


# --------------------------------------------------------------------------------------------------
def _cam_size_source(fused):
    """Where the guard reads the CAM's height and width (the fused model's input size, by its contract):
    ``(H, W)`` ints for a static input — the resampling matrices are then constants — or
    ``(INPUT_NAME, 2)``, the input's dims 2 and 3 read with ``Shape``: an engine that fixes the size
    (:mod:`gamguard.runtime.engines.specialize`) turns that ``Shape`` into a constant and ONNX Runtime
    folds the matrices."""
    from ..engines.base import INPUT_NAME
    from ..engines.specialize import spatial_dims

    dims = spatial_dims(fused)
    if dims is not None and all(isinstance(d, int) and d > 0 for d in dims):
        return tuple(dims)
    return (INPUT_NAME, 2)


def _build(b: _Builder, logits: str, cam: str, early: str, cal, size_source) -> str:
    from onnx import TensorProto

    grid = cal.grid
    d = grid * grid
    kr = len(cal.real)
    zero = b.const(0.0)
    pos = b.op("ArgMax", b.op("Gather", logits, b.i64(cal.real), axis=1), axis=1, keepdims=0)  # [N]
    onehot = b.op(
        "Cast", b.op("Equal", b.op("Unsqueeze", pos, b.i64([1])), b.i64(np.arange(kr)[None])), to=TensorProto.FLOAT
    )  # [N, Kr]
    garbage_prob = b.op("Gather", b.op("Softmax", logits, axis=1), b.i64([cal.garbage]), axis=1)  # [N, 1]
    garbage_margin = b.op(
        "Sub",
        b.op("Gather", logits, b.i64([cal.garbage]), axis=1),
        b.op("ReduceMax", b.op("Gather", logits, b.i64(cal.real), axis=1), b.i64([1]), keepdims=1),
    )  # [N, 1]

    xr = _resample(b, cam, grid, size_source)  # [N, D]
    # x*0 is NaN exactly where x is NaN/Inf: one pass per output proves an image's outputs finite
    probe = b.op(
        "Add",
        b.op("Add", b.sum(b.op("Mul", xr, zero), [1]), b.sum(b.op("Mul", logits, zero), [1])),
        # (the feature size is known: [0, -1] could not be inferred for an empty batch)
        b.sum(b.op("Mul", b.op("Reshape", early, b.i64([-1, int(np.prod(cal.feature_ref.shape))])), zero), [1]),
    )
    finite = b.op("Cast", b.op("Not", b.op("IsNaN", probe)), to=TensorProto.FLOAT)  # [N, 1]
    x = _minmax(b, xr)

    sims = _measures(b, x, onehot, cal.ref_prepared.reshape(kr, d).astype(np.float64), grid)  # [N, 7]
    feature = _feature_score(b, early, cal.feature_ref)  # [N, 1]
    # one lookup for every p-value: the measures' tables of the predicted class, then the feature and
    # garbage-margin tables (pooled: the same for every class)
    m = len(MEASURES)
    sign = np.array([-1.0 if HIGHER_IS_SIMILAR[name] else 1.0 for name in MEASURES] + [1.0, 1.0])
    dissimilarity = b.op("Mul", b.op("Concat", sims, feature, garbage_margin, axis=1), b.const(sign))  # [N, M+2]
    tables = [list(cal.null.tables_for(int(c))) + [cal.null.feature, cal.null.garbage] for c in cal.real]
    p = _tail_pvalues(b, dissimilarity, onehot, tables)  # [N, M+2]
    pm, pf, pg = b.op("Split", p, b.i64([m, 1, 1]), axis=1, outputs=3)
    posf = b.op("Cast", b.op("Unsqueeze", pos, b.i64([1])), to=TensorProto.FLOAT)
    return b.op(
        "Concat", sims, pm, feature, pf, garbage_prob, garbage_margin, pg, posf, finite, axis=1, name=GUARD_OUTPUT
    )


def _area_matrix(b: _Builder, size: str, grid: int) -> str:
    """:func:`gamguard.runtime.similarity.area_matrix` ``[grid, n]`` for a dynamic length (int64 [1])."""
    from onnx import TensorProto

    n = b.op("Cast", b.op("Squeeze", size), to=TensorProto.FLOAT)
    s = b.op("Div", n, b.const(float(grid)))
    h = b.op("Range", b.const(0.0), n, b.const(1.0))  # [n]
    lo = b.op("Max", h, b.op("Mul", b.const(np.arange(grid)[:, None]), s))
    hi = b.op("Min", b.op("Add", h, b.const(1.0)), b.op("Mul", b.const(np.arange(1, grid + 1)[:, None]), s))
    return b.op("Div", b.op("Relu", b.op("Sub", hi, lo)), s)


def _resample(b: _Builder, cam: str, grid: int, size_source) -> str:
    """``cam`` ``[N, H, W]`` area-resampled to ``[N, grid * grid]``. ``size_source``: ``(H, W)`` ints
    (constant matrices, :func:`gamguard.runtime.similarity.area_matrix`) or ``(tensor, axis)``: H and W
    are that tensor's dims ``axis`` and ``axis + 1``, and the matrices are built in the graph."""
    if isinstance(size_source[0], int):
        h, w = size_source
        x = b.op("MatMul", b.const(sim.area_matrix(h, grid)), b.op("MatMul", cam, b.const(sim.area_matrix(w, grid).T)))
        return b.op("Reshape", x, b.i64([-1, grid * grid]))
    tensor, axis = size_source
    rows = _area_matrix(b, b.op("Shape", tensor, start=axis, end=axis + 1), grid)  # [g, H]
    cols = _area_matrix(b, b.op("Shape", tensor, start=axis + 1, end=axis + 2), grid)  # [g, W]
    x = b.op("MatMul", rows, b.op("MatMul", cam, b.op("Transpose", cols, perm=[1, 0])))  # [N, g, g]
    return b.op("Reshape", x, b.i64([-1, grid * grid]))


def _minmax(b: _Builder, x: str) -> str:
    """prepare's normalisation: (x - min) / range, a constant map (range <= 1e-6 magnitude) -> 0."""
    one, zero = b.const(1.0), b.const(0.0)
    lo = b.op("ReduceMin", x, b.i64([1]), keepdims=1)
    hi = b.op("ReduceMax", x, b.i64([1]), keepdims=1)
    rng = b.op("Sub", hi, lo)
    mag = b.op("Max", b.op("Abs", lo), b.op("Abs", hi))
    constant = b.op("LessOrEqual", rng, b.op("Mul", mag, b.const(sim._CONSTANT_RTOL)))
    return b.op("Where", constant, zero, b.op("Div", b.op("Sub", x, lo), b.op("Where", constant, one, rng)))


def _measures(b: _Builder, x: str, onehot: str, y: np.ndarray, grid: int) -> str:
    """The seven measures ``[N, 7]`` (MEASURES order; a measure this graph does not know is a KeyError) of
    prepared maps ``x`` ``[N, D]`` against the
    predicted class's prepared reference (rows of ``y`` ``[Kr, D]``, float64, selected by ``onehot``)."""
    from onnx import TensorProto

    kr, d = y.shape
    one, zero = b.const(1.0), b.const(0.0)
    m = sim._gaussian_matrix(grid)  # [gi, g]
    gi = m.shape[0]
    y2 = y.reshape(kr, grid, grid)
    by = (y >= sim.BINARY_THRESHOLD).astype(np.float64)
    ycen = y - y.mean(axis=1, keepdims=True)
    ye = y + sim.KL_EPS
    blocks = [
        y,
        by,
        ycen,
        np.log(ye / ye.sum(axis=1, keepdims=True)),  # log q of the KL divergence
        sim._mass(y2),
        (m @ y2 @ m.T).reshape(kr, -1),  # the reference's own SSIM moments
        (m @ (y2 * y2) @ m.T).reshape(kr, -1),
        np.stack([by.sum(1), np.sqrt((y * y).sum(1)), np.sqrt((ycen * ycen).sum(1))], axis=1),
    ]
    table = np.concatenate(blocks, axis=1)
    sel = b.op("MatMul", onehot, b.const(table))  # [N, F]: exact (one-hot rows)
    yc, byc, ycc, logq, mass_y, uy, uyy, scalars = b.op(
        "Split", sel, b.i64([blk.shape[1] for blk in blocks]), axis=1, outputs=len(blocks)
    )
    size_b, norm_y, norm_yc = b.op("Split", scalars, axis=1, outputs=3, num_outputs=3)

    # IoU, Dice of the maps binarised at 0.5
    ax = b.op("Cast", b.op("GreaterOrEqual", x, b.const(sim.BINARY_THRESHOLD)), to=TensorProto.FLOAT)
    inter = b.sum(b.op("Mul", ax, byc), [1])
    total = b.op("Add", b.sum(ax, [1]), size_b)
    union = b.op("Sub", total, inter)
    iou = b.op("Where", b.op("Greater", union, zero), b.op("Div", inter, b.op("Max", union, one)), one)
    dice = b.op(
        "Where",
        b.op("Greater", total, zero),
        b.op("Div", b.op("Mul", inter, b.const(2.0)), b.op("Max", total, one)),
        one,
    )

    # cosine; Pearson = cosine of the centred maps (x . ycen needs no centring of x: ycen sums to 0)
    sx = b.sum(x, [1])
    sxx = b.sum(b.op("Mul", x, x), [1])
    xy = b.op("Mul", x, yc)

    def cosine_of(dot, norm_a, norm_b):
        norm = b.op("Mul", norm_a, norm_b)
        ok = b.op("Greater", norm, zero)
        return b.op("Where", ok, b.op("Clip", b.op("Div", dot, b.op("Where", ok, norm, one)), b.const(-1.0), one), zero)

    cosine = cosine_of(b.sum(xy, [1]), b.op("Sqrt", sxx), norm_y)
    centred_sq = b.op("Relu", b.op("Sub", sxx, b.op("Div", b.op("Mul", sx, sx), b.const(float(d)))))
    pearson = cosine_of(b.sum(b.op("Mul", x, ycc), [1]), b.op("Sqrt", centred_sq), norm_yc)

    # KL(P_x || Q)
    xe = b.op("Add", x, b.const(sim.KL_EPS))
    p = b.op("Div", xe, b.sum(xe, [1]))
    kl = b.op("Max", b.sum(b.op("Mul", p, b.op("Sub", b.op("Log", p), logq)), [1]), zero)

    # SSIM: Gaussian moments of x, x*x, x*y as M @ . @ M^T (the reference's are constants)
    as_map = b.i64([-1, 1, grid, grid])
    stack = b.op(
        "Concat",
        b.op("Reshape", x, as_map),
        b.op("Reshape", b.op("Mul", x, x), as_map),
        b.op("Reshape", xy, as_map),
        axis=1,
    )
    mom = b.op("Reshape", b.op("MatMul", b.op("MatMul", b.const(m), stack), b.const(m.T)), b.i64([-1, 3, gi * gi]))
    ux, uxx, uxy = (b.op("Squeeze", t, b.i64([1])) for t in b.op("Split", mom, axis=1, outputs=3, num_outputs=3))
    ux_uy = b.op("Mul", ux, uy)
    sq = b.op("Add", b.op("Mul", ux, ux), b.op("Mul", uy, uy))
    c1 = (sim.SSIM_K1 * sim.SSIM_DATA_RANGE) ** 2
    c2 = (sim.SSIM_K2 * sim.SSIM_DATA_RANGE) ** 2
    num = b.op(
        "Mul",
        b.op("Add", b.op("Mul", ux_uy, b.const(2.0)), b.const(c1)),
        b.op("Add", b.op("Mul", b.op("Sub", uxy, ux_uy), b.const(2.0)), b.const(c2)),
    )
    den = b.op("Mul", b.op("Add", sq, b.const(c1)), b.op("Add", b.op("Sub", b.op("Add", uxx, uyy), sq), b.const(c2)))
    ssim = b.op("ReduceMean", b.op("Div", num, den), b.i64([1]), keepdims=1)

    by_name = {
        "iou": iou,
        "dice": dice,
        "ssim": ssim,
        "cosine": cosine,
        "pearson": pearson,
        "kl_divergence": kl,
        "sliced_wasserstein": _sliced_wasserstein(b, x, sx, mass_y, grid),
    }
    return b.op("Concat", *(by_name[name] for name in MEASURES), axis=1)


def _sliced_wasserstein(b: _Builder, x: str, sx: str, mass_y: str, grid: int) -> str:
    """similarity's sliced W1: per direction, sum |CDF difference| x gap along the sorted projections."""
    d = grid * grid
    order, gaps = sim._sliced_plan(grid, sim.WASSERSTEIN_DIRECTIONS)  # [L, D] each
    directions = order.shape[0]
    blk = grid if d % grid == 0 else d
    nb = d // blk
    one, zero = b.const(1.0), b.const(0.0)
    has_mass = b.op("Greater", sx, zero)
    mass_x = b.op("Where", has_mass, b.op("Div", x, b.op("Where", has_mass, sx, one)), b.const(1.0 / d))
    # every direction's order at once, GatherElements with the orders broadcast over the batch: on ONNX
    # Runtime CPU 6x faster at batch 1 than a Gather, which copies one block per index
    diff = b.op("Sub", mass_x, mass_y)  # [N, D]
    index_shape = b.op("Concat", b.op("Shape", diff, start=0, end=1), b.i64([directions * d]), axis=0)
    index = b.op("Expand", b.const(order.reshape(1, -1), np.int32), index_shape)  # [N, L*D]; int32: half the bytes
    ordered = b.op("GatherElements", diff, index, axis=1)  # [N, L*D]
    ordered = b.op("Reshape", ordered, b.i64([-1, directions, nb, blk]))
    # cumulative sums in blocks: within a block by an upper-triangular MatMul, then block offsets
    within = b.op("MatMul", ordered, b.const(np.triu(np.ones((blk, blk)))))  # [N, L, nb, blk]
    totals = b.op(
        "Reshape", b.op("Slice", within, b.i64([blk - 1]), b.i64([blk]), b.i64([3])), b.i64([-1, directions, nb])
    )
    offsets = b.op("MatMul", totals, b.const(np.triu(np.ones((nb, nb)), 1)))  # exclusive, [N, L, nb]
    cdf = b.op("Add", within, b.op("Unsqueeze", offsets, b.i64([3])))
    w = b.op(
        "ReduceSum",
        b.op("Mul", b.op("Abs", cdf), b.const(gaps.reshape(directions, nb, blk))),
        b.i64([1, 2, 3]),
        keepdims=0,
    )
    return b.op("Unsqueeze", b.op("Mul", w, b.const(np.pi / 2.0 / directions)), b.i64([1]))  # [N, 1]


#: column blocks of the triangular whitener product (:func:`_feature_score`)
_WHITENER_BLOCKS = 4


def _feature_score(b: _Builder, early: str, ref) -> str:
    """:meth:`FeatureReference.score` ``[N, 1]`` from its arrays: ``min_k |x W - m_k|^2`` (whitener ``W``,
    whitened class means ``m_k``; ``x`` the early features, in polar form unless the reference is raw)."""
    w = np.asarray(ref.whitener, np.float32)
    means = np.asarray(ref.means_white, np.float32)  # [K, D]
    d = w.shape[0]
    x = b.op("Reshape", early, b.i64([-1, int(np.prod(ref.shape))]))  # [N, D]
    if ref.normalize:  # polar form (FeatureReference): direction and log-norm, [N, D + 1]
        norm = b.op("Max", b.op("ReduceL2", x, b.i64([1]), keepdims=1), b.const(NORM_EPS))
        x = b.op("Concat", b.op("Div", x, norm), b.op("Log", norm), axis=1)
    # W is lower triangular (a Cholesky factor): column block [lo, hi) of x W only needs x[:, lo:] and
    # W[lo:, lo:hi]. Four blocks read 5/8 of W; at batch 1 the product is bound by reading W (4 MiB for
    # D = 1024), and in the fused model that read comes from memory rather than cache.
    # (a whitener with anything above the diagonal is used whole)
    n_blocks = _WHITENER_BLOCKS if not np.triu(w, 1).any() else 1
    edges = [round(d * i / n_blocks) for i in range(n_blocks + 1)]
    blocks = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > lo:
            tail = x if lo == 0 else b.op("Slice", x, b.i64([lo]), b.i64([d]), b.i64([1]))
            blocks.append(b.op("MatMul", tail, b.const(w[lo:, lo:hi])))
    z = blocks[0] if len(blocks) == 1 else b.op("Concat", *blocks, axis=1)  # [N, D]
    diff = b.op("Sub", b.op("Unsqueeze", z, b.i64([1])), b.const(means[None]))  # [N, K, D]
    return b.op("ReduceMin", b.op("ReduceSumSquare", diff, b.i64([2]), keepdims=0), b.i64([1]), keepdims=1)


def _tail_pvalues(b: _Builder, v: str, onehot: str, tables) -> str:
    """:class:`TailPValue` of ``v`` ``[N, J]``; ``tables[c][j]`` is column j's table for real class position c."""
    from onnx import TensorProto

    kr, ms = len(tables), len(tables[0])
    kk = max(t.knots.size for row in tables for t in row)
    knots = np.full((kr, ms, kk), _FLOAT_MAX)
    pvals = np.zeros((kr, ms, kk))
    tail = np.zeros((kr, 4, ms))  # last index, scale, p at the last knot, last knot
    for c, row in enumerate(tables):
        for j, t in enumerate(row):
            knots[c, j, : t.knots.size] = t.knots
            pvals[c, j, : t.knots.size] = t.pvals
            tail[c, :, j] = (t.knots.size - 1, t.scale, t.pvals[-1], t.knots[-1])
    shape = b.i64([-1, ms, kk])
    kn = b.op("Reshape", b.op("MatMul", onehot, b.const(knots.reshape(kr, -1))), shape)  # [N, M, K]
    pv = b.op("Reshape", b.op("MatMul", onehot, b.const(pvals.reshape(kr, -1))), shape)
    last, scale, p_last, k_last = (
        b.op("Squeeze", t, b.i64([1]))
        for t in b.op(
            "Split",
            b.op("Reshape", b.op("MatMul", onehot, b.const(tail.reshape(kr, -1))), b.i64([-1, 4, ms])),
            axis=1,
            outputs=4,
            num_outputs=4,
        )
    )
    vv = b.op("Unsqueeze", v, b.i64([2]))  # [N, M, 1]
    # j = index of the last knot <= v (np.interp's segment), kept inside [0, last - 1]
    # counted in float32 (exact below 2^24 knots) and cast after: ONNX Runtime's float ReduceSum is vectorised,
    # its int64 one is not (5x slower over [N, M, K] at batch 8)
    count = b.op(
        "Cast",
        b.op("ReduceSum", b.op("Cast", b.op("LessOrEqual", kn, vv), to=TensorProto.FLOAT), b.i64([2]), keepdims=1),
        to=TensorProto.INT64,
    )
    last_i = b.op("Cast", b.op("Unsqueeze", last, b.i64([2])), to=TensorProto.INT64)
    j = b.op("Min", b.op("Max", b.op("Sub", count, b.i64(1)), b.i64(0)), b.op("Sub", last_i, b.i64(1)))
    both = b.op("Concat", j, b.op("Add", j, b.i64(1)), axis=2)
    k0, k1 = b.op("Split", b.op("GatherElements", kn, both, axis=2), axis=2, outputs=2, num_outputs=2)
    p0, p1 = b.op("Split", b.op("GatherElements", pv, both, axis=2), axis=2, outputs=2, num_outputs=2)
    one, zero = b.const(1.0), b.const(0.0)
    t = b.op("Div", b.op("Sub", vv, k0), b.op("Max", b.op("Sub", k1, k0), b.const(1e-30)))
    t = b.op("Where", b.op("GreaterOrEqual", vv, k1), one, b.op("Where", b.op("LessOrEqual", vv, k0), zero, t))
    p = b.op("Squeeze", b.op("Add", p0, b.op("Mul", b.op("Sub", p1, p0), t)), b.i64([2]))
    p = b.op(
        "Where",
        b.op("Greater", v, k_last),
        b.op("Mul", p_last, b.op("Exp", b.op("Div", b.op("Sub", k_last, v), scale))),
        p,
    )
    finite = b.op("Not", b.op("Or", b.op("IsNaN", v), b.op("IsInf", v)))
    return b.op("Where", finite, p, zero)  # a score that cannot be judged is maximally suspicious
