"""`gamguard train`: train the demo classifier (4 maturity classes + garbage) on generated phantoms."""

from __future__ import annotations

HELP = "train the demo classifier (phantom maturity classes + garbage class) into a checkpoint"

DESCRIPTION = """\
Train the demo GuardNet classifier on procedurally generated hand/wrist phantoms (four skeletal-maturity
classes) plus a fifth, last class "garbage" trained on the generator's garbage-training kinds of
off-distribution images. Fresh images are drawn every epoch (the generator's acquisition variation is
the augmentation); everything is seeded, so the same seed and thread count give the same weights.

Progress (loss, train accuracy, time per epoch) goes to stderr. At the end the model is evaluated on a
held-out split generated with another seed: phantom accuracy (target >= 95 %), the share of held-out
samples of the garbage-training kinds classified garbage (target >= 99 %), the garbage rate of kinds
never trained on, and a confusion matrix. The checkpoint (torch.save of a plain dict, format
gamguard-checkpoint/1) is what `gamguard export` reads.

Needs the exporter extra: pip install 'gamguard[export]'.

examples:
  gamguard train --out out/demo.ckpt
  gamguard train --out /tmp/tiny.ckpt --epochs 2 --per-class 20 --garbage-per-kind 5 --json
"""


def add_arguments(parser):
    parser.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 20)")
    parser.add_argument(
        "--per-class", type=int, default=None, metavar="N", help="phantoms per maturity class per epoch (default 200)"
    )
    parser.add_argument(
        "--garbage-per-kind",
        type=int,
        default=None,
        metavar="N",
        help="images per garbage-training kind per epoch (default 50)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1; one more process generates data); part of what makes a run reproducible",
    )
    parser.add_argument(
        "--test-per-class",
        type=int,
        default=None,
        metavar="N",
        help="held-out phantoms per class for the final report (default 100)",
    )
    parser.add_argument(
        "--test-garbage-per-kind",
        type=int,
        default=None,
        metavar="N",
        help="held-out samples per garbage kind for the final report (default 100)",
    )
    parser.add_argument("--json", action="store_true", help="print the training report as JSON on stdout")


def _check_positive(name: str, value, minimum: int = 1):
    from gamguard.runtime.cli import CommandError

    if value is not None and value < minimum:
        raise CommandError(f"--{name} must be at least {minimum}, got {value}")


def run(args) -> int:
    import json
    import os
    import sys
    from pathlib import Path

    from gamguard.runtime.cli import CommandError, require_export_extra

    require_export_extra()
    from gamguard.exporter import train as training

    _check_positive("epochs", args.epochs)
    _check_positive("per-class", args.per_class)
    _check_positive("garbage-per-kind", args.garbage_per_kind, 0)
    _check_positive("threads", args.threads)
    _check_positive("test-per-class", args.test_per_class)
    _check_positive("test-garbage-per-kind", args.test_garbage_per_kind)

    overrides = {
        "epochs": args.epochs,
        "per_class": args.per_class,
        "garbage_per_kind": args.garbage_per_kind,
        "threads": args.threads,
        "test_per_class": args.test_per_class,
        "test_garbage_per_kind": args.test_garbage_per_kind,
    }
    config = training.TrainConfig(seed=args.seed, **{k: v for k, v in overrides.items() if v is not None})
    # Fail before minutes of training if the checkpoint cannot be written.
    out = Path(args.out)
    if out.is_dir():
        raise CommandError(f"--out {out} is a directory; give a checkpoint file name, e.g. {out / 'demo.ckpt'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"cannot create {out.parent}: {exc}") from exc
    if not os.access(out.parent, os.W_OK):
        raise CommandError(f"cannot write the checkpoint to {out}: {out.parent} is not writable")

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    progress(
        f"training {config.epochs} epochs, {config.per_class} phantoms/class + "
        f"{config.garbage_per_kind} garbage/kind per epoch, seed {config.seed}"
    )
    model, report = training.train(config, progress=progress)
    path = training.save_checkpoint(training.make_checkpoint(model, config, report), out)

    test = report["test"]
    progress(
        f"held-out phantom accuracy {test['phantom_accuracy']:.3f} "
        f"(target {report['targets']['phantom_accuracy']:.2f}), "
        f"garbage-kind samples -> garbage {test['garbage_recall']:.3f} "
        f"(target {report['targets']['garbage_recall']:.2f}), "
        f"phantoms -> garbage {test['phantoms_rejected_as_garbage']:.3f}"
    )
    if test["held_out_kinds_garbage_rate"]:
        progress(
            "never-trained kinds -> garbage: "
            + ", ".join(f"{k} {v:.2f}" for k, v in test["held_out_kinds_garbage_rate"].items())
        )
    cm = test["confusion_matrix"]
    progress("confusion matrix (rows true, columns predicted): " + " ".join(cm["labels"]))
    for name, row in zip(cm["labels"], cm["matrix"]):
        progress(f"  {name:>12} " + " ".join(f"{v:5d}" for v in row))
    progress(
        f"wrote {path} in {report['seconds']['total']:.0f} s"
        + ("" if report["targets_met"] else "  (WARNING: held-out targets not met)")
    )
    if args.json:
        print(json.dumps({"checkpoint": str(path), **report}, indent=2))
    return 0
