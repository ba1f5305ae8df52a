"""Demo model, training, checkpoint and garbage-class helpers (gamguard.exporter)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from gamguard.exporter import train as training  # noqa: E402
from gamguard.exporter.garbage import add_garbage_class, finetune_with_garbage  # noqa: E402
from gamguard.exporter.model import GuardNet, build_model  # noqa: E402
from gamguard.runtime.bundle import InputSpec  # noqa: E402
from gamguard.runtime.demo import phantoms  # noqa: E402

# The `gamguard` console script's entry point, run in this interpreter.
GAMGUARD = [sys.executable, "-c", "import sys; from gamguard.runtime.cli import main; sys.exit(main())"]
TINY = dict(
    epochs=2,
    per_class=6,
    garbage_per_kind=2,
    batch_size=8,
    widths=(4, 8, 8),
    test_per_class=3,
    test_garbage_per_kind=2,
    test_held_out_per_kind=0,
    threads=1,
    generator_size=128,
    data_workers=0,
)


# --- model --------------------------------------------------------------------------------------


def test_guardnet_layers_shapes_and_any_input_size():
    model = build_model({"num_classes": 5, "widths": [16, 32, 64], "input_norm": True}).eval()
    modules = dict(model.named_modules())
    for name in ("stem", "layer1", "layer2", "layer3", "pool", "fc"):
        assert name in modules, name
    assert isinstance(modules["pool"], nn.AdaptiveAvgPool2d)
    assert isinstance(modules["fc"], nn.Linear) and modules["fc"].out_features == 5
    shapes = {}
    hooks = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
        for n in ("layer1", "layer3")
    ]
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 128, 128)).shape == (2, 5)
        assert shapes == {"layer1": (2, 16, 64, 64), "layer3": (2, 64, 16, 16)}
        assert model(torch.zeros(1, 1, 97, 160)).shape == (1, 5)  # GAP: any size, batch of one
        # input_norm standardises each image: exposure/gain changes do not change the output
        x = torch.rand(2, 1, 64, 64)
        torch.testing.assert_close(model(x), model(3 * x + 1), rtol=1e-4, atol=1e-4)
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({"arch": "resnet50", "num_classes": 5})
    with pytest.raises(ValueError, match="bad model config"):
        build_model({"num_classes": 5, "depth": 3})


# --- add_garbage_class ----------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["mean", "zeros", "random"])
def test_add_garbage_class_keeps_existing_logits(init):
    torch.manual_seed(0)
    model = GuardNet(3, widths=(4, 8, 8)).eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
    old_weight, old_bias = model.fc.weight.clone(), model.fc.bias.clone()
    out = add_garbage_class(model, init=init)
    assert out is model and model.num_classes == 4 and model.fc.out_features == 4
    with torch.no_grad():
        after = model(x)
    assert after.shape == (4, 4)
    # The existing rows are copied bit for bit; the logits agree up to the GEMM's summation order,
    # which may change with the output width.
    assert torch.equal(model.fc.weight[:3], old_weight) and torch.equal(model.fc.bias[:3], old_bias)
    torch.testing.assert_close(after[:, :3], before, rtol=1e-6, atol=1e-6)
    if init == "zeros":
        assert torch.count_nonzero(model.fc.weight[3]) == 0 and float(model.fc.bias[3].detach()) == 0.0
    if init == "mean":
        assert torch.allclose(model.fc.weight[3], model.fc.weight[:3].mean(0))
        # the mean score never beats the best class: predictions unchanged until fine-tuning
        assert torch.equal(after.argmax(1), before.argmax(1))


def test_add_garbage_class_finds_nested_last_linear_and_reports_errors():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2, bias=False)))
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        before = model(x)
    add_garbage_class(model)  # auto-detects "3.0", the last Linear
    assert model[3][0].out_features == 3 and model[1].out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :2], before, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="is a ReLU, not an nn.Linear"):
        add_garbage_class(model, classifier="2")
    with pytest.raises(ValueError, match="no module named 'head'"):
        add_garbage_class(model, classifier="head")
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_garbage_class(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ValueError, match="unknown init"):
        add_garbage_class(model, init="ones")


def _cluster_features(n_per_class, seed):
    """Toy inputs for a fast fine-tuning test: 4 ID classes as Gaussian clusters (fixed centres)."""
    centres = np.random.default_rng(0).normal(0, 3, (4, 6)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), n_per_class)
    return (centres[y] + rng.normal(0, 0.5, (len(y), 6))).astype(np.float32), y


def test_finetune_with_garbage_head_only_sends_garbage_to_new_class():
    torch.manual_seed(0)
    # A small "backbone + head" trained on 4 ID classes, then extended with a garbage class.
    model = nn.Sequential()
    model.add_module("backbone", nn.Sequential(nn.Linear(6, 16), nn.ReLU()))
    model.add_module("fc", nn.Linear(16, 4))
    x, y = _cluster_features(40, seed=1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    x_test, y_test = _cluster_features(30, seed=2)
    with torch.no_grad():
        acc_before = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    assert acc_before > 0.9
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}

    rng = np.random.default_rng(3)
    garbage = (rng.normal(0, 1, (80, 6)) * 0.3 + np.array([8, -8, 8, -8, 8, -8])).astype(np.float32)
    add_garbage_class(model)
    with torch.no_grad():
        assert (model(torch.from_numpy(garbage)).argmax(1) == 4).float().mean() < 0.5  # not yet
    finetune_with_garbage(model, x, y, garbage, epochs=60, lr=5e-2)
    garbage_test = (rng.normal(0, 1, (50, 6)) * 0.3 + np.array([8, -8, 8, -8, 8, -8])).astype(np.float32)
    with torch.no_grad():
        pred_id = model(torch.from_numpy(x_test)).argmax(1).numpy()
        pred_g = model(torch.from_numpy(garbage_test)).argmax(1).numpy()
    assert (pred_g == 4).mean() >= 0.95
    assert (pred_id == y_test).mean() >= acc_before - 0.03
    for k, v in model.backbone.state_dict().items():  # frozen backbone untouched
        assert torch.equal(v, backbone_before[k]), k
    with pytest.raises(ValueError, match="exclude the garbage class"):
        finetune_with_garbage(model, x, np.full(len(x), 4), garbage, epochs=1)


@pytest.mark.parametrize("freeze_backbone", [True, False], ids=["head-only", "whole-model"])
@pytest.mark.parametrize("activation", [nn.Softmax(dim=1), nn.LogSoftmax(dim=1)], ids=["softmax", "log-softmax"])
def test_finetune_with_garbage_takes_the_loss_on_the_logits_of_a_softmax_model(activation, freeze_backbone):
    """A model whose forward ends in a softmax is fine-tuned exactly as the same model without it:
    cross-entropy on its probabilities would be a softmax of probabilities (a weak, wrong signal)."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), nn.Linear(16, 4))

    x, y = _cluster_features(20, seed=1)
    garbage = (np.random.default_rng(3).normal(0, 0.3, (40, 6)) + np.array([8, -8, 8, -8, 8, -8])).astype(np.float32)
    plain = add_garbage_class(build())
    with_activation = nn.Sequential(*add_garbage_class(build()), activation)
    kw = dict(epochs=5, lr=5e-2, freeze_backbone=freeze_backbone)
    finetune_with_garbage(plain, x, y, garbage, **kw)
    finetune_with_garbage(with_activation, x, y, garbage, **kw)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(with_activation.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # and it learned the garbage class
        assert (with_activation(torch.from_numpy(garbage)).argmax(1) == 4).float().mean() >= 0.95


# --- training, determinism, checkpoint ------------------------------------------------------------


def test_make_dataset_goes_through_runtime_preprocess():
    from gamguard.runtime.preprocess import preprocess

    x, y = training.make_dataset(2, 1, seed=5, size=96)
    n_stages = len(phantoms.CLASS_NAMES)
    assert x.shape == (2 * n_stages + len(phantoms.GARBAGE_TRAIN_KINDS), 1, 128, 128)
    assert x.dtype == np.float32
    assert sorted(set(y.tolist())) == list(range(n_stages + 1))
    images, _ = phantoms.phantom_set(2, training.derive_seed(5, 0), 96)
    assert np.array_equal(x[0], preprocess(images[0], training.DEMO_INPUT))


def test_prefetched_epoch_data_equals_in_process_data():
    from gamguard.exporter.data import EpochDataPrefetcher

    seeds = [11, 12]
    with EpochDataPrefetcher(2, 1, seeds, size=64, workers=1) as data:
        for i, seed in enumerate(seeds):
            x, y = data.get(i)
            x_ref, y_ref = training.make_dataset(2, 1, seed, size=64)
            assert np.array_equal(x, x_ref) and np.array_equal(y, y_ref)


def test_training_is_deterministic_for_a_seed():
    config = training.TrainConfig(seed=7, **TINY)
    m1, r1 = training.train(config, progress=lambda s: None, evaluate_after=False)
    m2, _ = training.train(config, progress=lambda s: None, evaluate_after=False)
    m3, _ = training.train(training.TrainConfig(seed=8, **TINY), progress=lambda s: None, evaluate_after=False)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1 if s1[k].is_floating_point())
    assert len(r1["history"]) == 2 and np.isfinite(r1["history"][-1]["loss"])


