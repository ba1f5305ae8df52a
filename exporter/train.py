"""Training of the demo model: GuardNet on hand/wrist phantoms plus a garbage class.

The demo classifier has the four skeletal-maturity classes of :mod:`gamguard.runtime.demo.phantoms` and a
fifth, last class ``"garbage"`` trained on off-distribution images of the generator's
``GARBAGE_TRAIN_KINDS``. (``HELD_OUT_KINDS`` are never trained on: they measure how the guard
generalises to garbage it has not seen.)

Every training image goes through :func:`gamguard.runtime.preprocess.preprocess` with the demo
:data:`DEMO_INPUT`, the very function serving uses, so the model sees exactly what the runtime feeds
it. Augmentation is the generator's acquisition variation: each epoch draws fresh images from a seed
derived from ``(seed, epoch)``, so a run is reproducible.

Determinism: the same :class:`TrainConfig` (seed included) and the same torch build and thread count
give bit-identical weights (``torch.use_deterministic_algorithms``, seeded initialisation, data and
batch order).

Default recipe (:class:`TrainConfig`): 20 epochs of 4×200 fresh phantoms + 7×50 garbage images,
AdamW with a one-cycle schedule, one torch thread plus one data-generating process. Measured on the
shared 2-core dev machine (torch 2.13 CPU, seed 0): 193 s wall, held-out phantom accuracy 1.000,
held-out garbage-kind samples classified garbage 0.996, no held-out phantom sent to garbage.

The checkpoint is a plain dict written with ``torch.save`` (see :func:`save_checkpoint`), read back
with :func:`load_checkpoint`; the exporter turns it into a bundle.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from gamguard.runtime.bundle import InputSpec
from gamguard.runtime.demo import phantoms

from .data import DEMO_INPUT, GARBAGE_NAME, EpochDataPrefetcher, class_names, derive_seed, make_dataset, stage_names
from .garbage import balanced_class_weight
from .model import ARCH, build_model

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEMO_INPUT",
    "TARGET_LAYER",
    "EARLY_LAYER",
    "TrainConfig",
    "train",
    "evaluate",
    "predict",
    "make_dataset",
    "make_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "class_names",
    "stage_names",
    "derive_seed",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gamguard-checkpoint/1"
#: Suggested layers for the guard: Grad-CAM at the last stage (16×16 at 128 input), early features
#: at the first stage (64×64).
TARGET_LAYER = "layer3"
EARLY_LAYER = "layer1"
#: Held-out targets the report checks.
TARGET_PHANTOM_ACCURACY = 0.95
TARGET_GARBAGE_RECALL = 0.99

# Purposes mixed into the seed so training, test and held-out-kind data never share a stream.
# (1 was an unused garbage-training purpose; the others keep their numbers, so no seed changes.)
_TRAIN_ID, _TEST_ID, _TEST_GARBAGE, _TEST_HELD_OUT, _ORDER = 0, 2, 3, 4, 5


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the checkpoint)."""

    epochs: int = 20
    per_class: int = 200  # phantoms per maturity class per epoch
    garbage_per_kind: int = 50  # images per garbage-training kind per epoch
    seed: int = 0
    threads: int | None = 1  # torch CPU threads (None: torch default); + data_workers processes
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 1e-4
    widths: tuple[int, int, int] = (16, 32, 64)
    input_norm: bool = True  # per-image standardisation inside the model (see GuardNet)
    generator_size: int = 256  # generator output side; preprocess resizes to DEMO_INPUT
    fresh_data: bool = True  # new images every epoch (augmentation) vs one fixed set
    data_workers: int = 1  # processes generating the next epoch's data (0: in-process)
    test_per_class: int = 100  # held-out phantoms per class
    test_garbage_per_kind: int = 100  # held-out samples per garbage-training kind
    test_held_out_per_kind: int = 50  # samples per never-trained kind (reported, no target)

    def model_config(self) -> dict:
        return {
            "num_classes": len(class_names()),
            "widths": list(self.widths),
            "in_channels": 1,
            "blocks": 1,
            "dropout": 0.0,
            "input_norm": self.input_norm,
        }


