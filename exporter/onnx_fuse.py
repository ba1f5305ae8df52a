"""Guard an ONNX classifier without torch: build the fused graph (logits, Grad-CAM, early) in ONNX.

Many clinical models come as ONNX only (from TensorFlow/Keras, from a vendor). Given the classifier
(one image input, NCHW or NHWC, logits output — or their Softmax / LogSoftmax, which is taken off so
that Grad-CAM and the guard see the logits) and two tensor names — ``target`` (the Grad-CAM layer,
[N, C, h, w]) and ``early`` (an early feature map, channels-first too) — :func:`fuse_onnx_model`
appends to the graph:

* the **backward of the head** (every node between ``target`` and the logits), written op by op
  with forward ONNX ops: the gradient of the argmax logit flows back through the head in reverse
  topological order, summed where a tensor has several consumers (see :data:`BACKWARD_RULES` for
  the ops covered; any other op is an :class:`UnsupportedOnnxOpError` naming the node);
* the **Grad-CAM** of pytorch-grad-cam's ``GradCAM`` from the activations and that gradient
  (weights = spatial mean of the gradient, ReLU of the weighted sum, min-max, bilinear resize to the
  input size as constant-matrix products, min-max again — the same sequence as the torch export,
  :func:`_gradcam_nodes`);
* the **early features** average-pooled to a fixed grid (an AveragePool when the grid divides them,
  else constant averaging matrices, :func:`_early_pool_nodes`).

The input is renamed ``image`` (an NHWC model, as tf2onnx converts Keras models, reads it through a
Transpose: every bundle's input is NCHW) and the outputs are ``logits``, ``cam`` and ``early``, the
names of every gamguard bundle. A model older than opset 13 is converted first with the ONNX project's
``onnx.version_converter`` (:func:`upgrade_opset`). A target or early tensor on the channels-last side of a converter's
Transpose is refused with the name of the way out. Only ``numpy``, ``onnx`` and ``onnxruntime`` are
needed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from gamguard.runtime.engines.base import INPUT_NAME, OUTPUT_NAMES
from gamguard.runtime.engines.specialize import (  # one rule for exporter and engines
    CAM_MARGIN,
    POOL_CHANNEL_BLOCK,
    extreme_samples,
)

log = logging.getLogger(__name__)

CAM_EPS = 1e-7
#: the oldest default-domain opset the fused graph is written in; :func:`export_onnx_bundle` converts an
#: older model (opset 7-12, as older exporters and vendors deliver them) with onnx.version_converter
MIN_OPSET = 13


class UnsupportedOnnxOpError(ValueError):
    """A node of the head has no backward rule here."""


# ---------------------------------------------------------------------------------------------
# constant matrices (numpy versions of gradcam.bilinear_matrix / _bin_matrix)
# ---------------------------------------------------------------------------------------------
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` 1-D bilinear resampling with half-pixel centres (``align_corners=False``,
    negative source coordinates clamped to 0), the weights of torch's ``F.interpolate`` and
    ``cv2.resize``'s INTER_LINEAR."""
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1.0 - lam
        m[i, i1] += lam
    return m.astype(np.float32)