def test_train_command_writes_a_loadable_checkpoint(tmp_path):
    ckpt_path = tmp_path / "sub" / "tiny.ckpt"
    cmd = [
        *GAMGUARD,
        "train",
        "--out",
        str(ckpt_path),
        "--epochs",
        "1",
        "--per-class",
        "4",
        "--garbage-per-kind",
        "2",
        "--seed",
        "3",
        "--threads",
        "1",
        "--test-per-class",
        "2",
        "--test-garbage-per-kind",
        "2",
        "--json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "epoch 1/1" in out.stderr and "loss" in out.stderr
    report = json.loads(out.stdout)
    assert report["checkpoint"] == str(ckpt_path)
    test = report["test"]
    n = len(phantoms.CLASS_NAMES)
    cm = np.array(test["confusion_matrix"]["matrix"])
    assert cm.shape == (n + 1, n + 1) and cm[:n].sum() == 2 * n
    assert cm[n].sum() == 2 * len(phantoms.GARBAGE_TRAIN_KINDS)
    assert test["phantom_accuracy"] == pytest.approx(np.trace(cm[:n, :n]) / (2 * n))

    model, ckpt = training.load_checkpoint(ckpt_path)
    assert not model.training
    assert ckpt["format"] == "gamguard-checkpoint/1" and ckpt["arch"] == "guardnet"
    assert ckpt["class_names"] == list(phantoms.CLASS_NAMES) + ["garbage"]
    assert ckpt["garbage_class"] == n
    assert InputSpec.from_manifest(ckpt["input"]) == training.DEMO_INPUT
    modules = dict(model.named_modules())
    assert ckpt["target_layer"] in modules and ckpt["early_layer"] in modules
    assert ckpt["train_report"]["seed"] == 3
    # The loaded model reproduces the accuracy the command reported.
    x, y = training.make_dataset(2, 0, training.derive_seed(test["seed"], 2))
    assert np.mean(training.predict(model, x) == y) == pytest.approx(test["phantom_accuracy"])


def test_load_checkpoint_rejects_foreign_files(tmp_path):
    bad = tmp_path / "bad.ckpt"
    torch.save({"format": "something-else"}, bad)
    with pytest.raises(ValueError, match="not a gamguard checkpoint"):
        training.load_checkpoint(bad)
    (tmp_path / "junk.ckpt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        training.load_checkpoint(tmp_path / "junk.ckpt")
    with pytest.raises(ValueError, match="does not exist"):
        training.load_checkpoint(tmp_path / "missing.ckpt")


def test_train_command_rejects_bad_arguments(tmp_path):
    out = subprocess.run(
        [*GAMGUARD, "train", "--out", str(tmp_path), "--epochs", "1"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "is a directory" in out.stderr
    out = subprocess.run(
        [*GAMGUARD, "train", "--out", str(tmp_path / "x.ckpt"), "--epochs", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--epochs must be at least 1" in out.stderr


def test_balanced_class_weight_gives_each_present_class_equal_total_weight():
    import torch

    from gamguard.exporter.garbage import balanced_class_weight

    y = torch.tensor([0] * 6 + [1] * 2 + [3] * 4)  # class 2 absent
    w = balanced_class_weight(y, 4)
    assert w.dtype == torch.float32 and w[2] == 0
    totals = torch.bincount(y, minlength=4).float() * w
    assert torch.allclose(totals[[0, 1, 3]], torch.full((3,), len(y) / 3))
    # with every class present it is the plain inverse frequency N / (count * K)
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    counts = torch.bincount(y, minlength=3).float()
    assert torch.equal(balanced_class_weight(y, 3), counts.sum() / (counts * 3))
    assert balanced_class_weight(y, 3, torch.float64).dtype == torch.float64