@contextmanager
def _deterministic(threads: int | None):
    """Deterministic torch kernels and a fixed thread count for the duration of a run."""
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_det)
        torch.set_num_threads(previous_threads)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Argmax class of each preprocessed input."""
    model.eval()
    out = [model(torch.from_numpy(x[i : i + batch_size])).argmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """``m[i, j]`` = number of inputs of true class i predicted as j."""
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)


def evaluate(
    model: nn.Module,
    *,
    seed: int,
    per_class: int = 100,
    garbage_per_kind: int = 100,
    held_out_per_kind: int = 50,
    size: int = 256,
    spec: InputSpec = DEMO_INPUT,
) -> dict:
    """Accuracy of a demo model on freshly generated data (use a seed not used for training).

    Returns phantom accuracy (per class too), the fraction of garbage-training-kind samples classified
    garbage (per kind too), the fraction of phantoms wrongly sent to garbage, the garbage rate of the
    never-trained ``HELD_OUT_KINDS`` (informative: check 1 alone is not expected to catch them all),
    and a confusion matrix (rows true, columns predicted).
    """
    names = class_names()
    k, g = len(names), len(names) - 1
    x_id, y_id = make_dataset(per_class, 0, derive_seed(seed, _TEST_ID), size=size, spec=spec)
    p_id = predict(model, x_id)
    garbage_kinds = list(phantoms.GARBAGE_TRAIN_KINDS)
    per_kind, p_garbage = {}, []
    for i, kind in enumerate(garbage_kinds):
        xg, _ = make_dataset(
            0, garbage_per_kind, derive_seed(seed, _TEST_GARBAGE, i), size=size, kinds=[kind], spec=spec
        )
        pg = predict(model, xg)
        per_kind[kind] = float(np.mean(pg == g))
        p_garbage.append(pg)
    p_garbage = np.concatenate(p_garbage) if p_garbage else np.zeros(0, np.int64)
    held_out = {}
    for i, kind in enumerate(phantoms.HELD_OUT_KINDS if held_out_per_kind > 0 else []):
        xh, _ = make_dataset(
            0, held_out_per_kind, derive_seed(seed, _TEST_HELD_OUT, i), size=size, kinds=[kind], spec=spec
        )
        held_out[kind] = float(np.mean(predict(model, xh) == g))
    cm = confusion_matrix(np.concatenate([y_id, np.full(len(p_garbage), g)]), np.concatenate([p_id, p_garbage]), k)
    return {
        "seed": seed,
        "per_class": per_class,
        "garbage_per_kind": garbage_per_kind,
        "phantom_accuracy": float(np.mean(p_id == y_id)),
        "per_class_accuracy": {names[c]: float(np.mean(p_id[y_id == c] == c)) for c in range(g)},
        "phantoms_rejected_as_garbage": float(np.mean(p_id == g)),
        "garbage_recall": float(np.mean(p_garbage == g)) if len(p_garbage) else None,
        "garbage_recall_per_kind": per_kind,
        "held_out_kinds_garbage_rate": held_out,
        "confusion_matrix": {"labels": names, "rows": "true", "columns": "predicted", "matrix": cm.tolist()},
    }


def train_one_epoch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    opt,
    sched,
    loss_fn,
    batch_size: int,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, float]:
    """One pass over ``(x, y)`` in a random order (``generator``); the scheduler steps per batch.
    Returns ``(mean loss, accuracy)`` over the samples seen. ``augment`` transforms each batch."""
    model.train()
    perm = torch.randperm(len(x), generator=generator)
    total_loss, correct, seen = 0.0, 0, 0
    for i in range(0, len(x), batch_size):
        idx = perm[i : i + batch_size]
        if len(idx) < 2:
            continue  # batch norm needs two samples
        xb = augment(x[idx]) if augment else x[idx]
        logits = model(xb)
        loss = loss_fn(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched.last_epoch + 1 < sched.total_steps:
            sched.step()
        total_loss += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y[idx]).sum())
        seen += len(idx)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def train(
    config: TrainConfig | None = None, *, progress: Callable[[str], None] | None = None, evaluate_after: bool = True
) -> tuple[nn.Module, dict]:
    """Train the demo model; returns ``(model in eval mode, report)``.

    ``progress`` receives one line per epoch (loss, train accuracy, time); default: the module logger.
    """
    config = config or TrainConfig()
    progress = progress or log.info
    names = class_names()
    t_start = time.perf_counter()
    with _deterministic(config.threads):
        torch.manual_seed(config.seed)
        model = build_model(config.model_config())
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        n_train = config.per_class * len(stage_names()) + config.garbage_per_kind * len(phantoms.GARBAGE_TRAIN_KINDS)
        steps_per_epoch = -(-n_train // config.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.2
        )
        order_gen = torch.Generator().manual_seed(derive_seed(config.seed, _ORDER))
        # Fresh images every epoch (the generator's acquisition variation is the augmentation), made
        # in a worker process while the previous epoch trains; or one fixed set.
        n_sets = config.epochs if config.fresh_data else 1
        data_seeds = [derive_seed(config.seed, _TRAIN_ID, e) for e in range(n_sets)]
        data_seconds = 0.0
        history = []
        x = y = None
        with EpochDataPrefetcher(
            config.per_class,
            config.garbage_per_kind,
            data_seeds,
            size=config.generator_size,
            workers=config.data_workers,
        ) as data:
            for epoch in range(config.epochs):
                t0 = time.perf_counter()
                if x is None or config.fresh_data:
                    x_np, y_np = data.get(epoch if config.fresh_data else 0)
                    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
                    # Every class gets the same total weight however many garbage images there are.
                    loss_fn = nn.CrossEntropyLoss(weight=balanced_class_weight(y, len(names)))
                t1 = time.perf_counter()
                data_seconds += t1 - t0  # time spent waiting for data
                mean_loss, accuracy = train_one_epoch(
                    model,
                    x,
                    y,
                    opt=opt,
                    sched=sched,
                    loss_fn=loss_fn,
                    batch_size=config.batch_size,
                    generator=order_gen,
                )
                entry = {
                    "epoch": epoch + 1,
                    "loss": mean_loss,
                    "train_accuracy": accuracy,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "data_wait_seconds": round(t1 - t0, 2),
                }
                history.append(entry)
                progress(
                    f"epoch {epoch + 1}/{config.epochs}  loss {entry['loss']:.4f}  "
                    f"train acc {entry['train_accuracy']:.3f}  {entry['seconds']:.1f} s "
                    f"(data wait {entry['data_wait_seconds']:.1f} s)"
                )
        train_seconds = time.perf_counter() - t_start
        model.eval()
        report = {
            "seed": config.seed,
            "config": _jsonable(dataclasses.asdict(config)),
            "threads": torch.get_num_threads(),
            "torch_version": str(torch.__version__),
            "train_images_per_epoch": int(len(x)) if x is not None else 0,
            "history": history,
            "seconds": {"train": round(train_seconds, 2), "data_wait": round(data_seconds, 2)},
            "final_train_loss": history[-1]["loss"] if history else None,
        }
        if evaluate_after:
            t_eval = time.perf_counter()
            test_seed = derive_seed(config.seed, 1_000_003)  # a different seed from all training data
            test = evaluate(
                model,
                seed=test_seed,
                per_class=config.test_per_class,
                garbage_per_kind=config.test_garbage_per_kind,
                held_out_per_kind=config.test_held_out_per_kind,
                size=config.generator_size,
            )
            report["test"] = test
            report["seconds"]["evaluate"] = round(time.perf_counter() - t_eval, 2)
            report["targets"] = {"phantom_accuracy": TARGET_PHANTOM_ACCURACY, "garbage_recall": TARGET_GARBAGE_RECALL}
            report["targets_met"] = bool(
                test["phantom_accuracy"] >= TARGET_PHANTOM_ACCURACY
                and (test["garbage_recall"] is None or test["garbage_recall"] >= TARGET_GARBAGE_RECALL)
            )
        report["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    return model, report


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def make_checkpoint(model: nn.Module, config: TrainConfig, report: dict) -> dict:
    """The checkpoint dict (format ``gamguard-checkpoint/1``) the exporter reads."""
    names = class_names()
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": ARCH,
        "config": config.model_config(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "class_names": names,
        "garbage_class": names.index(GARBAGE_NAME),
        "input": DEMO_INPUT.to_manifest(),
        "target_layer": TARGET_LAYER,
        "early_layer": EARLY_LAYER,
        "train_report": report,
    }


def save_checkpoint(checkpoint: dict, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` atomically (temporary file, then rename); creates parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; returns ``(model in eval mode, dict)``.

    Loads with ``weights_only=True``: a checkpoint is data (tensors, numbers, strings), never code.
    Raises ``ValueError`` with the reason when the file is not a gamguard checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint file does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for non-checkpoint files
        raise ValueError(f"{path}: not a readable torch checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not a gamguard checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    missing = [
        k
        for k in (
            "arch",
            "config",
            "state_dict",
            "class_names",
            "garbage_class",
            "input",
            "target_layer",
            "early_layer",
        )
        if k not in ckpt
    ]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {', '.join(missing)}")
    if ckpt["arch"] != ARCH:
        raise ValueError(f"{path}: unknown architecture {ckpt['arch']!r} (expected {ARCH!r})")
    model = build_model(ckpt["config"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit the recorded config: {exc}") from exc
    return model.eval(), ckpt
