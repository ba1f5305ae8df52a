"""The fused Grad-CAM wrapper: one forward pass returns logits, the Grad-CAM map and early features.

Autograd cannot be exported to ONNX, so the gradient of the predicted class score with respect to
the ``target_layer`` activations is written out with forward ops only:

* **closed form** (``head_kind="gap_linear"``): when the model's head after ``target_layer`` is
  global-average-pool → (flatten) → Linear, d(score_c)/dA[k, i, j] = W[c, k] / (h·w) everywhere,
  so the Grad-CAM channel weights are ``fc.weight[c] / (h·w)`` — one Gather, no backward at all;
* **hand-written backward** (``head_kind="generic"``): the head is replayed op by op (keeping what
  each backward step needs) and its gradient is propagated back with the transposed ops. Only a
  whitelist of ops with simple, exact backwards is accepted (see :data:`SUPPORTED_HEAD_OPS`);
  anything else raises :class:`UnsupportedHeadError` naming the module or function.

"Head" means whatever the model's own ``forward`` does after ``target_layer``. It is found by
tracing the model with ``torch.fx`` (``target_layer`` and ``early_layer`` are kept as opaque leaf
calls), so both an ``nn.Sequential`` head and a torchvision-ResNet-style forward
(``avgpool → torch.flatten → fc``) work. The part of the graph before ``target_layer`` becomes the
"body", which returns the ``target_layer`` and ``early_layer`` activations in one pass.

The map follows pytorch-grad-cam's ``GradCAM`` exactly (``BaseCAM.forward`` with ``targets=None``
and one target layer): target class = argmax of the logits (first index on ties); channel weights =
spatial mean of the gradient; cam = ReLU(Σ_k w_k A_k); then ``scale_cam_image`` = per-image
min-max normalisation ``(x - min) / (1e-7 + max)`` **before** the bilinear resize to the input size
(``cv2.resize``, half-pixel centres = ``F.interpolate(..., align_corners=False)``); then
``aggregate_multi_layers`` applies ReLU and ``scale_cam_image`` once more (normalise, no resize).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from gamguard.runtime.engines.specialize import (  # one rule for exporters and engines
    CAM_MARGIN,
    POOL_CHANNEL_BLOCK,
)

log = logging.getLogger(__name__)

#: Same epsilon as pytorch-grad-cam's ``scale_cam_image``.
CAM_EPS = 1e-7

#: What a head may contain (documentation and error messages; the checks are in ``_classify``).
SUPPORTED_HEAD_OPS = (
    "nn.Linear",
    "nn.ReLU / F.relu / torch.relu / Tensor.relu",
    "global average pooling: nn.AdaptiveAvgPool2d(1) / F.adaptive_avg_pool2d(x, 1) / x.mean((2, 3))",
    "nn.Flatten / torch.flatten / Tensor.flatten / Tensor.view|reshape(N, -1) / squeeze",
    "nn.Dropout* / F.dropout in eval mode, nn.Identity",
    "nn.BatchNorm1d/2d in eval mode with running statistics",
    "nn.Conv2d with a 1x1 kernel, stride 1, no padding, groups 1",
)


class UnsupportedHeadError(ValueError):
    """The model's head after ``target_layer`` contains an op without an exportable backward."""


@dataclass
class HeadStep:
    """One op of the head: how to run it forward and which backward rule applies."""

    kind: str  # linear | relu | gap | reshape | identity | batchnorm | conv1x1
    origin: str  # human-readable, for messages: "module 'fc' (Linear)", "torch.flatten", ...
    node_name: str
    module: nn.Module | None = None
    # For function/method steps: how to replay the traced call on the running value.
    call: object = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


def _unsupported(origin: str, why: str = "") -> UnsupportedHeadError:
    detail = f" ({why})" if why else ""
    return UnsupportedHeadError(
        f"cannot export Grad-CAM: the head after the target layer uses {origin}{detail}, which has "
        "no exportable backward. Supported head ops: " + "; ".join(SUPPORTED_HEAD_OPS) + ". "
        "Choose a later target_layer or restructure the head."
    )


#: How :func:`plan_head`'s error for a forward torch.fx cannot trace begins (export_bundle then goes
#: through torch.onnx instead).
FX_TRACE_FAILED = "cannot trace the model's forward with torch.fx"
#: How its error for a forward that returns no logits tensor (a dict, an output object) begins.
NOT_A_TENSOR = "the model's forward must return a single logits tensor"


class _LayerTracer(fx.Tracer):
    """fx tracer that keeps ``target_layer``/``early_layer`` visible in the graph.

    A kept layer is an opaque call (a ``call_module`` node) unless another kept layer lives inside it
    (``early_layer="features.2"`` with ``target_layer="features"``): then it is traced through and
    its output node is recorded in :attr:`outputs`. Every call of a kept layer is recorded, so a
    module called twice is detected. The ancestors of kept layers are traced through; everything
    else follows fx's default (torch.nn built-ins are leaves, custom modules are traced through, so a
    custom head module is inspected op by op instead of being accepted blindly).
    """

    def __init__(self, keep: set[str]):
        super().__init__()
        self.keep = keep
        self.outputs: dict[str, list[fx.Node]] = {k: [] for k in keep}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if any(k.startswith(qualname + ".") or (qualname == "" and k) for k in self.keep):
            return False
        if qualname in self.keep:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        out = super().call_module(m, forward, args, kwargs)
        if qualname in self.keep:
            node = out.node if isinstance(out, fx.Proxy) else None
            if node is None:
                raise ValueError(f"layer {qualname!r} does not return a single tensor")
            self.outputs[qualname].append(node)
        return out


def _meta_shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_gap_output(size) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and len(size) == 2 and all(s == 1 for s in size)


def _is_spatial_dims(dims, rank: int) -> bool:
    if isinstance(dims, int) or dims is None:
        return False
    norm = sorted(d % rank for d in dims)
    return rank == 4 and norm == [2, 3]


