"""Give an existing N-class classifier a garbage class (check 1 of the guard).

Two steps, usable on any ``torch.nn.Module`` whose classifier layer is an ``nn.Linear`` or a 1×1
``nn.Conv2d`` (SqueezeNet-style class maps):

* :func:`add_garbage_class` widens that layer by one output. The N existing rows of weight and bias
  are copied bit for bit, so the first N logits of the extended model equal the original logits; the
  new row (the garbage class, index N) starts from ``init``.
* :func:`finetune_with_garbage` trains the model so off-distribution ("garbage") images go to the new
  class while in-distribution accuracy is kept. By default only the classifier layer is trained: the
  backbone, and with it the Grad-CAM target and the early features, stays exactly as it was.

Typical use::

    model = add_garbage_class(model)                      # N → N+1 outputs, logits 0..N-1 unchanged
    finetune_with_garbage(model, id_x, id_y, garbage_x, epochs=30)
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

INITS = ("mean", "zeros", "random")


def balanced_class_weight(y: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Cross-entropy class weights giving every class present in ``y`` (labels ``0..k-1``) the same
    total weight (inverse frequency, normalised so that the weights average to 1 per sample); classes
    absent from ``y`` get weight 0."""
    counts = torch.bincount(y, minlength=k).to(dtype)
    return torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), torch.zeros_like(counts))