def bin_matrix(size: int, bins: int) -> np.ndarray:
    """``[bins, size]`` averaging matrix of adaptive average pooling (torch's bins)."""
    j = np.arange(size)[None, :]
    i = np.arange(bins)[:, None]
    inside = ((i * size < (j + 1) * bins) & (j * bins < (i + 1) * size)).astype(np.float64)
    return (inside / inside.sum(1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# graph building
# ---------------------------------------------------------------------------------------------
@dataclass
class _Builder:
    """Appends nodes and constant initializers with unique names."""

    graph: object
    opset: int = 18
    prefix: str = "gg_"
    counter: int = 0
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)

    def name(self, hint: str) -> str:
        self.counter += 1
        return f"{self.prefix}{hint}_{self.counter}"

    def op(self, op_type: str, inputs, hint: str | None = None, n_out: int = 1, **attrs):
        from onnx import helper

        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def ints(self, values, hint: str = "i") -> str:
        return self.const(np.asarray(values, np.int64), hint, np.int64)

    def reduce(self, op_type: str, x: str, axes, keepdims: int = 1) -> str:
        """ReduceMean/Min/Max/Sum over ``axes``: axes as an input from opset 18 (13 for ReduceSum),
        as an attribute before."""
        axes = [int(a) for a in axes]
        if self.opset >= (13 if op_type == "ReduceSum" else 18):
            return self.op(op_type, [x, self.ints(axes)], keepdims=keepdims)
        return self.op(op_type, [x], axes=axes, keepdims=keepdims)


@dataclass
class _Graph:
    """What the backward rules need to know about the original graph."""

    model: object
    constants: dict  # name -> numpy array (initializers, Constant nodes, constant-folded)
    shapes: dict  # name -> tuple of int | str | None (from shape inference)
    elem_types: dict  # name -> onnx elem type
    differentiable: set  # tensors that depend on the target and carry a float gradient

    def const(self, name: str, what: str, node) -> np.ndarray:
        if name not in self.constants:
            raise UnsupportedOnnxOpError(
                f"node {node.name!r} ({node.op_type}): its {what} ({name!r}) is not a constant; "
                "only constant weights are supported in the head"
            )
        return self.constants[name]

    def shape(self, name: str, node) -> tuple:
        shape = self.shapes.get(name)
        if shape is None:
            raise UnsupportedOnnxOpError(
                f"node {node.name!r} ({node.op_type}): the shape of {name!r} is unknown after ONNX shape "
                "inference and could not be measured with ONNX Runtime (if the model's input size is dynamic, "
                "give --input-shape)"
            )
        return shape

    def static_dims(self, name: str, node, axes) -> list[int]:
        shape = self.shape(name, node)
        dims = [shape[a] for a in axes]
        if not all(isinstance(d, int) for d in dims):
            raise UnsupportedOnnxOpError(
                f"node {node.name!r} ({node.op_type}): dimensions {list(axes)} of {name!r} are not static "
                f"({shape}); give --input-shape"
            )
        return dims


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _unbroadcast(b: _Builder, g: _Graph, grad: str, x: str, y: str, node) -> str:
    """Sum ``grad`` (shaped like ``y``) over the axes along which ``x`` was broadcast."""
    xs, ys = g.shape(x, node), g.shape(y, node)
    lead = len(ys) - len(xs)
    axes = list(range(lead)) + [lead + i for i, d in enumerate(xs) if d == 1 and ys[lead + i] != 1]
    if not axes:
        return grad
    summed = b.reduce("ReduceSum", grad, axes)
    if lead:
        summed = b.op("Reshape", [summed, b.op("Shape", [x])])
    return summed


def _rule_identity(b, g, node, gouts):
    return {node.input[0]: gouts[0]}


def _rule_reshape_like_input(b, g, node, gouts):
    return {node.input[0]: b.op("Reshape", [gouts[0], b.op("Shape", [node.input[0]])])}


def _rule_relu(b, g, node, gouts):
    y = node.output[0]
    zero = b.const(0.0)
    return {node.input[0]: b.op("Where", [b.op("Greater", [y, zero]), gouts[0], zero])}


def _rule_leaky_relu(b, g, node, gouts):
    alpha = float(_attrs(node).get("alpha", 0.01))
    x = node.input[0]
    return {x: b.op("Where", [b.op("Greater", [x, b.const(0.0)]), gouts[0], b.op("Mul", [gouts[0], b.const(alpha)])])}


def _rule_sigmoid(b, g, node, gouts):
    y = node.output[0]
    dy = b.op("Mul", [y, b.op("Sub", [b.const(1.0), y])])
    return {node.input[0]: b.op("Mul", [gouts[0], dy])}


def _rule_tanh(b, g, node, gouts):
    y = node.output[0]
    return {node.input[0]: b.op("Mul", [gouts[0], b.op("Sub", [b.const(1.0), b.op("Mul", [y, y])])])}


def _rule_hard_sigmoid(b, g, node, gouts):
    a = _attrs(node)
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    x = node.input[0]
    lin = b.op("Add", [b.op("Mul", [x, b.const(alpha)]), b.const(beta)])
    inside = b.op("And", [b.op("Greater", [lin, b.const(0.0)]), b.op("Less", [lin, b.const(1.0)])])
    return {x: b.op("Where", [inside, b.op("Mul", [gouts[0], b.const(alpha)]), b.const(0.0)])}


def _rule_hard_swish(b, g, node, gouts):
    # torch's hardswish_backward: 0 for x < -3, g·(x/3 + 0.5) for x <= 3, g above
    x, gy = node.input[0], gouts[0]
    mid = b.op("Mul", [gy, b.op("Add", [b.op("Div", [x, b.const(3.0)]), b.const(0.5)])])
    upper = b.op("Where", [b.op("LessOrEqual", [x, b.const(3.0)]), mid, gy])
    return {x: b.op("Where", [b.op("Less", [x, b.const(-3.0)]), b.const(0.0), upper])}


def _rule_clip(b, g, node, gouts):
    x = node.input[0]
    a = _attrs(node)
    lo = float(g.const(node.input[1], "min", node)) if len(node.input) > 1 and node.input[1] else a.get("min")
    hi = float(g.const(node.input[2], "max", node)) if len(node.input) > 2 and node.input[2] else a.get("max")
    keep = None
    for bound, cmp in ((lo, "Greater"), (hi, "Less")):
        if bound is not None:
            c = b.op(cmp, [x, b.const(float(bound))])
            keep = c if keep is None else b.op("And", [keep, c])
    return {x: gouts[0] if keep is None else b.op("Where", [keep, gouts[0], b.const(0.0)])}


def _rule_erf(b, g, node, gouts):
    x = node.input[0]
    d = b.op("Mul", [b.op("Exp", [b.op("Neg", [b.op("Mul", [x, x])])]), b.const(2.0 / np.sqrt(np.pi))])
    return {x: b.op("Mul", [gouts[0], d])}


def _rule_exp(b, g, node, gouts):
    return {node.input[0]: b.op("Mul", [gouts[0], node.output[0]])}


def _rule_sqrt(b, g, node, gouts):
    return {node.input[0]: b.op("Div", [gouts[0], b.op("Mul", [node.output[0], b.const(2.0)])])}


def _rule_reciprocal(b, g, node, gouts):
    y = node.output[0]
    return {node.input[0]: b.op("Neg", [b.op("Mul", [gouts[0], b.op("Mul", [y, y])])])}


def _rule_neg(b, g, node, gouts):
    return {node.input[0]: b.op("Neg", [gouts[0]])}


def _rule_pow(b, g, node, gouts):
    x, e = node.input[0], node.input[1]
    if e in g.differentiable:
        raise UnsupportedOnnxOpError(f"node {node.name!r} (Pow): a non-constant exponent")
    ev = float(np.asarray(g.const(e, "exponent", node)).reshape(-1)[0])
    d = b.op("Mul", [b.op("Pow", [x, b.const(ev - 1.0)]), b.const(ev)])
    return {x: _unbroadcast(b, g, b.op("Mul", [gouts[0], d]), x, node.output[0], node)}


def _rule_add_sub(b, g, node, gouts):
    out, gy = node.output[0], gouts[0]
    res = {}
    for i, x in enumerate(node.input[:2]):
        if x in g.differentiable:
            gx = gy if (node.op_type == "Add" or i == 0) else b.op("Neg", [gy])
            res[x] = _unbroadcast(b, g, gx, x, out, node)
    return res


def _rule_mul(b, g, node, gouts):
    a, c = node.input[0], node.input[1]
    out, gy = node.output[0], gouts[0]
    res = {}
    if a in g.differentiable:
        res[a] = _unbroadcast(b, g, b.op("Mul", [gy, c]), a, out, node)
    if c in g.differentiable:
        res[c] = _unbroadcast(b, g, b.op("Mul", [gy, a]), c, out, node)
    if a == c and a in g.differentiable:  # x * x
        res[a] = b.op("Mul", [b.op("Mul", [gy, a]), b.const(2.0)])
    return res


def _rule_div(b, g, node, gouts):
    a, c = node.input[0], node.input[1]
    out, gy = node.output[0], gouts[0]
    res = {}
    if a in g.differentiable:
        res[a] = _unbroadcast(b, g, b.op("Div", [gy, c]), a, out, node)
    if c in g.differentiable:
        res[c] = _unbroadcast(b, g, b.op("Neg", [b.op("Div", [b.op("Mul", [gy, out]), c])]), c, out, node)
    return res


def _swap_last2(rank: int) -> list[int]:
    perm = list(range(rank))
    perm[-1], perm[-2] = perm[-2], perm[-1]
    return perm


def _rule_matmul(b, g, node, gouts):
    a, c = node.input[0], node.input[1]
    out, gy = node.output[0], gouts[0]
    ra, rc = len(g.shape(a, node)), len(g.shape(c, node))
    if ra < 2 or rc < 2:
        raise UnsupportedOnnxOpError(f"node {node.name!r} (MatMul): 1-D operands")
    res = {}
    if a in g.differentiable:
        res[a] = _unbroadcast(b, g, b.op("MatMul", [gy, b.op("Transpose", [c], perm=_swap_last2(rc))]), a, out, node)
    if c in g.differentiable:
        res[c] = _unbroadcast(b, g, b.op("MatMul", [b.op("Transpose", [a], perm=_swap_last2(ra)), gy]), c, out, node)
    return res


def _rule_gemm(b, g, node, gouts):
    at = _attrs(node)
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    ta, tb = int(at.get("transA", 0)), int(at.get("transB", 0))
    a, w = node.input[0], node.input[1]
    gy = gouts[0]
    if alpha != 1.0:
        gy = b.op("Mul", [gy, b.const(alpha)])
    res = {}
    # Y = A' B' (+ C), A' = A^T if transA, B' = B^T if transB: dA' = dY B'^T, dB' = A'^T dY
    if a in g.differentiable:
        ga = b.op("Gemm", [gy, w], transB=0 if tb else 1)  # dY @ B'^T
        res[a] = b.op("Transpose", [ga], perm=[1, 0]) if ta else ga
    if w in g.differentiable:
        gw = b.op("Gemm", [a, gy], transA=0 if ta else 1)  # A'^T @ dY
        res[w] = b.op("Transpose", [gw], perm=[1, 0]) if tb else gw
    if len(node.input) > 2 and node.input[2] in g.differentiable:
        gc = gouts[0] if beta == 1.0 else b.op("Mul", [gouts[0], b.const(beta)])
        res[node.input[2]] = _unbroadcast(b, g, gc, node.input[2], node.output[0], node)
    return res


def _rule_transpose(b, g, node, gouts):
    perm = list(_attrs(node).get("perm") or reversed(range(len(g.shape(node.input[0], node)))))
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return {node.input[0]: b.op("Transpose", [gouts[0]], perm=inv)}


def _expand_mean_grad(b, g, node, gy, x, axes, keepdims, mean: bool):
    """Gradient of a ReduceMean/ReduceSum/GlobalAveragePool over ``axes``: broadcast back."""
    rank = len(g.shape(x, node))
    axes = sorted(a % rank for a in axes)
    if not keepdims:
        gy = b.op("Unsqueeze", [gy, b.ints(axes)])
    gx = b.op("Expand", [gy, b.op("Shape", [x])])
    if mean:
        count = int(np.prod(g.static_dims(x, node, axes)))
        gx = b.op("Div", [gx, b.const(float(count))])
    return gx


def _reduce_axes(g, node) -> tuple[list[int], int]:
    at = _attrs(node)
    keepdims = int(at.get("keepdims", 1))
    if "axes" in at:
        axes = list(at["axes"])
    elif len(node.input) > 1 and node.input[1]:
        axes = [int(v) for v in np.asarray(g.const(node.input[1], "axes", node)).reshape(-1)]
    else:
        if int(at.get("noop_with_empty_axes", 0)):
            axes = []
        else:
            axes = list(range(len(g.shape(node.input[0], node))))
    return axes, keepdims


def _rule_reduce_mean(b, g, node, gouts):
    axes, keepdims = _reduce_axes(g, node)
    x = node.input[0]
    return {x: _expand_mean_grad(b, g, node, gouts[0], x, axes, keepdims, node.op_type == "ReduceMean")}


def _rule_global_average_pool(b, g, node, gouts):
    x = node.input[0]
    rank = len(g.shape(x, node))
    return {x: _expand_mean_grad(b, g, node, gouts[0], x, list(range(2, rank)), 1, True)}


def _is_whole_map_pool(g, node) -> bool:
    """An AveragePool / MaxPool whose one window is the whole [h, w] map (no padding): a global pool, as
    older torchvision ResNets (``AvgPool2d(7)``), Caffe-converted and PaddlePaddle models write it."""
    at = _attrs(node)
    shape = g.shape(node.input[0], node)
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]):  # g.shape raises when unknown
        return False
    pads = list(at.get("pads", [0, 0, 0, 0]))
    auto_pad = at.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    dilations = list(at.get("dilations", [1, 1]))
    kernel = list(at.get("kernel_shape", []))
    out = g.shapes.get(node.output[0])
    # a window larger than the map gives one output with ceil_mode (Hugging Face's EfficientNet pools
    # with kernel = its hidden size): without padding, the mean over the map (the window's part past the
    # map is not counted, count_include_pad or not: it is not padding)
    one_window = kernel == list(shape[2:]) or (
        len(kernel) == 2
        and all(k >= d for k, d in zip(kernel, shape[2:]))
        and out is not None
        and tuple(out[2:]) == (1, 1)
    )
    return one_window and not any(pads) and auto_pad in ("NOTSET", "VALID") and dilations == [1, 1]