def _origin_of(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        mod = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__name__", str(node.target))
        if mod.startswith(("torch.nn.functional", "torch._C._nn")):
            return f"function F.{name}"
        if mod.startswith("_operator") or node.target in vars(operator).values():
            return f"operator '{name}'"
        return f"function torch.{name}" if "torch" in mod or mod == "" else f"function {mod}.{name}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    return f"{node.op} {node.target}"


def _classify(node: fx.Node, gm: fx.GraphModule, x_shape) -> HeadStep:
    """Map one traced head node to a :class:`HeadStep` or raise :class:`UnsupportedHeadError`."""
    origin = _origin_of(node, gm)
    out_shape = _meta_shape(node)
    rest_args = node.args[1:]
    kwargs = dict(node.kwargs)

    def step(kind, **kw):
        return HeadStep(kind=kind, origin=origin, node_name=node.name, **kw)

    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            return step("linear", module=m)
        if isinstance(m, nn.ReLU):
            return step("relu")
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)):
            return step("identity")
        if isinstance(m, nn.Flatten):
            return step("reshape", call=m)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            if not _is_gap_output(m.output_size):
                raise _unsupported(origin, f"output_size={m.output_size}; only 1 (global pooling)")
            return step("gap", call=m)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if m.running_mean is None or m.running_var is None:
                raise _unsupported(origin, "BatchNorm without running statistics is batch-dependent")
            return step("batchnorm", module=m)
        if isinstance(m, nn.Conv2d):
            no_padding = (
                m.padding in ("valid", "same") if isinstance(m.padding, str) else all(p == 0 for p in m.padding)
            )
            if tuple(m.kernel_size) != (1, 1) or tuple(m.stride) != (1, 1) or m.groups != 1 or not no_padding:
                raise _unsupported(
                    origin,
                    f"kernel {tuple(m.kernel_size)}, stride {tuple(m.stride)}, padding {m.padding}, "
                    f"groups {m.groups}; only 1x1 convolutions with stride 1, no padding, groups 1",
                )
            return step("conv1x1", module=m)
        raise _unsupported(origin)

    target = node.target
    if node.op == "call_function":
        if target in (F.relu, torch.relu, torch.relu_, F.relu_):
            return step("relu")
        if target is F.adaptive_avg_pool2d:
            size = rest_args[0] if rest_args else kwargs.get("output_size")
            if not _is_gap_output(size):
                raise _unsupported(origin, f"output_size={size}; only 1 (global pooling)")
            return step("gap", call=target, args=tuple(rest_args), kwargs=kwargs)
        if target is torch.flatten or target is torch.squeeze:
            return step("reshape", call=target, args=tuple(rest_args), kwargs=kwargs)
        if target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
            if kwargs.get("training", len(rest_args) > 1 and rest_args[1]):
                raise _unsupported(origin, "dropout with training=True; export a model in eval mode")
            return step("identity")
        if target is torch.mean:
            dims = rest_args[0] if rest_args else kwargs.get("dim")
            if x_shape is None or not _is_spatial_dims(dims, len(x_shape)):
                raise _unsupported(origin, f"dim={dims}; only the mean over the two spatial axes")
            return step("gap", call=target, args=tuple(rest_args), kwargs=kwargs)
        raise _unsupported(origin)

    if node.op == "call_method":
        if target in ("relu", "relu_"):
            return step("relu")
        if target in ("flatten", "squeeze", "contiguous"):
            kind = "identity" if target == "contiguous" else "reshape"
            return step(kind, call=target, args=tuple(rest_args), kwargs=kwargs)
        if target in ("view", "reshape"):
            # Accepted only as a flatten to [N, features] (the classic x.view(x.size(0), -1)).
            if x_shape is None or out_shape is None or len(out_shape) != 2 or out_shape[0] != x_shape[0]:
                raise _unsupported(origin, f"reshape {x_shape} -> {out_shape}; only flatten to [N, -1]")
            return step("reshape", call="flatten", args=(1,))
        if target == "mean":
            dims = rest_args[0] if rest_args else kwargs.get("dim")
            if x_shape is None or not _is_spatial_dims(dims, len(x_shape)):
                raise _unsupported(origin, f"dim={dims}; only the mean over the two spatial axes")
            return step("gap", call=target, args=tuple(rest_args), kwargs=kwargs)
        raise _unsupported(origin)

    raise _unsupported(origin)


@dataclass
class HeadPlan:
    """Result of tracing: the body (input → (target, early) activations) and the head's steps."""

    body: fx.GraphModule
    steps: list[HeadStep]
    kind: str  # "gap_linear" (closed form), "generic" (hand-written backward) or "traced"
    target_shape: tuple[int, ...]
    early_shape: tuple[int, ...]
    logits_shape: tuple[int, ...]
    head: fx.GraphModule | None = None  # "traced": target activations -> logits
    origins: list[str] = field(default_factory=list)  # the head's ops, for messages and the manifest
    output_activation: str | None = None  # "Softmax" / "LogSoftmax" the forward ended with, left out


_OUTPUT_ACTIVATIONS = {
    nn.Softmax: "Softmax",
    nn.LogSoftmax: "LogSoftmax",
    nn.Sigmoid: "Sigmoid",
    torch.softmax: "Softmax",
    F.softmax: "Softmax",
    torch.log_softmax: "LogSoftmax",
    F.log_softmax: "LogSoftmax",
    torch.sigmoid: "Sigmoid",
    F.sigmoid: "Sigmoid",
    "softmax": "Softmax",
    "log_softmax": "LogSoftmax",
    "sigmoid": "Sigmoid",
}


_RESHAPES = {"reshape", "view", "flatten", "squeeze", "contiguous", torch.reshape, torch.flatten, torch.squeeze}


def _before_reshapes(node: fx.Node) -> fx.Node:
    """``node`` or, when it only reshapes a tensor of the same shape (MONAI's ``Classifier`` ends in
    Softmax → Reshape(K)), the node it reshapes, repeatedly."""
    while node.op in ("call_method", "call_function") and node.args and isinstance(node.args[0], fx.Node):
        try:
            is_reshape = node.target in _RESHAPES
        except TypeError:  # an unhashable target
            is_reshape = False
        shape = _meta_shape(node)
        if not is_reshape or shape is None or shape != _meta_shape(node.args[0]):
            break
        node = node.args[0]
    return node