def _is_conv1x1(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and m.groups == 1


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _classifier_candidates(model: nn.Module) -> str:
    names = _linear_names(model) + [name for name, m in model.named_modules() if _is_conv1x1(m)][-3:]
    return ", ".join(names) or "(none)"


def find_classifier(model: nn.Module, classifier: str | None = None) -> tuple[str, nn.Module]:
    """Return ``(name, module)`` of the classifier layer (an ``nn.Linear`` or a 1×1 ``nn.Conv2d``).

    ``classifier`` names it (a ``dict(model.named_modules())`` key); when omitted the last
    ``nn.Linear`` in module registration order is taken, which is the final layer of the usual
    ``... → pool → flatten → fc`` classifiers (torchvision ResNets, EfficientNet, MobileNetV3,
    ConvNeXt, VGG, :class:`GuardNet`); a model without any Linear falls back to its last 1×1 conv.
    """
    modules = dict(model.named_modules())
    if classifier is None:
        names = _linear_names(model) or [name for name, m in model.named_modules() if _is_conv1x1(m)]
        if not names:
            raise ValueError(
                "add_garbage_class: the model has no nn.Linear or 1x1 nn.Conv2d layer; the garbage class is "
                "added by widening the final classifier layer (name it with classifier=...)"
            )
        classifier = names[-1]
    if classifier not in modules:
        raise ValueError(
            f"add_garbage_class: the model has no module named {classifier!r}; "
            f"classifier candidates: {_classifier_candidates(model)}"
        )
    layer = modules[classifier]
    if not (isinstance(layer, nn.Linear) or _is_conv1x1(layer)):
        raise ValueError(
            f"add_garbage_class: module {classifier!r} is a {type(layer).__name__}, not an nn.Linear or a 1x1 "
            "nn.Conv2d; only a final classifier layer can be widened by one output "
            f"(candidates in this model: {_classifier_candidates(model)})"
        )
    return classifier, layer


def _out_features(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _widened(old: nn.Module) -> nn.Module:
    """An untrained copy of ``old`` with one more output."""
    kw = dict(bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    if isinstance(old, nn.Linear):
        return nn.Linear(old.in_features, old.out_features + 1, **kw)
    return nn.Conv2d(
        old.in_channels,
        old.out_channels + 1,
        1,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        padding_mode=old.padding_mode,
        **kw,
    )


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def add_garbage_class(model: nn.Module, *, classifier: str | None = None, init: str = "mean") -> nn.Module:
    """Widen the classifier layer of ``model`` by one output (the garbage class, index N).

    Args:
        model: an N-class classifier; modified in place and returned.
        classifier: module name of its final ``nn.Linear`` or 1×1 ``nn.Conv2d``; default: the last
            ``nn.Linear`` (see :func:`find_classifier`).
        init: how the new row starts. ``"mean"``: the mean of the N existing weight rows and biases
            (the garbage logit starts at the average class score, below the winning class, so
            predictions are unchanged until fine-tuning); ``"zeros"``: weight and bias 0;
            ``"random"``: ``nn.Linear``'s default initialisation.

    The first N rows of weight and bias are copied exactly, so the first N logits are unchanged.
    An integer ``num_classes`` attribute on the model, if present, is incremented.
    """
    if init not in INITS:
        raise ValueError(f"add_garbage_class: unknown init {init!r} (expected one of {', '.join(INITS)})")
    name, old = find_classifier(model, classifier)
    n = _out_features(old)
    new = _widened(old)
    with torch.no_grad():
        new.weight[:n].copy_(old.weight)
        if old.bias is not None:
            new.bias[:n].copy_(old.bias)
        if init == "mean":
            new.weight[n].copy_(old.weight.mean(dim=0))
            if old.bias is not None:
                new.bias[n].copy_(old.bias.mean())
        elif init == "zeros":
            new.weight[n].zero_()
            if old.bias is not None:
                new.bias[n].zero_()
        # "random": keep the layer's own initialisation of row n.
    new.train(old.training)
    new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    _set_module(model, name, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = n + 1
    log.info(
        "add_garbage_class: %s widened from %d to %d outputs (garbage class = %d, init=%s)", name, n, n + 1, n, init
    )
    return model


def _as_tensor(x, dtype) -> torch.Tensor:
    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def _output_kind(out, logits: torch.Tensor) -> str | None:
    """What the model's output ``out`` is of the classifier's output ``logits``: ``"logits"`` (the same
    tensor), ``"softmax"`` / ``"log_softmax"`` of it over the classes (a forward ending in a softmax), or
    None (something else follows the classifier)."""
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
        return None
    if torch.equal(out, logits):
        return "logits"
    if logits.ndim == 2:
        for kind in ("softmax", "log_softmax"):
            if torch.allclose(out, getattr(torch, kind)(logits, 1), rtol=1e-5, atol=1e-6):
                return kind
    return None


@torch.no_grad()
def _head_inputs(model: nn.Module, layer: nn.Linear, x: torch.Tensor, batch_size: int):
    """Run the (frozen, eval-mode) model once over ``x``; return ``(the classifier's inputs, the output
    kind)``, the inputs None when training the classifier on them would not be the same as training
    through the model (see :func:`_output_kind`)."""
    feats, captured, kinds = [], [], set()
    handle = layer.register_forward_hook(lambda m, inp, out: captured.append((inp[0].detach(), out.detach())))
    try:
        for i in range(0, len(x), batch_size):
            captured.clear()
            out = model(x[i : i + batch_size])
            if len(captured) != 1:
                return None, None  # the classifier runs more (or less) than once per forward: no shortcut
            feats.append(captured[0][0])
            # The shortcut (training the Linear on cached inputs) is exact only if the model's output
            # is the Linear's output or a softmax of it (the loss is then taken on the Linear's logits).
            kinds.add(_output_kind(out, captured[0][1]))
    finally:
        handle.remove()
    kind = kinds.pop() if len(kinds) == 1 else None
    return (torch.cat(feats) if kind else None), kind


def _log_probabilities(kind: str | None):
    """The model's output → what cross-entropy is taken on: a softmax output's log is the logits up to
    a per-row constant, which cross-entropy ignores (a log-softmax output is used as it is)."""
    if kind == "softmax":
        return lambda out: torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
    return lambda out: out


def finetune_with_garbage(
    model: nn.Module,
    id_images,
    id_labels,
    garbage_images,
    *,
    epochs: int = 30,
    lr: float = 1e-2,
    freeze_backbone: bool = True,
    classifier: str | None = None,
    garbage_class: int | None = None,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Module:
    """Fine-tune ``model`` so ``garbage_images`` are classified as ``garbage_class``.

    Args:
        model: a classifier that already has the garbage output (see :func:`add_garbage_class`); its
            forward may end in a softmax or log-softmax of the classifier layer (the loss is then taken
            on the logits, as for a model without it).
        id_images: in-distribution inputs, preprocessed, ``[N, C, H, W]`` (tensor or array).
        id_labels: their labels ``[N]`` in ``0..K-1`` (not the garbage class).
        garbage_images: off-distribution inputs, preprocessed, ``[M, C, H, W]``.
        epochs, lr, batch_size, weight_decay: AdamW training on cross-entropy; each class (ID classes
            and garbage) gets equal total weight, so a few garbage images are not drowned out.
        freeze_backbone: train only the classifier layer (default). The backbone stays in eval mode
            (batch-norm statistics untouched), so its features, Grad-CAM target and early layer are
            unchanged; the classifier is then trained on cached features, which is fast.
        classifier: module name of the final ``nn.Linear`` (default: the last one).
        garbage_class: index of the garbage output (default: the last output).
        seed: seeds the batch order.

    Returns the model, in eval mode.
    """
    name, layer = find_classifier(model, classifier)
    k = _out_features(layer)
    garbage_class = k - 1 if garbage_class is None else int(garbage_class)
    if not 0 <= garbage_class < k:
        raise ValueError(f"garbage_class {garbage_class} is outside the {k} outputs of {name!r}")
    dtype = layer.weight.dtype
    device = layer.weight.device
    x_id = _as_tensor(id_images, dtype).to(device)
    y_id = _as_tensor(id_labels, torch.long).to(device)
    x_g = _as_tensor(garbage_images, dtype).to(device)
    if len(x_id) != len(y_id):
        raise ValueError(f"{len(x_id)} in-distribution images but {len(y_id)} labels")
    if len(x_g) == 0:
        raise ValueError("finetune_with_garbage needs at least one garbage image")
    if len(y_id) and (y_id.min() < 0 or y_id.max() >= k or (y_id == garbage_class).any()):
        raise ValueError(f"id_labels must lie in 0..{k - 1} and exclude the garbage class {garbage_class}")
    x = torch.cat([x_id, x_g])
    y = torch.cat([y_id, torch.full((len(x_g),), garbage_class, dtype=torch.long, device=device)])

    # Equal total weight per class present (inverse frequency).
    loss_fn = nn.CrossEntropyLoss(weight=balanced_class_weight(y, k, dtype))
    gen = torch.Generator().manual_seed(seed)
    requires_grad_before = {id(p): p.requires_grad for p in model.parameters()}

    model.eval()
    feats, kind = _head_inputs(model, layer, x[: max(batch_size, 1)] if not freeze_backbone else x, batch_size)
    if kind in ("softmax", "log_softmax"):
        log.info(
            "finetune_with_garbage: the model's output is the %s of %s; the loss is taken on the logits", kind, name
        )
    to_log_probs = _log_probabilities(kind)
    if freeze_backbone:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in layer.parameters():
            p.requires_grad_(True)
        params = list(layer.parameters())
        forward = (lambda idx: layer(feats[idx])) if feats is not None else (lambda idx: to_log_probs(model(x[idx])))
        if feats is None:
            log.info("finetune_with_garbage: %s is not the model's output; training through the frozen model", name)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        forward = lambda idx: to_log_probs(model(x[idx]))  # noqa: E731

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen).to(device)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            if not freeze_backbone and len(idx) < 2:
                continue  # batch norm cannot train on a batch of one
            loss = loss_fn(forward(idx), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        log.debug("finetune_with_garbage epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(x))
    for p in model.parameters():  # leave the caller's freezing as it was
        p.requires_grad_(requires_grad_before[id(p)])
    return model.eval()
