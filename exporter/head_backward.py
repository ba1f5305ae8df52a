"""Backward of an arbitrary classifier head, traced by torch and exportable with forward ONNX ops.

When the head after ``target_layer`` is outside the hand-written rules of
:mod:`~gamguard.exporter.gradcam` (SiLU, Hardswish, GELU, LayerNorm, squeeze-excitation, max
pooling, …), torch itself produces its backward: the *joint* function

    acts → (logits, d logits[argmax] / d acts)

is traced with ``torch.func.vjp`` under ``make_fx`` (symbolic shapes, so the batch axis stays
dynamic), with the head's parameters and buffers as explicit inputs. The trace is decomposed to
core ATen ops — the backward ops (``native_layer_norm_backward``, ``hardswish_backward``, …) become
plain arithmetic — and the few backward ops without a decomposition are written here as forward
ops: the input gradient of a convolution is a transposed convolution, of average pooling a
transposed depthwise convolution / averaging-matrix product, of max pooling a scatter-add at the
argmax indices. The resulting ``GraphModule`` is an ordinary module of the fused wrapper and is
exported by the same ONNX exporter as the rest of the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


def _conv_input_grad(
    grad, inp, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask
):
    """``convolution_backward`` (input gradient only): the transposed convolution of the gradient."""
    if transposed:
        raise NotImplementedError("backward of a transposed convolution in the head")
    out_pad = []
    for d in range(weight.dim() - 2):
        reached = (grad.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (weight.shape[2 + d] - 1) + 1
        out_pad.append(inp.shape[2 + d] - reached)
    grad_input = None
    if output_mask[0]:
        grad_input = aten.convolution.default(grad, weight, None, stride, padding, dilation, True, out_pad, groups)
    return grad_input, None, None


def _bins(size, bins, like):
    """[bins, size] averaging matrix of adaptive average pooling along one axis (torch's bins)."""
    jb = torch.arange(size, device=like.device).unsqueeze(0) * bins
    i = torch.arange(bins, device=like.device).unsqueeze(1)
    inside = ((i * size < jb + bins) & (jb < (i + 1) * size)).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


def _adaptive_avg_pool2d_grad(grad, inp):
    """Adaptive average pooling is ``rows @ x @ cols.T``; its transpose is ``rows.T @ g @ cols``."""
    rows = _bins(inp.shape[-2], grad.shape[-2], grad)
    cols = _bins(inp.shape[-1], grad.shape[-1], grad)
    return torch.matmul(rows.transpose(0, 1), torch.matmul(grad, cols))


def _adaptive_avg_pool2d(x, output_size):
    """Adaptive average pooling as a mean (global) or two averaging-matrix products: plain ops whose
    backward is plain too (torch's own decomposition re-strides its result with ``as_strided``, whose
    backward ONNX cannot express)."""
    oh, ow = output_size
    if oh == 1 and ow == 1:
        return x.mean(dim=(-2, -1), keepdim=True)
    rows = _bins(x.shape[-2], oh, x)
    cols = _bins(x.shape[-1], ow, x)
    return torch.matmul(rows, torch.matmul(x, cols.transpose(0, 1)))


def _avg_pool2d_grad(grad, inp, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """Average pooling = depthwise convolution with a ones kernel / per-window divisor; its input
    gradient is the transposed depthwise convolution of ``grad / divisor``."""
    kh, kw = (list(kernel_size) * 2)[:2]
    stride = list(stride) or [kh, kw]
    sh, sw = (stride * 2)[:2]
    ph, pw = (list(padding) * 2)[:2]
    c = inp.shape[1]
    ones_img = torch.ones((1, 1) + tuple(inp.shape[-2:]), dtype=grad.dtype, device=grad.device)
    kernel = torch.ones((1, 1, kh, kw), dtype=grad.dtype, device=grad.device)
    if divisor_override:
        divisor = torch.full((1, 1) + tuple(grad.shape[-2:]), float(divisor_override), dtype=grad.dtype)
    else:
        # avg = (window sum) / divisor, so divisor = window sum of ones / avg of ones (exact small ints)
        window = F.conv2d(F.pad(ones_img, (pw, pw, ph, ph)), kernel, stride=(sh, sw))
        window = window[..., : grad.shape[-2], : grad.shape[-1]]
        avg_ones = F.avg_pool2d(ones_img, (kh, kw), (sh, sw), (ph, pw), ceil_mode, count_include_pad)
        divisor = window / avg_ones
    g = grad / divisor
    out_pad = [
        inp.shape[-2] - ((grad.shape[-2] - 1) * sh - 2 * ph + kh),
        inp.shape[-1] - ((grad.shape[-1] - 1) * sw - 2 * pw + kw),
    ]
    if min(out_pad) < 0:  # ceil_mode windows past the padded edge: crop
        full = F.conv_transpose2d(g, kernel.expand(c, 1, kh, kw), stride=(sh, sw), groups=c)
        return full[..., ph : ph + inp.shape[-2], pw : pw + inp.shape[-1]]
    return F.conv_transpose2d(
        g, kernel.expand(c, 1, kh, kw), stride=(sh, sw), padding=(ph, pw), output_padding=out_pad, groups=c
    )


def _max_pool2d_grad(grad, inp, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """Max pooling passes each output's gradient to its argmax input: a scatter-add at the indices."""
    n, c = inp.shape[0], inp.shape[1]
    flat = torch.zeros((n, c, inp.shape[-2] * inp.shape[-1]), dtype=grad.dtype, device=grad.device)
    flat = flat.scatter_add(2, indices.reshape(n, c, -1), grad.reshape(n, c, -1))
    return flat.reshape(inp.shape)


def _adaptive_max_pool2d_grad(grad, inp, indices):
    """Adaptive max pooling's indices are per-plane argmax positions too: the same scatter-add."""
    return _max_pool2d_grad(grad, inp, None, None, None, None, None, indices)


def backward_decompositions() -> dict:
    table = dict(core_aten_decompositions())
    table[aten.convolution_backward.default] = _conv_input_grad
    table[aten._adaptive_avg_pool2d.default] = _adaptive_avg_pool2d
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_grad
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_grad
    table[aten.max_pool2d_with_indices_backward.default] = _max_pool2d_grad
    table[aten.adaptive_max_pool2d_backward.default] = _adaptive_max_pool2d_grad
    # keep these forward ops whole: the ONNX exporter has direct translations
    for op in (aten.max_pool2d_with_indices.default,):
        table.pop(op, None)
    return table


def head_state(head: nn.Module) -> dict[str, torch.Tensor]:
    """The head's parameters and buffers by name: the explicit inputs of the traced joint graph."""
    state = dict(head.named_parameters(remove_duplicate=False))
    state.update(head.named_buffers(remove_duplicate=False))
    return state


def split_last_linear(head: nn.Module) -> tuple[fx.GraphModule, str] | None:
    """``(body, name)`` when the head's logits are the output of an ``nn.Linear`` module ``name`` applied
    to what ``body`` computes from the activations (the head minus that last Linear); else None."""
    if not isinstance(head, fx.GraphModule):
        return None
    out = next(n for n in head.graph.nodes if n.op == "output")
    last = out.args[0]
    if not (
        isinstance(last, fx.Node)
        and last.op == "call_module"
        and isinstance(head.get_submodule(last.target), nn.Linear)
        and len(last.args) == 1
        and not last.kwargs
        and isinstance(last.args[0], fx.Node)
        and len(last.users) == 1
    ):
        return None
    graph = fx.Graph()
    env = {}
    for n in head.graph.nodes:
        if n is last:
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[last.args[0]])
    return fx.GraphModule(head, graph), str(last.target)


def trace_joint(head: nn.Module, acts: torch.Tensor, num_classes: int) -> fx.GraphModule:
    """Trace ``(state, acts) -> (logits, d logits[n, argmax_n] / d acts)`` into ATen forward ops.

    ``head`` maps target activations to logits (eval mode). The gradient is that of the sum over the
    batch of each row's argmax logit — each row's gradient is its own class score's, as in Grad-CAM.

    When the head ends with an ``nn.Linear`` (:func:`split_last_linear`), only the part before it is
    differentiated: the gradient of logit ``c`` at that Linear's input is row ``c`` of its weight, a
    row lookup (one Gather in ONNX) instead of a one-hot vector times the weight (argmax → Unsqueeze →
    Equal → Cast → MatMul). Exactly the same values: the one-hot product adds only exact zeros.
    """
    state = {k: v.detach() for k, v in head_state(head).items()}
    split = split_last_linear(head)

    def joint(state, acts):
        # clone: a head that starts with an in-place op (DenseNet's F.relu(inplace=True)) must not
        # modify the activations the CAM is computed from
        if split is not None:
            body, name = split
            body_state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
            feats, vjp = torch.func.vjp(lambda a: torch.func.functional_call(body, body_state, (a.clone(),)), acts)
            weight = state[name + ".weight"]
            logits = F.linear(feats, weight, state.get(name + ".bias"))
            (grad,) = vjp(F.embedding(logits.argmax(1), weight))
            return logits, grad
        logits, vjp = torch.func.vjp(lambda a: torch.func.functional_call(head, state, (a.clone(),)), acts)
        # one-hot without F.one_hot: compare with the class ids
        onehot = (torch.arange(num_classes, device=logits.device).unsqueeze(0) == logits.argmax(1).unsqueeze(1)).to(
            logits.dtype
        )
        (grad,) = vjp(onehot)
        return logits, grad

    with torch.no_grad():
        return make_fx(joint, tracing_mode="symbolic", decomposition_table=backward_decompositions())(state, acts)


def traced_ops(joint: fx.GraphModule) -> list[str]:
    """Sorted ATen op names of a traced joint graph (for the manifest and error messages)."""
    return sorted(
        {str(n.target) for n in joint.graph.nodes if n.op == "call_function" and str(n.target).startswith("aten.")}
    )
