"""The cheap forms of the fused graph's CAM and early pooling equal the plain ones (exporter/gradcam.py,
exporter/onnx_fuse.py): min/max of a bilinear resize read at the run ends, the second min-max on the
small map, adaptive pooling as an AveragePool when the grid divides the map."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from gamguard.exporter.gradcam import CamResize, PoolWindow, gradcam_map, static_pool_window  # noqa: E402
from gamguard.exporter.onnx_fuse import CAM_MARGIN, bilinear_matrix, extreme_samples  # noqa: E402

SIZES = [(7, 224), (28, 224), (16, 128), (14, 100), (9, 33), (64, 48), (5, 5), (3, 512)]


@pytest.mark.parametrize("n_in, n_out", SIZES)
def test_resized_map_extremes_are_at_run_ends(n_in, n_out):
    rng = np.random.default_rng(n_in * 1000 + n_out)
    rows, cols = bilinear_matrix(n_in, n_out).astype(np.float64), bilinear_matrix(n_in + 2, n_out).astype(np.float64)
    r, c = extreme_samples(rows), extreme_samples(cols)
    assert r.size <= 2 * n_in + 2 and r[0] == 0 and r[-1] == n_out - 1
    for _ in range(20):
        small = np.maximum(rng.standard_normal((n_in, n_in + 2)), 0.0)  # ReLU'd: flat zero regions too
        full = rows @ small @ cols.T
        ext = rows[r] @ small @ cols[c].T
        assert np.isclose(ext.min(), full.min(), rtol=0, atol=1e-12)
        assert np.isclose(ext.max(), full.max(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("hw, out", [((7, 7), (224, 224)), ((28, 20), (224, 160)), ((9, 11), (100, 90))])
def test_static_cam_equals_the_full_size_min_max(hw, out):
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(64, 16, *hw, generator=gen)
    weights = torch.randn(64, 16, generator=gen)
    plain = gradcam_map(acts, weights, out)  # matrices built on the fly, min-max on the full map
    cheap = gradcam_map(acts, weights, out, CamResize.build(hw, out, acts))
    # the cheap form maps the small map onto [CAM_MARGIN, 1 - CAM_MARGIN] instead of clamping the full map
    assert float((plain - cheap).abs().max()) < 2 * CAM_MARGIN + 1e-6
    assert float(cheap.min()) >= 0.0 and float(cheap.max()) <= 1.0  # no clamp: the margin keeps it inside
    assert np.allclose(cheap.amax(dim=(1, 2)).numpy(), 1.0, atol=1e-6)


def test_average_pool_when_the_grid_divides_the_map():
    x = torch.randn(2, 8, 56, 48)
    window = static_pool_window((56, 48), (8, 8), channels=32)
    assert window == PoolWindow((56, 48), (7, 6))
    assert torch.allclose(window.pool(x), F.adaptive_avg_pool2d(x, (8, 8)), atol=1e-6)
    assert static_pool_window((50, 48), (8, 8)) is None  # uneven bins: averaging matrices instead
    assert static_pool_window((56, 48), (8, 8), channels=24) is None  # not ORT's blocked layout


def test_pooled_linear_head_weights_equal_autograd():
    """VGG-style head (max pool → adaptive average pool → flatten → Linear-ReLU-Linear): the channel
    weights come from the Linear's weight summed per channel (split_pooled_linear), equal to autograd's."""
    from torch import nn

    from gamguard.exporter.gradcam import FusedGradCAM

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d((3, 3)),
        nn.Flatten(),
        nn.Linear(6 * 9, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    ).eval()
    x = torch.randn(4, 1, 24, 24)
    wrapper = FusedGradCAM(model, "3", "1", x).eval()
    assert wrapper.head_linear is model[7] and tuple(wrapper._pooled_weight.shape) == (16, 6)
    with torch.no_grad():
        logits, cam, _ = wrapper(x)
    # autograd Grad-CAM weights: spatial mean of d(argmax logit)/d(target activations)
    acts = model[:4](x).detach().requires_grad_(True)
    out = model[4:](acts)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    weights = acts.grad.mean(dim=(2, 3))
    expected = gradcam_map(acts.detach(), weights, (24, 24), CamResize.build((24, 24), (24, 24), x))
    assert torch.allclose(logits, out.detach(), atol=1e-6)
    assert float((cam - expected).abs().max()) < 1e-5


def _autograd_grad(head, acts):
    a = acts.clone().requires_grad_(True)
    out = head(a)
    out.gather(1, out.argmax(1, keepdim=True)).sum().backward()
    return out.detach(), a.grad


def test_traced_head_ending_in_linear_reads_the_weight_row():
    """A traced head ending in an nn.Linear is differentiated only up to that Linear: the gradient at
    its input is the argmax row of its weight (no one-hot product), and the result equals autograd's.
    A head ending otherwise keeps the one-hot seed."""
    from torch import fx, nn

    from gamguard.exporter.head_backward import head_state, split_last_linear, trace_joint, traced_ops

    torch.manual_seed(0)
    acts = torch.randn(5, 12)
    head = fx.symbolic_trace(nn.Sequential(nn.Linear(12, 20), nn.Hardswish(), nn.Dropout(), nn.Linear(20, 4)).eval())
    assert split_last_linear(head)[1] == "3"
    joint = trace_joint(head, acts, 4)
    ops = traced_ops(joint)
    assert "aten.embedding.default" in ops and "aten.eq.Tensor" not in ops, ops
    logits, grad = joint(head_state(head), acts)
    want_logits, want_grad = _autograd_grad(head, acts)
    assert torch.equal(logits, want_logits)
    assert torch.allclose(grad, want_grad, atol=1e-6)

    other = fx.symbolic_trace(nn.Sequential(nn.Linear(12, 4), nn.Hardswish()).eval())
    assert split_last_linear(other) is None
    logits, grad = trace_joint(other, acts, 4)(head_state(other), acts)
    want_logits, want_grad = _autograd_grad(other, acts)
    assert torch.equal(logits, want_logits)
    assert torch.allclose(grad, want_grad, atol=1e-6)