def _rule_average_pool(b, g, node, gouts):
    if not _is_whole_map_pool(g, node):
        raise UnsupportedOnnxOpError(
            f"node {node.name!r} (AveragePool) pools windows smaller than its input (only a pool over the whole "
            "map has a backward rule here); choose a later target tensor, e.g. the input of the global pooling"
        )
    return _rule_global_average_pool(b, g, node, gouts)


def _rule_batchnorm(b, g, node, gouts):
    at = _attrs(node)
    if int(at.get("training_mode", 0)):
        raise UnsupportedOnnxOpError(f"node {node.name!r} (BatchNormalization) in training mode")
    eps = float(at.get("epsilon", 1e-5))
    scale = g.const(node.input[1], "scale", node).astype(np.float64)
    var = g.const(node.input[4], "variance", node).astype(np.float64)
    x = node.input[0]
    rank = len(g.shape(x, node))
    factor = (scale / np.sqrt(var + eps)).reshape([1, -1] + [1] * (rank - 2))
    return {x: b.op("Mul", [gouts[0], b.const(factor)])}


def _rule_layernorm(b, g, node, gouts):
    at = _attrs(node)
    eps = float(at.get("epsilon", 1e-5))
    x = node.input[0]
    rank = len(g.shape(x, node))
    axis = int(at.get("axis", -1)) % rank
    axes = list(range(axis, rank))
    mu = b.reduce("ReduceMean", x, axes)
    xc = b.op("Sub", [x, mu])
    var = b.reduce("ReduceMean", b.op("Mul", [xc, xc]), axes)
    rstd = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(eps)])])])
    xhat = b.op("Mul", [xc, rstd])
    gy = gouts[0]
    if len(node.input) > 1 and node.input[1]:
        gy = b.op("Mul", [gy, node.input[1]])  # γ (broadcast over the normalised axes)
    # dx = rstd · (gŷ − mean(gŷ) − x̂ · mean(gŷ · x̂))
    m1 = b.reduce("ReduceMean", gy, axes)
    m2 = b.reduce("ReduceMean", b.op("Mul", [gy, xhat]), axes)
    inner = b.op("Sub", [b.op("Sub", [gy, m1]), b.op("Mul", [xhat, m2])])
    return {x: b.op("Mul", [rstd, inner])}


def _rule_conv(b, g, node, gouts):
    at = _attrs(node)
    x, w = node.input[0], node.input[1]
    if w in g.differentiable:
        raise UnsupportedOnnxOpError(f"node {node.name!r} (Conv): non-constant weights")
    wv = g.const(w, "weight", node)
    k = list(wv.shape[2:])
    nd = len(k)
    strides = list(at.get("strides", [1] * nd))
    dil = list(at.get("dilations", [1] * nd))
    group = int(at.get("group", 1))
    auto_pad = at.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    in_sp = g.static_dims(x, node, range(2, 2 + nd))
    out_sp = g.static_dims(node.output[0], node, range(2, 2 + nd))
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads_begin, pads_end = [], []
        for i in range(nd):
            total = max((out_sp[i] - 1) * strides[i] + dil[i] * (k[i] - 1) + 1 - in_sp[i], 0)
            small, big = total // 2, total - total // 2
            pads_begin.append(small if auto_pad == "SAME_UPPER" else big)
            pads_end.append(big if auto_pad == "SAME_UPPER" else small)
    elif auto_pad == "VALID":
        pads_begin = pads_end = [0] * nd
    else:
        pads = list(at.get("pads", [0] * (2 * nd)))
        pads_begin, pads_end = pads[:nd], pads[nd:]
    # ConvTranspose output = (out-1)·s + dil·(k-1) + 1 − pads_begin − pads_end + output_padding
    out_pad = []
    for i in range(nd):
        reached = (out_sp[i] - 1) * strides[i] + dil[i] * (k[i] - 1) + 1 - pads_begin[i] - pads_end[i]
        out_pad.append(in_sp[i] - reached)
    if min(out_pad) < 0:
        raise UnsupportedOnnxOpError(f"node {node.name!r} (Conv): cannot invert its output size")
    return {
        x: b.op(
            "ConvTranspose",
            [gouts[0], w],
            strides=strides,
            dilations=dil,
            group=group,
            pads=pads_begin + pads_end,
            output_padding=out_pad,
        )
    }