def _output_activation(node: fx.Node, gm: fx.GraphModule) -> tuple[str, fx.Node] | None:
    """``(kind, logits node)`` when the forward returns the Softmax / LogSoftmax of its logits over the
    classes (Grad-CAM is defined on the score before the softmax, Selvaraju et al. 2017, section 3; the
    guard's p-values and served probabilities need the logits); a final sigmoid stays in the head, with a
    warning (:data:`~gamguard.exporter.onnx_fuse.SIGMOID_WARNING`)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = _OUTPUT_ACTIVATIONS.get(type(module))
        dim = getattr(module, "dim", None)
    elif node.op in ("call_function", "call_method"):
        try:
            kind = _OUTPUT_ACTIVATIONS.get(node.target)
        except TypeError:  # an unhashable target
            kind = None
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    else:
        return None
    if kind is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if kind == "Sigmoid":
        from .onnx_fuse import SIGMOID_WARNING

        log.warning(SIGMOID_WARNING, f"forward ends in a sigmoid ({_origin_of(node, gm)})")
        return None
    shape = _meta_shape(node.args[0])
    if shape is None or len(shape) != 2 or dim not in (None, 1, -1):
        return None  # not a softmax over the classes of [N, K] logits: judged as any other head op
    return kind, node.args[0]


def _node_for_module(tracer: _LayerTracer, name: str, role: str) -> fx.Node:
    nodes = tracer.outputs[name]
    if not nodes:
        raise ValueError(f"{role} {name!r} is never called by the model's forward")
    if len(nodes) > 1:
        raise ValueError(
            f"{role} {name!r} is called {len(nodes)} times in forward (a module shared between several "
            "places, e.g. one activation module reused in a block); Grad-CAM needs the output of one "
            "call: pick a layer called once (its parent block, or the next layer)"
        )
    return nodes[0]


def plan_head(model: nn.Module, target_layer: str, early_layer: str, example: torch.Tensor) -> HeadPlan:
    """Trace ``model`` and split it at ``target_layer`` into a body and a whitelisted head.

    ``example`` (a batch of valid inputs) is only used to propagate shapes through the trace.
    Raises :class:`UnsupportedHeadError` for a head op outside the whitelist and ``ValueError`` for
    bad layer names or a forward that cannot be split.
    """
    modules = dict(model.named_modules())
    for role, name in (("target_layer", target_layer), ("early_layer", early_layer)):
        if not name or name not in modules:
            near = ", ".join(k for k in modules if k)[:400]
            raise ValueError(f"{role} {name!r} is not a module of the model (modules: {near})")
    tracer = _LayerTracer({target_layer, early_layer})
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types on data-dependent control flow
        raise ValueError(
            f"{FX_TRACE_FAILED} to find the head after {target_layer!r}: {type(exc).__name__}: {exc}"
        ) from exc
    gm = fx.GraphModule(model, graph)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example)
    except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
        cause = exc.__cause__ or exc  # ShapeProp wraps the forward's own error
        detail = (str(cause).strip().splitlines() or [""])[0][:300]
        raise ValueError(
            f"the model's forward fails on a {tuple(example.shape)} input: {type(cause).__name__}: {detail} "
            "(a model widened by add_garbage_class that hard-codes its number of classes after the classifier "
            "layer, e.g. a final Reshape(K), needs that set to K + 1)"
        ) from exc

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"the model's forward must take one input tensor, it takes {len(placeholders)}")
    out_node = next(n for n in graph.nodes if n.op == "output")
    logits_node = out_node.args[0]
    if not isinstance(logits_node, fx.Node) or _meta_shape(logits_node) is None:
        raise ValueError(f"{NOT_A_TENSOR} [N, K]")
    output_activation = _output_activation(_before_reshapes(logits_node), gm)
    if output_activation is not None:  # Grad-CAM and the guard work on the logits before it (and its reshapes)
        output_activation, logits_node = output_activation
    target_node = _node_for_module(tracer, target_layer, "target_layer")
    early_node = _node_for_module(tracer, early_layer, "early_layer")

    # Head = the nodes between target_layer and the logits (descendants of target that the
    # logits depend on).
    descendants: set[fx.Node] = set()
    for n in graph.nodes:  # graph order is topological
        if n is not target_node and any(a is target_node or a in descendants for a in n.all_input_nodes):
            descendants.add(n)
    if logits_node is not target_node and logits_node not in descendants:
        raise ValueError(f"the logits do not depend on target_layer {target_layer!r}")
    if early_node in descendants:
        raise ValueError(f"early_layer {early_layer!r} comes after target_layer {target_layer!r}")
    needed: set[fx.Node] = set()
    stack = [logits_node]
    while stack:
        n = stack.pop()
        if n in needed or n is target_node:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    head_nodes = [n for n in graph.nodes if n in needed and n in descendants]
    outside = [n for n in needed if n not in descendants and n.op not in ("get_attr",) and n is not target_node]
    if outside:
        # the layers, not the plumbing (getattr / getitem of shapes), each once, the nearest to the target first
        order = {n: k for k, n in enumerate(graph.nodes)}
        sources = [_origin_of(n, gm) if n.op != "placeholder" else "the input" for n in sorted(outside, key=order.get)]
        plumbing = ("function builtins.", "operator ", "method Tensor.size")
        shown = list(dict.fromkeys(reversed([o for o in sources if not o.startswith(plumbing)] or sources)))
        names = ", ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")
        parts = target_layer.split(".")
        parents = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)][:2]  # the block whose output adds it
        raise UnsupportedHeadError(
            f"cannot export Grad-CAM: the logits also depend on values computed before or beside "
            f"target_layer {target_layer!r} ({names}) — a skip connection around the target "
            "layer; choose a later target_layer"
            + (f", e.g. an enclosing block: {', '.join(map(repr, parents))}" if parents else "")
        )

    # The hand-written rules need a chain of whitelisted single-input ops (Tensor.size calls for
    # x.view(x.size(0), -1) are auxiliary integer nodes); any other head gets a traced backward.
    steps: list[HeadStep] | None = []
    prev = target_node
    unsupported = None
    for n in head_nodes:
        if n.op == "call_method" and n.target == "size":
            continue
        tensor_inputs = [a for a in n.all_input_nodes if _meta_shape(a) is not None]
        try:
            if tensor_inputs != [prev]:
                raise _unsupported(_origin_of(n, gm), "it combines several tensors; only a chain of single-input ops")
            steps.append(_classify(n, gm, _meta_shape(prev)))
        except UnsupportedHeadError as exc:
            unsupported = exc
            steps = None
            break
        prev = n
    if steps is not None and prev is not logits_node:
        raise ValueError("internal error: the head chain does not end at the logits")

    target_shape = _meta_shape(target_node)
    logits_shape = _meta_shape(logits_node)
    if target_shape is None or len(target_shape) != 4:
        raise ValueError(f"target_layer {target_layer!r} must output [N, C, h, w], got {target_shape}")
    if logits_shape is None or len(logits_shape) != 2:
        raise ValueError(f"the model must return logits [N, K], got {logits_shape}")
    early_shape = _meta_shape(early_node)
    if early_shape is None or len(early_shape) != 4:
        raise ValueError(f"early_layer {early_layer!r} must output [N, C, h, w], got {early_shape}")

    # Body: input → (target activations, early activations); nothing of the head is computed.
    body_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    keep: set[fx.Node] = set()
    stack = [target_node, early_node]
    while stack:
        n = stack.pop()
        if n not in keep:
            keep.add(n)
            stack.extend(n.all_input_nodes)
    for n in graph.nodes:
        if n in keep:
            env[n] = body_graph.node_copy(n, lambda a: env[a])
    body_graph.output((env[target_node], env[early_node]))
    body = fx.GraphModule(gm, body_graph)

    head = None
    if steps is None:
        kind = "traced"
        head = _head_module(gm, head_nodes, target_node, logits_node)
        steps = []
        origins = [
            _origin_of(n, gm)
            for n in head_nodes
            if n.op in ("call_module", "call_function", "call_method")
            and not (n.op == "call_method" and n.target == "size")
        ]
        log.debug(
            "head after %r is outside the hand-written rules (%s); using a traced backward", target_layer, unsupported
        )
    else:
        core = [s.kind for s in steps if s.kind not in ("identity", "reshape")]
        kind = "gap_linear" if core == ["gap", "linear"] else "generic"
        origins = [s.origin for s in steps]
    return HeadPlan(
        body=body,
        steps=steps,
        kind=kind,
        target_shape=target_shape,
        early_shape=early_shape,
        logits_shape=logits_shape,
        head=head,
        origins=origins,
        output_activation=output_activation,
    )


def _head_module(gm: fx.GraphModule, head_nodes, target_node, logits_node) -> fx.GraphModule:
    """The head as its own module: target activations → logits (the nodes in between, copied)."""
    graph = fx.Graph()
    env = {target_node: graph.placeholder("acts")}
    for n in head_nodes:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = graph.node_copy(a, lambda x: env[x])
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[logits_node])
    head = fx.GraphModule(gm, graph)
    # A view of a non-contiguous tensor (Flatten after ConvNeXt's permuted LayerNorm) has, under
    # symbolic shapes, an as_strided backward that ONNX cannot express; viewing a contiguous copy
    # instead gives a plain reshape backward (the copy is a no-op for contiguous tensors).
    for n in list(head.graph.nodes):
        pool_size = None
        if n.op == "call_module" and isinstance(head.get_submodule(n.target), nn.AdaptiveAvgPool2d):
            pool_size = head.get_submodule(n.target).output_size
        elif n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
            pool_size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
        if pool_size is not None:
            # torch's adaptive_avg_pool2d re-strides its output with as_strided_ (no ONNX backward)
            with head.graph.inserting_before(n):
                plain = head.graph.call_function(adaptive_avg_pool2d_plain, (n.args[0], pool_size))
            n.replace_all_uses_with(plain)
            head.graph.erase_node(n)
            continue
        is_view = (
            (n.op == "call_method" and n.target in _VIEW_METHODS)
            or (n.op == "call_function" and n.target in _VIEW_FUNCTIONS)
            or (n.op == "call_module" and isinstance(head.get_submodule(n.target), (nn.Flatten, nn.Unflatten)))
        )
        if is_view and isinstance(n.args[0], fx.Node):
            with head.graph.inserting_before(n):
                c = head.graph.call_method("contiguous", (n.args[0],))
            n.replace_input_with(n.args[0], c)
    head.recompile()
    return head


def _is_global_pool(n: fx.Node) -> bool:
    """``n`` averages its input over both spatial axes (the forms :func:`_head_module` leaves)."""
    if n.op == "call_function" and n.target is adaptive_avg_pool2d_plain:
        size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
        return _is_gap_output(size)
    if (n.op == "call_method" and n.target == "mean") or (n.op == "call_function" and n.target is torch.mean):
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return dims is not None and not isinstance(dims, int) and sorted(int(d) % 4 for d in dims) == [2, 3]
    return False


def split_global_pool(head: fx.GraphModule) -> tuple[fx.GraphModule, fx.GraphModule] | None:
    """``(pool, rest)`` when the head's only use of the activations is a global average pool, else None.

    Then d(score)/dA is d(score)/d(pooled) / (h·w) at every position, and Grad-CAM's channel weights
    (its spatial mean) are that same value: tracing the backward of ``rest`` alone (pooled → logits)
    avoids broadcasting the gradient to [N, C, h, w] and averaging it back, two passes over a
    target-sized tensor in the exported graph.
    """
    acts = next(n for n in head.graph.nodes if n.op == "placeholder")
    users = list(acts.users)
    if len(users) != 1 or not _is_global_pool(users[0]):
        return None
    gap = users[0]
    pool_graph = fx.Graph()
    env = {acts: pool_graph.placeholder("acts")}
    pool_graph.output(pool_graph.node_copy(gap, lambda a: env[a]))
    rest_graph = fx.Graph()
    env = {gap: rest_graph.placeholder("pooled")}
    for n in head.graph.nodes:
        if n.op == "output":
            rest_graph.output(fx.map_arg(n.args[0], lambda a: env[a]))
        elif n not in (acts, gap):
            env[n] = rest_graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(head, pool_graph), fx.GraphModule(head, rest_graph)


def _keeps_channel_sums(n: fx.Node, head: fx.GraphModule) -> bool:
    """``n`` is a parameter-free step whose backward keeps each channel's gradient sum: every output
    value's gradient goes, whole, to inputs of its own channel (max pooling: to its argmax; average
    pooling without padding: spread with weights summing to 1), or the step only reshapes or is an
    eval-mode dropout."""
    if n.op == "call_module":
        m = head.get_submodule(n.target)
        if isinstance(m, nn.AvgPool2d):
            no_pad = m.padding in (0, (0, 0)) or not m.count_include_pad
            return no_pad and not m.ceil_mode and m.divisor_override is None
        if isinstance(m, nn.Flatten):
            return m.start_dim == 1 and m.end_dim == -1
        return isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity))
    if n.op == "call_function":
        if n.target is adaptive_avg_pool2d_plain:
            return True
        if n.target is torch.flatten:
            return tuple(n.args[1:]) in ((1,), (1, -1)) and not n.kwargs
        return False
    if n.op == "call_method":
        if n.target == "contiguous":
            return True
        return n.target == "flatten" and tuple(n.args[1:]) in ((1,), (1, -1)) and not n.kwargs
    return False


def split_pooled_linear(head: fx.GraphModule):
    """``(pre, linear, rest)`` when the head is: steps that keep channel gradient sums (pooling,
    flatten, dropout: :func:`_keeps_channel_sums`) → an ``nn.Linear`` on the flattened channels → at
    least one more op; else None. VGG's MaxPool → AdaptiveAvgPool(7) → flatten → Linear-ReLU-… head.

    Grad-CAM needs only each channel's *spatial sum* of d(score)/dA. Through such steps that is the
    sum of the gradient at the Linear's input over the channel's block of features, i.e.
    ``v @ W_pooled[:, k]`` with ``v`` = d(score)/d(Linear output) and ``W_pooled`` the Linear's weight
    summed over each channel's block. The exported backward then multiplies by a ``[out, C]`` matrix
    instead of the full ``[out, C·s]`` weight (for VGG-11, 8 MB instead of 411 MB read per call) and
    needs no max-pooling indices.
    """
    acts = next(n for n in head.graph.nodes if n.op == "placeholder")
    chain, n = [], acts
    while True:
        users = list(n.users)
        if len(users) != 1:
            return None
        n = users[0]
        if n.op == "call_module" and isinstance(head.get_submodule(n.target), nn.Linear):
            break
        if not _keeps_channel_sums(n, head):
            return None
        chain.append(n)
    linear_node = n
    if not chain or linear_node.args[0] is not chain[-1] or len(linear_node.users) != 1:
        return None
    if next(iter(linear_node.users)).op == "output":
        return None  # nothing after the Linear: the hand-written rules or the closed form apply
    pre_graph = fx.Graph()
    env = {acts: pre_graph.placeholder("acts")}
    for c in chain:
        env[c] = pre_graph.node_copy(c, lambda a: env[a])
    pre_graph.output(env[chain[-1]])
    rest_graph = fx.Graph()
    env = {linear_node: rest_graph.placeholder("z")}
    skip = {acts, linear_node, *chain}
    for node in head.graph.nodes:
        if node.op == "output":
            rest_graph.output(fx.map_arg(node.args[0], lambda a: env[a]))
        elif node not in skip:
            env[node] = rest_graph.node_copy(node, lambda a: env[a])
    return fx.GraphModule(head, pre_graph), head.get_submodule(linear_node.target), fx.GraphModule(head, rest_graph)


_VIEW_METHODS = ("view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten")
_VIEW_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)


def _run_step(step: HeadStep, x: torch.Tensor) -> torch.Tensor:
    """Forward of one head step (ReLU never in place: the inputs are kept for the backward)."""
    if step.kind == "identity":
        return x
    if step.kind == "relu":
        return torch.relu(x)
    if step.kind in ("linear", "batchnorm", "conv1x1"):
        return step.module(x)
    if isinstance(step.call, str):
        return getattr(x, step.call)(*step.args, **step.kwargs)
    return step.call(x, *step.args, **step.kwargs)


def _backward_step(step: HeadStep, g: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d(score)/d(input of step) from d(score)/d(output), with forward ops only."""
    if step.kind == "identity":
        return g
    if step.kind == "relu":
        # Same as autograd's threshold_backward: gradient passes where the output is positive.
        return torch.where(y > 0, g, torch.zeros_like(g))
    if step.kind == "reshape":
        return g.reshape(x.shape)
    if step.kind == "linear":
        return torch.matmul(g, step.module.weight)
    if step.kind == "gap":
        # Every input position contributes 1/(h·w) to its channel's mean.
        n, c = x.shape[0], x.shape[1]
        area = x.shape[-2] * x.shape[-1]
        return (g.reshape(n, c, 1, 1) / area).expand_as(x)
    if step.kind == "batchnorm":
        bn = step.module
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        return g * scale.reshape([1, -1] + [1] * (g.dim() - 2))
    if step.kind == "conv1x1":
        # The transpose of a 1x1 convolution is a 1x1 convolution with the transposed weight.
        return F.conv2d(g, step.module.weight.transpose(0, 1))
    raise AssertionError(step.kind)