#: op type → backward rule ``(builder, graph, node, output grads) -> {input name: grad name}``.
BACKWARD_RULES = {
    "Identity": _rule_identity,
    "Dropout": _rule_identity,
    "Cast": _rule_identity,
    "Flatten": _rule_reshape_like_input,
    "Reshape": _rule_reshape_like_input,
    "Squeeze": _rule_reshape_like_input,
    "Unsqueeze": _rule_reshape_like_input,
    "Transpose": _rule_transpose,
    "Relu": _rule_relu,
    "LeakyRelu": _rule_leaky_relu,
    "Sigmoid": _rule_sigmoid,
    "Tanh": _rule_tanh,
    "HardSigmoid": _rule_hard_sigmoid,
    "HardSwish": _rule_hard_swish,
    "Clip": _rule_clip,
    "Erf": _rule_erf,
    "Exp": _rule_exp,
    "Sqrt": _rule_sqrt,
    "Reciprocal": _rule_reciprocal,
    "Neg": _rule_neg,
    "Pow": _rule_pow,
    "Add": _rule_add_sub,
    "Sub": _rule_add_sub,
    "Mul": _rule_mul,
    "Div": _rule_div,
    "MatMul": _rule_matmul,
    "Gemm": _rule_gemm,
    "GlobalAveragePool": _rule_global_average_pool,
    "AveragePool": _rule_average_pool,
    "ReduceMean": _rule_reduce_mean,
    "ReduceSum": _rule_reduce_mean,
    "BatchNormalization": _rule_batchnorm,
    "LayerNormalization": _rule_layernorm,
    "Conv": _rule_conv,
}

#: Ops whose outputs carry no gradient (integer shape arithmetic on the way to a Reshape).
_NON_DIFFERENTIABLE = {
    "Shape",
    "Size",
    "ArgMax",
    "ArgMin",
    "Equal",
    "Greater",
    "Less",
    "Not",
    "And",
    "Or",
    "ConstantOfShape",
    "NonZero",
    "Range",
}


# ---------------------------------------------------------------------------------------------
# the fuse
# ---------------------------------------------------------------------------------------------
@dataclass
class FuseInfo:
    """Facts about a fused model, for the manifest."""

    input_name: str
    logits_name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    target_shape: tuple
    early_shape: tuple
    early_hw: tuple[int, int]
    head_ops: list[str]
    input_layout: str = "nchw"
    output_activation: str | None = None  # "Softmax" / "LogSoftmax" the model applied to its logits, removed


INPUT_LAYOUTS = ("auto", "nchw", "nhwc")


def input_layout_of(shape, requested: str = "auto") -> str:
    """``nchw`` or ``nhwc`` for a 4-D image input of ``shape``. ``auto``: NHWC when the last axis is 1 or 3
    (grey or RGB channels) and axis 1 is not, which is how TensorFlow/Keras models arrive (tf2onnx keeps
    their input channels-last); else NCHW. An explicit ``nchw`` / ``nhwc`` is taken as given."""
    if requested not in INPUT_LAYOUTS:
        raise ValueError(f"input layout must be one of {', '.join(INPUT_LAYOUTS)}, got {requested!r}")
    if requested != "auto":
        return requested
    channels = (1, 3)
    if shape[3] in channels and shape[1] not in channels:
        return "nhwc"
    return "nchw"


#: ops that keep their first input's layout (elementwise, or a channel-agnostic activation)
_LAYOUT_PRESERVING = {
    "Identity", "Relu", "Clip", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Elu", "Selu",
    "Softplus", "Erf", "Mul", "Add", "Sub", "Div", "Max", "Min", "Neg", "Abs",
}  # fmt: skip


def _channels_last(graph, name: str, producer: dict, nhwc_input: str | None) -> bool:
    """Whether ``name`` is a channels-last view: reached from an NCHW→NHWC Transpose (perm 0,2,3,1) or from
    the NHWC input through layout-preserving ops, or read by an NHWC→NCHW Transpose (perm 0,3,1,2). The
    pattern converters such as tf2onnx leave where they keep a tensor NHWC; other evidence of layout
    does not exist in an ONNX graph."""
    t = name
    for _ in range(64):
        if t == nhwc_input:
            return True
        node = producer.get(t)
        if node is None:
            break
        if node.op_type == "Transpose":
            return list(_attrs(node).get("perm", [])) == [0, 2, 3, 1]
        if node.op_type not in _LAYOUT_PRESERVING or not node.input:
            break
        t = node.input[0]
    return any(n.op_type == "Transpose" and list(_attrs(n).get("perm", [])) == [0, 3, 1, 2] and name in n.input
               for n in graph.node)  # fmt: skip


def _drop_unused_domains(model) -> None:
    """Remove opset imports of domains no node uses (tf2onnx declares ``ai.onnx.ml`` in every model); a
    domain a node does use stays, and the bundle check refuses it."""
    used = {n.domain for n in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    if len(kept) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(kept)


def default_opset(model) -> int | None:
    """The model's default-domain (``ai.onnx``) opset version, or None when it imports none."""
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def upgrade_opset(model, source: str = "the model"):
    """``model`` converted to :data:`MIN_OPSET` with ``onnx.version_converter`` (the ONNX project's own
    converter), or ``model`` itself when it is that recent already. Older exporters (torch's TorchScript
    exporter, tf2onnx, vendors' tools) still write opset 9-12. The conversion is not trusted on its own:
    :func:`export_onnx_bundle` runs the fused model against the unconverted original. Raises ValueError
    (naming ``source``) when the converter cannot do it."""
    import onnx
    from onnx import version_converter

    opset = default_opset(model)
    if opset is None:
        raise ValueError(f"{source} imports no default-domain (ai.onnx) opset: not an ONNX classifier")
    if opset >= MIN_OPSET:
        return model
    advice = (
        f"re-export the model at opset {MIN_OPSET} or later (torch.onnx.export(..., opset_version=17), "
        "tf2onnx --opset 17)"
    )
    # experimental ops of old opsets (ImageScaler, Crop, ...) are gone from ONNX: nothing converts them
    gone = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)})
    if gone:
        raise ValueError(
            f"{source} is ONNX opset {opset} and uses {', '.join(gone)}, which ONNX no longer defines: it cannot "
            f"be converted to opset {MIN_OPSET}; {advice}"
        )
    try:
        converted = version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(" failed: ")[-1]
        raise ValueError(
            f"{source} is ONNX opset {opset}; gamguard needs opset {MIN_OPSET} or later and "
            f"onnx.version_converter could not convert it ({detail}); {advice}"
        ) from exc
    log.info("%s: converted from ONNX opset %d to %d with onnx.version_converter", source, opset, MIN_OPSET)
    return converted


def _probe_shapes(model, input_name: str, layout: str, chw, names) -> dict:
    """Shapes of the float tensors ``names`` measured with ONNX Runtime at batch 1 and 2: a dim that
    changes with the batch is the (symbolic) ``"batch"``, the others are static. For tensors whose shape
    ONNX shape inference cannot derive (a Reshape to a computed shape); tensors the run cannot produce
    stay unknown."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in known
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as written
    try:
        session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        runs = []
        for batch in (1, 2):
            c, h, w = chw
            shape = (batch, c, h, w) if layout == "nchw" else (batch, h, w, c)
            x = np.random.default_rng(batch).standard_normal(shape).astype(np.float32)
            runs.append(dict(zip(outputs, (np.shape(v) for v in session.run(outputs, {input_name: x})))))
    except Exception as exc:  # noqa: BLE001 - a model ONNX Runtime cannot run says so in the parity check
        log.debug("shape probe with ONNX Runtime failed: %s", exc)
        return {}
    measured = {}
    for n in names:
        a, b = runs[0].get(n), runs[1].get(n)
        if a is not None and b is not None and len(a) == len(b):
            measured[n] = tuple(int(x) if x == y else "batch" for x, y in zip(a, b))
    return measured


def _shape_of(value_info) -> tuple | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        dims.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None))
    return tuple(dims)


def _fold_constants(model) -> dict:
    """Initializers, Constant nodes, and nodes computed from them only (evaluated with the reference
    evaluator), so weights behind a Transpose/Reshape/Cast are recognised as constants."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = ReferenceEvaluator(_single_node_model(node, [], model)).run(None, {})[0]
        elif (
            node.input
            and all((not i) or i in consts for i in node.input)
            and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike")
        ):
            try:
                outs = ReferenceEvaluator(_single_node_model(node, [i for i in node.input if i], model)).run(
                    None, {i: consts[i] for i in node.input if i}
                )
            except Exception:  # an op the reference evaluator lacks: treat as non-constant
                continue
            consts.update(zip(node.output, outs))
    return consts


def _single_node_model(node, inputs, model):
    from onnx import helper

    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info(i, 0, None) for i in inputs],
        [helper.make_tensor_value_info(o, 0, None) for o in node.output],
    )
    return helper.make_model(graph, opset_imports=list(model.opset_import))


def fuse_onnx_model(model, target: str, early: str, *, input_shape=None, early_pool=(8, 8), input_layout="auto"):
    """Return ``(fused ModelProto, FuseInfo)`` for an ONNX classifier (see the module docstring).

    Args:
        model: ``onnx.ModelProto``: one float image input (NCHW, or NHWC as TensorFlow/Keras models
            converted with tf2onnx have it), first output the logits ``[N, K]`` or their Softmax /
            LogSoftmax (taken off: :func:`_strip_output_activation`).
        target / early: tensor names of the Grad-CAM activations and of the early features, both
            channels-first ``[N, C, h, w]``.
        input_shape: ``(C, H, W)``; required when the input's spatial dims are not static.
        early_pool: average-pool the early features to this grid in-graph (``None``: keep them).
        input_layout: ``nchw``, ``nhwc`` or ``auto`` (:func:`input_layout_of`). An NHWC model gets an
            NCHW ``image`` input and a Transpose in front of its own input, so every bundle has the same
            input layout.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())  # never modify the caller's model
    graph = model.graph
    opset = default_opset(model)
    if opset is None or opset < MIN_OPSET:
        raise ValueError(
            f"the model's ONNX opset is {opset}; opset {MIN_OPSET} or later is needed (convert it first: upgrade_opset)"
        )
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ValueError(f"the model must have one input tensor (NCHW image), it has {[i.name for i in inputs]}")
    if not graph.output:
        raise ValueError("the model has no outputs")
    inp = inputs[0]
    logits_name, output_activation = _strip_output_activation(graph)
    if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError(f"input {inp.name!r} must be float32")
    shape = _shape_of(inp)
    if shape is None or len(shape) != 4:
        raise ValueError(f"input {inp.name!r} must be a 4-D image batch (NCHW or NHWC), its shape is {shape}")
    layout = input_layout_of(shape, input_layout)
    chw_axes = (1, 2, 3) if layout == "nchw" else (3, 1, 2)  # where C, H, W are in the model's input
    if input_shape is not None:
        c, h, w = (int(v) for v in input_shape)
        for axis, want in zip(chw_axes, (c, h, w)):
            if isinstance(shape[axis], int) and shape[axis] != want:
                raise ValueError(
                    f"--input-shape {c},{h},{w} (C,H,W) disagrees with the model's {layout.upper()} input {shape} "
                    f"(axis {axis})"
                )
    else:
        if not all(isinstance(shape[a], int) for a in chw_axes):
            raise ValueError(f"the model's input {inp.name!r} has dynamic dims {shape}: give --input-shape C,H,W")
        c, h, w = (shape[a] for a in chw_axes)
    dims = inp.type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_param = "batch"
    for axis, v in zip(chw_axes, (c, h, w)):
        dims[axis].Clear()
        dims[axis].dim_value = v

    names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    taken = [n for n in (INPUT_NAME, *OUTPUT_NAMES[1:]) if n in names and n != inp.name]
    if taken or (OUTPUT_NAMES[0] in names and OUTPUT_NAMES[0] != logits_name):
        raise ValueError(
            f"the model already has tensors named {taken or [OUTPUT_NAMES[0]]}; gamguard needs "
            "those names for its input and outputs (rename them first)"
        )
    for role, name in (("target", target), ("early", early)):
        if name not in names:
            raise ValueError(f"{role} tensor {name!r} is not produced in the graph (look the names up in Netron)")

    # shapes of every tensor (value_info dropped first: stale batch sizes would contradict "batch")
    del graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ValueError(f"ONNX shape inference failed on the model: {exc}") from exc
    shapes, elem_types = {}, {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[vi.name] = _shape_of(vi)
        elem_types[vi.name] = vi.type.tensor_type.elem_type
    # what ONNX shape inference leaves unknown (paddle2onnx's flatten: Reshape to Concat(Shape(x)[:1], [-1]))
    # is measured by running the model (_probe_shapes)
    unknown = [
        o
        for n in graph.node
        for o in n.output
        if o
        and (shapes.get(o) is None or None in shapes[o])
        and elem_types.get(o) == TensorProto.FLOAT  # an output of a wrongly declared type fails the probe
    ]
    if unknown:
        shapes.update(_probe_shapes(model, inp.name, layout, (c, h, w), unknown))
    for role, name in (("target", target), ("early", early)):
        s = shapes.get(name)
        if s is None or len(s) != 4 or not all(isinstance(v, int) for v in s[1:]):
            raise ValueError(f"{role} tensor {name!r} must be [N, C, h, w] with static C, h, w; its shape is {s}")
    if shapes[target][2] * shapes[target][3] == 1:
        # one position: ReLU and min-max leave a map of zeros for every input, and the attention check
        # would judge nothing
        raise ValueError(
            f"target tensor {target!r} {shapes[target]} has a 1x1 map: its Grad-CAM is blank for every input; "
            "name an earlier tensor with a spatial map, or export at a larger input size (--input-shape)"
        )
    logits_shape = shapes.get(logits_name)
    if logits_shape is None or len(logits_shape) != 2 or not isinstance(logits_shape[1], int):
        raise ValueError(f"the first output {logits_name!r} must be logits [N, K], its shape is {logits_shape}")

    constants = _fold_constants(model)
    # weights are initializers that need not be graph inputs (tf2onnx lists none): shape inference
    # leaves them out of value_info, their arrays say it
    for name, value in constants.items():
        if shapes.get(name) is None:
            shapes[name] = tuple(int(d) for d in np.shape(value))
    producer = {o: n for n in graph.node for o in n.output}
    for role, name in (("target", target), ("early", early)):
        if _channels_last(graph, name, producer, inp.name if layout == "nhwc" else None):
            raise ValueError(
                f"{role} tensor {name!r} {shapes[name]} is channels-last (NHWC: it comes from, or goes into, a "
                "Transpose between NHWC and NCHW); name the channels-first tensor on the other side of that "
                "Transpose (e.g. the Conv's output; tf2onnx's default transpose optimizer keeps the convolutions "
                "channels-first)"
            )

    # head: nodes that depend on target and that the logits depend on
    depends = {target}
    for n in graph.node:  # ONNX graphs are topologically sorted
        if any(i in depends for i in n.input):
            depends.update(n.output)
    if logits_name not in depends:
        raise ValueError(f"the logits {logits_name!r} do not depend on the target tensor {target!r}")
    if early in depends and early != target:
        raise ValueError(f"early tensor {early!r} is computed from the target tensor {target!r}; pick an earlier one")
    needed, stack = set(), [logits_name]
    while stack:
        t = stack.pop()
        if t in needed or t == target:
            continue
        needed.add(t)
        if t in producer:
            stack.extend(i for i in producer[t].input if i)
    head = [n for n in graph.node if any(o in needed for o in n.output) and any(o in depends for o in n.output)]
    # a head input that is neither from target nor constant: a skip connection around the target
    for n in head:
        for i in n.input:
            if i and i not in depends and i not in constants and elem_types.get(i) == TensorProto.FLOAT:
                raise UnsupportedOnnxOpError(
                    f"node {n.name!r} ({n.op_type}) after the target also reads {i!r}, computed before or beside "
                    f"the target tensor {target!r} (a skip connection around it); choose a later target tensor"
                )
    differentiable = {t for t in depends if elem_types.get(t) in (TensorProto.FLOAT, None) and t not in constants}
    for n in head:
        if n.op_type in _NON_DIFFERENTIABLE:
            differentiable.difference_update(n.output)
    g = _Graph(model, constants, shapes, elem_types, differentiable)
    b = _Builder(graph, opset)

    k = logits_shape[1]
    grads = _seed_gradient(b, g, producer.get(logits_name), logits_name, k)
    pool = _global_pool_of(g, head, target)
    weights = None
    for n in reversed(head):
        gouts = []
        for o in n.output:
            gs = grads.get(o)
            if not gs:
                gouts.append(None)
            elif len(gs) == 1:
                gouts.append(gs[0])
            else:
                gouts.append(b.op("Sum", gs))
        if gouts[0] is None or not any(i in differentiable for i in n.input):
            continue
        if n is pool:
            weights = _pooled_channel_weights(b, gouts[0], shapes[target])
            continue
        rule = BACKWARD_RULES.get(n.op_type)
        if rule is None:
            raise UnsupportedOnnxOpError(
                f"node {n.name!r} ({n.op_type}) in the head after {target!r} has no backward rule here "
                f"(supported: {', '.join(sorted(BACKWARD_RULES))}); choose a later target tensor, e.g. the "
                "input of the global pooling"
            )
        for name, gx in rule(b, g, n, gouts).items():
            if name in differentiable:
                grads.setdefault(name, []).append(gx)
    if weights is None:
        if not grads.get(target):
            raise ValueError(f"no gradient reaches the target tensor {target!r}")
        gt = grads[target]
        grad = gt[0] if len(gt) == 1 else b.op("Sum", gt)
        weights = b.reduce("ReduceMean", grad, [2, 3], keepdims=0)  # [N, C]

    cam_out = _gradcam_nodes(b, target, weights, shapes[target], (h, w))
    _, ce, he, we = shapes[early]
    early_out, early_shape = _early_pool_nodes(b, early, (ce, he, we), early_pool)

    # wire: input renamed `image` (NCHW: an NHWC model reads it through a Transpose), outputs logits /
    # cam / early
    old_in = inp.name
    if target == old_in or early == old_in:
        raise ValueError("the target and early tensors must be computed by the model, not its input")
    if layout == "nhwc":
        graph.node.insert(
            0, helper.make_node("Transpose", [INPUT_NAME], [old_in], name="gg_input_nchw_to_nhwc", perm=[0, 2, 3, 1])
        )
        for d, v in zip(inp.type.tensor_type.shape.dim[1:], (c, h, w)):
            d.Clear()
            d.dim_value = v
    else:
        for n in list(graph.node) + b.nodes:
            for i, name in enumerate(n.input):
                if name == old_in:
                    n.input[i] = INPUT_NAME
    inp.name = INPUT_NAME
    graph.node.extend(b.nodes)
    graph.initializer.extend(b.inits)
    final = {}
    for out_name, src in zip(OUTPUT_NAMES, (logits_name, cam_out, early_out)):
        if src == out_name:
            final[out_name] = src
            continue
        graph.node.append(helper.make_node("Identity", [src], [out_name], name=f"gg_out_{out_name}"))
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.FLOAT, ["batch", h, w]),
            helper.make_tensor_value_info(OUTPUT_NAMES[2], TensorProto.FLOAT, ["batch", *early_shape]),
        ]
    )
    _drop_unused_domains(model)
    info = FuseInfo(
        input_name=old_in,
        input_layout=layout,
        logits_name=logits_name,
        input_shape=(c, h, w),
        num_classes=k,
        target_shape=tuple(shapes[target][1:]),
        early_shape=early_shape,
        early_hw=(he, we),
        head_ops=[f"{n.op_type} {n.name}" for n in head],
        output_activation=output_activation,
    )
    return model, info


#: Logged when a model's output is a Sigmoid: it is exported as it is (its Grad-CAM is that of the sigmoid's
#: output, its argmax the logits'), but the guard softmaxes the outputs as logits.
SIGMOID_WARNING = (
    "the model's %s: independent per-class probabilities (a multi-label or one-output binary model); it is "
    "exported as it is, and the label (the largest output) is the model's, but gamguard treats the outputs as "
    "logits, so the probabilities it serves are a softmax of the model's sigmoid outputs, not the model's own; "
    "gamguard is meant for single-label classifiers with softmax classes and a garbage class (finetune_with_garbage)"
)

#: What a classifier may apply to its logits as its last step; the fused graph's ``logits`` are taken
#: before it (the guard's softmax of them gives the model's own probabilities again).
OUTPUT_ACTIVATIONS = ("Softmax", "LogSoftmax")
_OUTPUT_RESHAPES = ("Identity", "Reshape", "Flatten", "Squeeze")


def _strip_output_activation(graph) -> tuple[str, str | None]:
    """The logits tensor of a model whose first output may be their Softmax / LogSoftmax (Keras'
    ``Dense(K, activation="softmax")``, a torch model ending in ``nn.Softmax``), through any Identity
    nodes, and the activation's op type (``None``: the output is the logits). Those nodes are removed
    when nothing else reads them. Grad-CAM is defined on the score before the softmax (Selvaraju et al.,
    2017, section 3), and the guard's p-values and served probabilities need the logits, so a final
    Sigmoid (independent per-class probabilities) is kept, with a warning (:data:`SIGMOID_WARNING`)."""
    output = graph.output[0].name
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    other_outputs = {o.name for o in graph.output[1:]}
    chain, name = [], output
    # an Identity, or a reshape of the probabilities (MONAI's Classifier ends in Softmax → Reshape(K)): the
    # logits must still be [N, K] (checked after shape inference) and the parity check compares the values
    while name in producer and producer[name].op_type in _OUTPUT_RESHAPES:
        chain.append(producer[name])
        name = producer[name].input[0]
    last = producer.get(name)
    if last is None or last.op_type not in (*OUTPUT_ACTIVATIONS, "Sigmoid"):
        return output, None
    if last.op_type == "Sigmoid":
        log.warning(SIGMOID_WARNING, f"output {output!r} is a Sigmoid ({last.name!r})")
        return output, None
    axis = next((a.i for a in last.attribute if a.name == "axis"), -1)
    if axis not in (1, -1):
        raise ValueError(f"the model's output {output!r} is a {last.op_type} over axis {axis}, not over the classes")
    chain.append(last)
    # the chain's tensors are dropped with it: nothing but the output may read them
    if any(readers.get(t, 0) > 1 or (t in other_outputs) for n in chain[1:] for t in n.output) or any(
        readers.get(t, 0) > 0 for t in chain[0].output
    ):
        return output, None  # something else reads the probabilities: leave the model as it is
    for n in chain:
        graph.node.remove(n)
    graph.output[0].name = last.input[0]  # float, [N, K] once shape inference has run
    graph.output[0].type.tensor_type.ClearField("shape")
    return last.input[0], last.op_type


def _seed_gradient(b: _Builder, g: _Graph, last, logits_name: str, k: int) -> dict[str, list[str]]:
    """The gradient of each row's argmax logit (first index on ties, as torch's argmax) to start the
    backward from. When the logits come straight from a Gemm with a constant weight (a final Linear),
    the gradient at that Gemm's input is the weight's argmax row: one Gather, where the Gemm's rule
    applied to a one-hot would need Equal → Cast → Gemm (the same values: the one-hot adds exact zeros)."""
    from onnx import TensorProto

    if last is not None and last.op_type == "Gemm":
        at = _attrs(last)
        a, w = last.input[0], last.input[1]
        if not int(at.get("transA", 0)) and w in g.constants and a in g.differentiable:
            cls = b.op("ArgMax", [logits_name], axis=1, keepdims=0)  # [N] int64
            if int(at.get("transB", 0)):
                row = b.op("Gather", [w, cls], axis=0)  # weight [K, F]
            else:
                row = b.op("Transpose", [b.op("Gather", [w, cls], axis=1)], perm=[1, 0])  # weight [F, K]
            alpha = float(at.get("alpha", 1.0))
            return {a: [row if alpha == 1.0 else b.op("Mul", [row, b.const(alpha)])]}
    cls = b.op("ArgMax", [logits_name], axis=1, keepdims=1)  # [N, 1] int64
    onehot = b.op("Cast", [b.op("Equal", [b.ints(np.arange(k)[None, :]), cls])], to=TensorProto.FLOAT)
    return {logits_name: [onehot]}


def _global_pool_of(g: _Graph, head, target: str):
    """The head node that pools ``target`` over its whole map, when that is the head's only use of
    ``target``: GlobalAveragePool, ReduceMean over axes 2 and 3, an AveragePool over the whole map — or
    their max counterparts (GlobalMaxPool, ReduceMax, a whole-map MaxPool: Keras' GlobalMaxPooling2D,
    torch's adaptive max pool). For Grad-CAM both give the same channel weights: the gradient at the
    pooled value, spread over the map (the mean) or given to its maximum (the max), averaged over the
    map's h·w positions is that gradient / (h·w) either way. Else None."""
    users = [n for n in head if target in n.input]
    if len(users) != 1 or users[0].input[0] != target:
        return None
    n = users[0]
    if n.op_type in ("GlobalAveragePool", "GlobalMaxPool"):
        return n
    if n.op_type in ("AveragePool", "MaxPool") and len(n.output) == 1 and _is_whole_map_pool(g, n):
        return n
    if n.op_type in ("ReduceMean", "ReduceMax"):
        axes, _ = _reduce_axes(g, n)
        rank = len(g.shape(target, n))
        if rank == 4 and sorted(a % rank for a in axes) == [2, 3]:
            return n
    return None


def _pooled_channel_weights(b: _Builder, grad_pooled: str, target_shape) -> str:
    """Grad-CAM channel weights ``[N, C]`` from the gradient at the global pool's output: d(score)/dA is
    that gradient / (h·w) at every position, and the weights are its spatial mean — the same value,
    without broadcasting it to [N, C, h, w] and averaging it back."""
    _, c, h, w = target_shape
    flat = b.op("Reshape", [grad_pooled, b.ints([-1, c])])
    return b.op("Div", [flat, b.const(float(h * w))])


def _gradcam_nodes(b: _Builder, target: str, weights: str, target_shape, out_hw) -> str:
    """The CAM ``[N, H, W]`` from the activations and channel weights, the sequence of
    :func:`gamguard.exporter.gradcam.gradcam_map` for a static size: the second min-max applied to the
    small map, with min and max read at the resampled map's possible extremes (:func:`extreme_samples`),
    so that the full-size map is written once (by the resize), inside [0, 1] by :data:`CAM_MARGIN`."""
    _, ct, ht, wt = target_shape
    h, w = out_hw
    acts = b.op("Reshape", [target, b.ints([-1, ct, ht * wt])])
    cam = b.op("MatMul", [b.op("Unsqueeze", [weights, b.ints([1])]), acts])  # [N, 1, hw]
    cam = b.op("Relu", [b.op("Reshape", [cam, b.ints([-1, ht, wt])])])
    cam = b.op("Sub", [cam, b.reduce("ReduceMin", cam, [1, 2])])
    cam = b.op("Div", [cam, b.op("Add", [b.const(CAM_EPS), b.reduce("ReduceMax", cam, [1, 2])])])
    rows, cols = bilinear_matrix(ht, h), bilinear_matrix(wt, w)
    rows_ext, cols_ext = rows[extreme_samples(rows)], cols[extreme_samples(cols)]
    ext = b.op("MatMul", [b.const(rows_ext, "interp_rows_ext"), b.op("MatMul", [cam, b.const(cols_ext.T.copy())])])
    lo = b.reduce("ReduceMin", ext, [1, 2])
    hi = b.reduce("ReduceMax", ext, [1, 2])
    den = b.op("Add", [b.const(CAM_EPS), b.op("Sub", [hi, lo])])
    den = b.op("Add", [den, b.op("Mul", [den, b.const(2.0 * CAM_MARGIN)])])  # as gradcam_map writes it
    cam = b.op("Add", [b.op("Div", [b.op("Sub", [cam, lo]), den]), b.const(CAM_MARGIN)])  # see CAM_MARGIN
    return b.op("MatMul", [b.const(rows, "interp_rows"), b.op("MatMul", [cam, b.const(cols.T.copy(), "interp_cols")])])


def _early_pool_nodes(b: _Builder, early: str, early_chw, early_pool) -> tuple[str, tuple[int, int, int]]:
    """``(tensor, shape)`` of the early features average-pooled to ``early_pool`` (adaptive pooling's
    bins): an AveragePool when the sides are multiples of the grid and the channels of
    :data:`POOL_CHANNEL_BLOCK` (ONNX Runtime runs it in the convolutions' blocked layout, without
    reordering the full-size map), else constant averaging matrices; ``early_pool=None`` keeps them whole."""
    ce, he, we = early_chw
    if early_pool is None:
        return b.op("Identity", [early]), (ce, he, we)
    oh, ow = int(early_pool[0]), int(early_pool[1])
    if he % oh == 0 and we % ow == 0 and ce % POOL_CHANNEL_BLOCK == 0:
        kernel = [he // oh, we // ow]
        return b.op("AveragePool", [early], kernel_shape=kernel, strides=kernel), (ce, oh, ow)
    pr = b.const(bin_matrix(he, oh), "pool_rows")
    pc = b.const(bin_matrix(we, ow).T.copy(), "pool_cols")
    return b.op("MatMul", [pr, b.op("MatMul", [early, pc])]), (ce, oh, ow)


def resolve_garbage_class(class_names, garbage_class) -> int:
    """``garbage_class`` as an index into ``class_names`` (given as a name or an index)."""
    if isinstance(garbage_class, str) and not garbage_class.lstrip("-").isdigit():
        if garbage_class not in class_names:
            raise ValueError(f"garbage class {garbage_class!r} is not one of {class_names}")
        return class_names.index(garbage_class)
    index = int(garbage_class)
    if not 0 <= index < len(class_names):
        raise ValueError(f"garbage class index {index} is out of range for {len(class_names)} classes")
    return index


def apply_output_activation(logits: np.ndarray, activation: str | None) -> np.ndarray:
    """What the original model outputs, from the fused graph's logits (see :func:`_strip_output_activation`)."""
    if activation is None:
        return logits
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return (np.exp(log_p) if activation == "Softmax" else log_p).astype(np.float32)


def export_onnx_bundle(
    onnx_path,
    out_dir,
    *,
    target_tensor: str,
    early_tensor: str,
    class_names,
    garbage_class,
    input_shape=None,
    normalization=None,
    model_name: str | None = None,
    model_version: str = "1",
    early_pool=(8, 8),
    resize: str = "stretch",
    photometric: str = "MONOCHROME2",
    seed: int = 0,
    input_layout: str = "auto",
) -> dict:
    """Guard an ONNX classifier: write ``out_dir/model.onnx`` (fused) and ``bundle.json``; no torch.

    The fused model is checked with ``onnx.checker`` and gamguard's graph rules, and run with ONNX
    Runtime against the original at batches 2, 3 and 1: the logits must agree (relative 1e-4), the
    early features must equal the original's tensor, the map must lie in [0, 1]. Returns the manifest.
    ``normalization`` is ``(mean, std)`` (scalars or per channel) applied to pixels in [0, 1]; default
    mean 0, std 1. A 3-channel model is fed the grey image replicated to every channel. ``input_layout``:
    the model's input layout (see :func:`input_layout_of`); the bundle's input is NCHW either way. A model
    older than opset :data:`MIN_OPSET` is converted first (:func:`upgrade_opset`), and the parity check
    runs the unconverted original, so a conversion that changed the model is caught.
    """
    import shutil
    import tempfile
    import time
    from pathlib import Path

    import onnx
    import onnxruntime as ort

    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.bundle import InputSpec

    from .onnx_checks import (
        LOGITS_RTOL,
        ExportError,
        as_mean_std,
        check_onnx_graph,
        check_out_dir,
        max_rel,
        ort_session,
        prepare_out_dir,
    )

    t_start = time.perf_counter()
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise ValueError(f"{onnx_path} does not exist")
    check_out_dir(out_dir)
    class_names = [str(n) for n in class_names]
    garbage_index = resolve_garbage_class(class_names, garbage_class)
    try:
        original = onnx.load(str(onnx_path))
    except Exception as exc:
        raise ValueError(f"{onnx_path}: not a readable ONNX model: {exc}") from exc
    try:  # a converter's broken output is the source's fault: say so before fusing anything
        onnx.checker.check_model(original)
    except Exception as exc:
        raise ValueError(
            f"{onnx_path}: the model itself is not valid ONNX (fix or re-convert it first): "
            f"{str(exc).strip().splitlines()[0]}"
        ) from exc
    source_opset = default_opset(original)
    # an older model is converted first; the parity check below runs the unconverted original
    fused, info = fuse_onnx_model(
        upgrade_opset(original, str(onnx_path)),
        target_tensor,
        early_tensor,
        input_shape=input_shape,
        early_pool=early_pool,
        input_layout=input_layout,
    )
    if info.num_classes != len(class_names):
        raise ValueError(f"the model has {info.num_classes} outputs but {len(class_names)} class names were given")
    c, h, w = info.input_shape
    mean, std = as_mean_std(normalization if normalization is not None else (0.0, 1.0), c)
    spec = InputSpec(channels=c, height=h, width=w, mean=mean, std=std, resize=resize, photometric=photometric)

    # the original with the early tensor exposed: the reference for the parity check
    reference = onnx.ModelProto.FromString(original.SerializeToString())
    reference.graph.output.extend([onnx.helper.make_tensor_value_info(early_tensor, onnx.TensorProto.FLOAT, None)])
    ref_input = info.input_name
    pool = None
    if early_pool is not None:
        he, we = info.early_hw
        pool = (bin_matrix(he, early_pool[0]), bin_matrix(we, early_pool[1]))

    with tempfile.TemporaryDirectory(prefix="gamguard-export-") as tmp:
        tmp_model = Path(tmp) / bundle_mod.MODEL_FILE
        onnx.save(fused, str(tmp_model))
        op_types = check_onnx_graph(tmp_model)
        session = ort_session(tmp_model)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        ref_session = ort.InferenceSession(reference.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        parity = []
        for batch in (2, 3, 1):
            x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
            logits, cam, early = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
            ref_x = x.transpose(0, 2, 3, 1) if info.input_layout == "nhwc" else x  # the original's own layout
            ref_out = ref_session.run(None, {ref_input: np.ascontiguousarray(ref_x)})
            ref_logits, ref_early = ref_out[0], ref_out[-1]
            logits = apply_output_activation(logits, info.output_activation)  # the model's own output again
            if info.output_activation and ref_logits.shape != logits.shape and ref_logits.size == logits.size:
                ref_logits = ref_logits.reshape(logits.shape)  # the activation's reshapes, taken off with it
            if pool is not None:
                ref_early = pool[0] @ ref_early @ pool[1].T
            result = {
                "batch": batch,
                "logits_max_rel": max_rel(logits, ref_logits),
                "early_max_rel": max_rel(early, ref_early),
                "cam_range": [float(cam.min()), float(cam.max())],
            }
            problems = []
            if result["logits_max_rel"] > LOGITS_RTOL:
                problems.append(f"logits differ from the original model by {result['logits_max_rel']:.2e}")
            if result["early_max_rel"] > 1e-4:
                problems.append(f"early features differ by {result['early_max_rel']:.2e}")
            if not (-1e-6 <= cam.min() and cam.max() <= 1 + 1e-6) or not np.isfinite(cam).all():
                problems.append(f"cam outside [0, 1]: {result['cam_range']}")
            if problems:
                raise ExportError(
                    f"the fused model does not reproduce the original at batch {batch}: " + "; ".join(problems)
                )
            parity.append(result)
        del session, ref_session
        prepare_out_dir(out_dir)
        shutil.copyfile(tmp_model, out_dir / bundle_mod.MODEL_FILE)

    manifest = {
        "model": {"name": str(model_name or onnx_path.stem), "version": str(model_version)},
        "class_names": class_names,
        "garbage_class": garbage_index,
        "input": spec.to_manifest(),
        "layers": {"target": target_tensor, "early": early_tensor},
        "outputs": {"cam": [h, w], "early": list(info.early_shape)},
        "export": {
            "opset": default_opset(fused),
            "exporter": "onnx-fuse",
            "source": onnx_path.name,
            "source_input_layout": info.input_layout,
            "source_opset": source_opset,
            "opset_converted_by": "onnx.version_converter" if source_opset < MIN_OPSET else None,
            # the model's last op, taken off: the bundle's logits are its input
            "output_activation_removed": info.output_activation,
            "head_kind": "onnx",
            "head": info.head_ops,
            "early_pool": list(early_pool) if early_pool else None,
            "dynamic_batch": True,
            "dynamic_spatial": False,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "seconds": round(time.perf_counter() - t_start, 3),
            "total_seconds": round(time.perf_counter() - t_start, 3),
            "op_types": op_types,
            "parity": {
                "logits_max_rel": max(p["logits_max_rel"] for p in parity),
                "early_max_rel": max(p["early_max_rel"] for p in parity),
                "batches": [p["batch"] for p in parity],
            },
        },
        "calibration": None,
        "guard": {"policy": "calibrated", "enforced_checks": ["garbage", "attention", "feature"]},
    }
    return bundle_mod.write_manifest(out_dir, manifest)