def bilinear_matrix(n_in, n_out, like: torch.Tensor) -> torch.Tensor:
    """``[n_out, n_in]`` matrix of 1-D bilinear resampling (``align_corners=False``, edge-clamped).

    Built by resampling the identity with ``F.interpolate`` itself, so the coordinate mapping and
    weights are exactly those of the bilinear Resize (along the other axis the size is unchanged and
    half-pixel centres map every column onto itself: an exact copy). Each row has at most two
    non-zero, non-negative weights summing to 1.
    """
    eye = torch.eye(n_in, dtype=like.dtype, device=like.device)
    return F.interpolate(eye[None, None], size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]


@dataclass
class CamResize:
    """Constant matrices of the CAM's bilinear resize for a static input size.

    ``rows`` [H, h] and ``cols_t`` [w, W] resample the map; ``rows_ext`` / ``cols_ext_t`` are their
    rows / columns at the samples where the resampled map can take its extremes
    (:func:`~gamguard.runtime.engines.specialize.extreme_samples`).
    """

    rows: torch.Tensor
    cols_t: torch.Tensor
    rows_ext: torch.Tensor
    cols_ext_t: torch.Tensor

    @classmethod
    def build(cls, hw_in, hw_out, like: torch.Tensor) -> "CamResize":
        from gamguard.runtime.engines.specialize import extreme_samples

        rows = bilinear_matrix(hw_in[0], hw_out[0], like)  # [H, h]
        cols = bilinear_matrix(hw_in[1], hw_out[1], like)  # [W, w]
        r_ext = torch.as_tensor(extreme_samples(rows.cpu().numpy()), dtype=torch.long)
        c_ext = torch.as_tensor(extreme_samples(cols.cpu().numpy()), dtype=torch.long)
        return cls(
            rows=rows,
            cols_t=cols.transpose(0, 1).contiguous(),
            rows_ext=rows[r_ext].contiguous(),
            cols_ext_t=cols[c_ext].transpose(0, 1).contiguous(),
        )


def gradcam_map(acts: torch.Tensor, weights: torch.Tensor, out_hw, resize: CamResize | None = None) -> torch.Tensor:
    """Grad-CAM map [N, H, W] in [0, 1] from activations [N, C, h, w] and channel weights [N, C].

    Numerically pytorch-grad-cam's sequence (weighted sum → ReLU → min-max → bilinear resize → ReLU
    → min-max), written so that the exported graph makes as few passes over the full-size map as
    possible (it runs on every guarded call, so its cost is guard overhead):

    * the weighted channel sum is one batched MatMul ``[N,1,C] @ [N,C,h·w]`` (no [N,C,h,w] temporary);
    * the bilinear resize is separable and linear, so it is two MatMuls with the 1-D interpolation
      matrices (:func:`bilinear_matrix`): ``rows @ (cam @ cols_t)``, the first product on the small
      map. ONNX Runtime's Resize is a gather per output pixel; the GEMM form is several times cheaper.
      Every output is a sum of two non-negative weighted terms (the other weights are exact zeros),
      i.e. the same convex combination the Resize computes, up to float rounding;
    * the second ReLU is dropped: that convex combination of the min-max-normalised map (>= 0) is
      >= 0 exactly (products and sums of non-negative floats), so the ReLU is a no-op;
    * static size (``resize`` given): the second min-max is applied to the *small* map before the
      resize. The resize is a convex combination (rows of both matrices sum to 1), so it commutes
      with ``x -> (x - lo) / (eps + hi - lo)``; ``lo`` / ``hi`` (the min and max of the full-size
      map) are read from the map resampled at the few rows and columns where its extremes can be
      (:class:`CamResize`). The full-size map is then written once by the last MatMul, instead of being
      read twice for min/max and rewritten twice. Float rounding of that convex combination could leave
      [0, 1] by an ulp; rather than clamp the full map in one more pass, the small map is mapped onto
      [CAM_MARGIN, 1 - CAM_MARGIN / 2) first (:data:`~gamguard.runtime.engines.specialize.CAM_MARGIN`: at most
      2e-6 from pytorch-grad-cam's values);
    * dynamic size: the matrices are built in the graph and the second min-max runs on the full map,
      ``(x - min) / (eps + (max - min))`` (equal to ``(x - min) / (eps + max(x - min))`` up to one
      rounding of ``max - min``);
    * the map stays ``[N, h, w]`` → ``[N, H, W]`` throughout: no reshape or indexing copy of the
      full-size map before it becomes the graph output.
    """
    n, c, h, w = acts.shape
    cam = torch.matmul(weights.unsqueeze(1), acts.reshape(n, c, h * w)).reshape(n, h, w)
    cam = torch.relu(cam)
    cam = cam - torch.amin(cam, dim=(1, 2), keepdim=True)
    cam = cam / (CAM_EPS + torch.amax(cam, dim=(1, 2), keepdim=True))
    if resize is not None:
        ext = torch.matmul(resize.rows_ext, torch.matmul(cam, resize.cols_ext_t))
        lo = torch.amin(ext, dim=(1, 2), keepdim=True)
        hi = torch.amax(ext, dim=(1, 2), keepdim=True)
        den = CAM_EPS + (hi - lo)
        # den * (1 + 2 margin) written as a sum: torch's ONNX exporter (2.13, dynamo) drops a multiplication
        # by a Python float this close to 1, and the map would then reach 1 + margin
        cam = (cam - lo) / (den + den * (2.0 * CAM_MARGIN)) + CAM_MARGIN
        return torch.matmul(resize.rows, torch.matmul(cam, resize.cols_t))
    rows = bilinear_matrix(h, out_hw[0], cam)
    cols_t = bilinear_matrix(w, out_hw[1], cam).transpose(0, 1)
    cam = torch.matmul(rows, torch.matmul(cam, cols_t))  # [N, H, W]: no reshape of the full map
    lo = torch.amin(cam, dim=(1, 2), keepdim=True)
    hi = torch.amax(cam, dim=(1, 2), keepdim=True)
    return (cam - lo) / (CAM_EPS + (hi - lo))


def _bin_matrix(size, bins: int, like: torch.Tensor) -> torch.Tensor:
    """[bins, size] averaging matrix of adaptive average pooling along one axis.

    Bin i covers [floor(i·size/bins), ceil((i+1)·size/bins)) — torch's adaptive pooling bins. For
    an integer j that is ``i·size < (j+1)·bins and j·bins < (i+1)·size``: integer products and
    comparisons only, so a dynamic size costs a handful of tiny graph nodes (each ONNX node has a
    fixed cost per call that matters at batch 1).
    """
    jb = torch.arange(size, device=like.device).unsqueeze(0) * bins  # [1, size]
    i = torch.arange(bins, device=like.device).unsqueeze(1)  # [bins, 1]
    inside = ((i * size < jb + bins) & (jb < (i + 1) * size)).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


def adaptive_avg_pool2d_exportable(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` as two MatMuls with averaging matrices built from the input size.

    Both ONNX exporters lower ``adaptive_avg_pool2d`` to an AveragePool whose kernel is fixed at
    export time (or refuse when the size is not a multiple of the output); this form stays correct
    when H and W are dynamic and for any size.
    """
    rows = _bin_matrix(x.shape[-2], out_hw[0], x)  # [oh, H]
    cols = _bin_matrix(x.shape[-1], out_hw[1], x)  # [ow, W]
    return _pool_with_matrices(x, rows, cols.transpose(0, 1))


def _pool_size_2d(size, x):
    size = (size, size) if isinstance(size, int) else tuple(size)
    return tuple(x.shape[-2 + i] if s is None else int(s) for i, s in enumerate(size))


def adaptive_avg_pool2d_plain(x: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` written with a mean (global pooling) or averaging matrices: ops whose
    backward, as traced by torch, is plain too."""
    oh, ow = _pool_size_2d(output_size, x)
    if oh == 1 and ow == 1:
        return x.mean(dim=(-2, -1), keepdim=True)
    return adaptive_avg_pool2d_exportable(x, (oh, ow))


@dataclass(frozen=True)
class PoolWindow:
    """Adaptive average pooling of a ``size`` map whose sides are multiples of the output grid: every bin
    is a ``kernel`` window at stride ``kernel`` (torch's adaptive bins are then exactly these windows)."""

    size: tuple[int, int]
    kernel: tuple[int, int]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        # An AveragePool node: ONNX Runtime runs it in the convolutions' blocked (NCHWc) layout, so
        # the full-size early activations are read once and never reordered to plain NCHW.
        return F.avg_pool2d(x, self.kernel, self.kernel)


def static_pool_window(size, grid, channels: int | None = None) -> PoolWindow | None:
    """The :class:`PoolWindow` that pools a static ``size`` (h, w) to ``grid``, or None when a side
    is not a multiple of the grid (then the bins differ in size or overlap: averaging matrices) or
    ``channels`` is not a multiple of :data:`POOL_CHANNEL_BLOCK`."""
    (h, w), (oh, ow) = (int(v) for v in size), (int(v) for v in grid)
    if h % oh or w % ow or (channels is not None and int(channels) % POOL_CHANNEL_BLOCK):
        return None
    return PoolWindow((h, w), (h // oh, w // ow))


def _pool_with_matrices(x: torch.Tensor, rows: torch.Tensor, cols_t: torch.Tensor) -> torch.Tensor:
    """``rows @ x @ cols_t`` for x [N, C, H, W], rows [oh, H], cols_t [W, ow], in the cheap order.

    ``x @ cols_t`` first: x is the large operand and, with a 2-D right-hand side, ONNX Runtime runs
    that MatMul as a single GEMM over all N·C·H rows; ``rows @ x`` first would be N·C small
    broadcast GEMMs of the full map. The second product then touches only [N, C, H, ow].
    """
    return torch.matmul(rows, torch.matmul(x, cols_t))


class FusedGradCAM(nn.Module):
    """``image [N,C,H,W] -> (logits [N,K], cam [N,H,W], early [N,C_e,h_e,w_e])`` in one pass.

    Args:
        model: the classifier (put in eval mode by the caller; BatchNorm/Dropout must be in eval).
        target_layer: module name of the Grad-CAM layer (output [N, C, h, w]).
        early_layer: module name of the early-feature layer (before ``target_layer``).
        example: a batch of valid inputs, used to trace shapes.
        early_pool: adaptive-average-pool the early activations to this (h, w); ``None`` keeps them.
        dynamic_spatial: the input size may vary. When it does not, the pooling matrices are
            constants of the graph (no Range/Mod shape arithmetic for TensorRT to handle).
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str,
        early_layer: str,
        example: torch.Tensor,
        early_pool: tuple[int, int] | None = (8, 8),
        dynamic_spatial: bool = False,
    ):
        super().__init__()
        if model.training:
            raise ValueError("put the model in eval mode (model.eval()) before wrapping it")
        self.plan = plan_head(model, target_layer, early_layer, example)
        self.body = self.plan.body
        # Register the head modules so they move with .to() and appear in the state dict.
        self.head = nn.ModuleList([s.module for s in self.plan.steps if s.module is not None])
        self.steps = self.plan.steps
        self.head_kind = self.plan.kind
        self.early_pool = tuple(int(v) for v in early_pool) if early_pool is not None else None
        self.dynamic_spatial = bool(dynamic_spatial)
        rows = cols = None
        self._pool_window = None
        if self.early_pool is not None and not self.dynamic_spatial:
            h_e, w_e = self.plan.early_shape[-2:]
            self._pool_window = static_pool_window((h_e, w_e), self.early_pool, self.plan.early_shape[1])
            if self._pool_window is None:
                rows = _bin_matrix(h_e, self.early_pool[0], example)  # [oh, h_e]
                cols = _bin_matrix(w_e, self.early_pool[1], example).transpose(0, 1).contiguous()
        self.register_buffer("_class_ids", torch.arange(self.plan.logits_shape[1]), persistent=False)
        self.register_buffer("_pool_rows", rows, persistent=False)
        self.register_buffer("_pool_cols", cols, persistent=False)
        # Static size: the CAM's bilinear interpolation matrices are constants of the graph too.
        resize = None
        if not self.dynamic_spatial:
            resize = CamResize.build(self.plan.target_shape[-2:], example.shape[-2:], example)
        for name in CamResize.__dataclass_fields__:  # buffers: they follow the module's .to()
            self.register_buffer(f"_cam_{name}", getattr(resize, name, None), persistent=False)
        if self.head_kind == "gap_linear":
            self.fc_weight_owner = next(s.module for s in self.steps if s.kind == "linear")
        self.head_traced = self.joint = self.head_pool = self.head_linear = None
        self.register_buffer("_pooled_weight", None, persistent=False)
        if self.head_kind == "traced":
            from .head_backward import trace_joint

            self.head_traced = self.plan.head
            with torch.no_grad():
                acts, _ = self.body(example)
            # Differentiate only the part of the head that needs it: after channel-sum-keeping
            # pooling and the first Linear (split_pooled_linear), or after a global average pool
            # (split_global_pool; the joint then works on [N, C] instead of [N, C, h, w]).
            pooled_linear = split_pooled_linear(self.plan.head)
            if pooled_linear is not None:
                with torch.no_grad():
                    flat = pooled_linear[0](acts)
                c = acts.shape[1]
                weight = pooled_linear[1].weight.detach()
                if flat.dim() == 2 and flat.shape[1] % c == 0 and weight.shape[1] == flat.shape[1]:
                    self.head_pool, self.head_linear, self.head_traced = pooled_linear
                    self._pooled_weight = weight.reshape(weight.shape[0], c, -1).sum(dim=2).contiguous()
                    with torch.no_grad():
                        acts = self.head_linear(flat)
            if self.head_pool is None:
                split = split_global_pool(self.plan.head)
                if split is not None:
                    self.head_pool, self.head_traced = split
                    with torch.no_grad():
                        acts = self.head_pool(acts)
            try:
                self.joint = trace_joint(self.head_traced, acts, self.plan.logits_shape[1])
            except Exception as exc:  # make_fx raises many types
                raise UnsupportedHeadError(
                    f"cannot export Grad-CAM: torch cannot trace the backward of the head after "
                    f"{target_layer!r} ({' → '.join(self.plan.origins)}): {type(exc).__name__}: {exc}. "
                    + suggest_target_layers(model, target_layer, early_layer, example)
                ) from exc

    def channel_weights(self, acts: torch.Tensor, logits: torch.Tensor, saved) -> torch.Tensor:
        """Grad-CAM channel weights [N, C] for the argmax class of each row."""
        cls = torch.argmax(logits, dim=1)
        if self.head_kind == "gap_linear":
            # d(logit_c)/dA = W[c] / (h·w) at every position; its spatial mean is the same.
            w = torch.index_select(self.fc_weight_owner.weight, 0, cls)
            return w / (acts.shape[-2] * acts.shape[-1])
        # One-hot without F.one_hot (not exportable everywhere): compare with the class ids,
        # a constant of the graph (torch.arange(K) would become a Range on a traced shape).
        g = (self._class_ids.unsqueeze(0) == cls.unsqueeze(1)).to(logits.dtype)
        for step, (x, y) in zip(reversed(self.steps), reversed(saved)):
            g = _backward_step(step, g, x, y)
        return g.mean(dim=(2, 3))

    def forward(self, image: torch.Tensor):
        acts, early = self.body(image)
        if self.joint is not None:
            from .head_backward import head_state

            area = acts.shape[-2] * acts.shape[-1]
            if self.head_linear is not None:
                z = self.head_linear(self.head_pool(acts))
                logits, v = self.joint(head_state(self.head_traced), z)
                # each channel's spatial gradient sum is v @ (the Linear's weight summed per channel)
                return self._outputs(image, acts, logits, torch.matmul(v, self._pooled_weight) / area, early)
            if self.head_pool is not None:
                logits, grad = self.joint(head_state(self.head_traced), self.head_pool(acts))
                # d(score)/dA[k, i, j] = d(score)/d(pooled_k) / (h·w) at every position: that is its mean
                weights = grad.reshape(acts.shape[0], acts.shape[1]) / area
                return self._outputs(image, acts, logits, weights, early)
            logits, grad = self.joint(head_state(self.head_traced), acts)
            return self._outputs(image, acts, logits, grad.mean(dim=(2, 3)), early)
        saved = []
        x = acts
        for step in self.steps:
            y = _run_step(step, x)
            saved.append((x, y))
            x = y
        logits = x
        return self._outputs(image, acts, logits, self.channel_weights(acts, logits, saved), early)

    def _outputs(self, image, acts, logits, weights, early):
        out_hw = (image.shape[-2], image.shape[-1])
        resize = None
        if self._cam_rows is not None and (
            # a static export is at the example's size (its input shape is fixed); in eager
            # mode another size computes its own matrices instead of reusing wrong ones
            torch.onnx.is_in_onnx_export()
            or (
                tuple(self._cam_rows.shape) == (out_hw[0], acts.shape[-2])
                and tuple(self._cam_cols_t.shape) == (acts.shape[-1], out_hw[1])
            )
        ):
            resize = CamResize(**{k: getattr(self, f"_cam_{k}") for k in CamResize.__dataclass_fields__})
        cam = gradcam_map(acts, weights, out_hw, resize)
        if self.early_pool is not None:
            early = self._pool_early(early)
        return logits, cam, early

    def _pool_early(self, early: torch.Tensor) -> torch.Tensor:
        """The early activations average-pooled to ``early_pool``, in the cheapest exact form the size allows."""
        if self._pool_window is not None and (
            # a static export is at the example's size; eager calls at other sizes fall through
            torch.onnx.is_in_onnx_export() or tuple(early.shape[-2:]) == self._pool_window.size
        ):
            return self._pool_window.pool(early)
        if self._pool_rows is not None and (
            torch.onnx.is_in_onnx_export()
            or (self._pool_rows.shape[1], self._pool_cols.shape[0]) == tuple(early.shape[-2:])
        ):
            # Static size: constant matrices (a different input size fails in the MatMul).
            return _pool_with_matrices(early, self._pool_rows, self._pool_cols)
        return adaptive_avg_pool2d_exportable(early, self.early_pool)


def suggest_target_layers(model: nn.Module, target_layer: str, early_layer: str, example, limit: int = 2) -> str:
    """A sentence naming target layers (after ``early_layer``) whose head has an exact hand-written
    backward — the layers an export will certainly accept. Tries the modules from the last one back."""
    found, tried = [], 0
    for name, _ in reversed(list(model.named_modules())):
        if not name or name == target_layer or tried >= 20 or len(found) >= limit:
            continue
        if name == early_layer or early_layer.startswith(name + "."):
            break  # no target before the early layer
        tried += 1
        try:
            plan = plan_head(model, name, early_layer, example)
        except (ValueError, UnsupportedHeadError):
            continue
        if plan.kind != "traced":
            found.append(name)
    if not found:
        return "Choose a later target_layer (the input of the global pooling usually works)."
    return "Target layers whose head exports: " + ", ".join(repr(n) for n in found) + "."


def unexportable_head_error(model, wrapper, target_layer, early_layer, example, exc) -> UnsupportedHeadError:
    """The ONNX exporter failed on a traced head backward: name the operator it could not translate."""
    import re

    text = f"{exc} {exc.__cause__ or ''} {getattr(exc.__cause__, '__cause__', '') or ''}"
    ops = (
        re.findall(r"OpOverload\(op='([\w.]+)'", text)
        or re.findall(r"torch\.ops\.([\w.]+)", text)
        or re.findall(r"operator '([\w:.]+)'", text)
    )
    what = f"the operator {ops[0]}" if ops else f"an operator ({type(exc).__name__}: {str(exc)[:200]})"
    legacy = (
        " The legacy TorchScript exporter (opset 17) translates fewer ops than the default opset-18 exporter: "
        "export with opset 18, or pick a target layer whose head has a hand-written backward."
        if type(exc).__name__ == "UnsupportedOperatorError"
        else ""
    )
    return UnsupportedHeadError(
        f"cannot export Grad-CAM: the backward of the head after {target_layer!r} "
        f"({' → '.join(wrapper.plan.origins)}) uses {what}, which the ONNX exporter cannot translate "
        f"to standard ONNX ops.{legacy} " + suggest_target_layers(model, target_layer, early_layer, example)
    )
