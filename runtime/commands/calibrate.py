"""`gamguard calibrate`: build the guard's references and thresholds for a bundle."""

from __future__ import annotations

HELP = "calibrate a bundle's guard (references, p-value tables, false-rejection bound) on in-distribution data"
DESCRIPTION = """\
Runs the bundle's deployed engine over in-distribution calibration images and writes reference.npz
plus the "calibration" section of bundle.json (re-hashing the bundle).

The images are shuffled with numpy.random.default_rng(--seed) and split 50/25/25 into a reference
part (per-class mean Grad-CAM of correctly classified images, early-feature statistics), a null part
(each check's in-distribution score distribution → p-values) and a conformal part (the combined
statistic's distribution → a rejection cut that bounds the in-distribution false-rejection rate at
--alpha). The measured rate (5-fold cross-fitted on the held-out parts) is recorded in bundle.json.

Data: --data DIR in ImageFolder layout (DIR/<class name>/*.png|jpg|dcm, class names as in the bundle)
or --phantoms N (N procedurally generated hand phantoms per class, generator seed
PHANTOM_SEED_BASE + --seed, never used by training or the tests).

Site calibration (--site DIR): a calibrated bundle moved to a new hospital, console or season keeps
its model, engine and references, but its false-rejection bound holds only for data exchangeable with
the calibration images. --site re-fits the null tables and the conformal cut from a few hundred
unlabelled in-distribution images of the site (every image file under DIR, recursively; at least 100,
and at least 2/alpha) and records the site (--site-name, the images' SHA-256, the base calibration's
facts, the cut method) in bundle.json's calibration.site. It does not retrain or re-export and needs no
labels; to rebuild the references too, calibrate with labelled images (--data).
--site-cut cross-fit (default): every site image fits the null tables and, judged by tables fitted
without its fold (10 folds, --seed), the cut: cross-conformal, less spread than a split cut on a few
hundred images; its worst-case bound is 2 x alpha, in practice near alpha. --site-cut split: a 50/50
split (--seed) into null and conformal parts: the strict alpha bound, more spread, 4/alpha images.

examples:
  gamguard calibrate --bundle out/bundle --phantoms 250
  gamguard calibrate --bundle out/bundle --site /data/site-b/normal-week --site-name "site B console 2"
  gamguard calibrate --bundle out/bundle --data calib/ --alpha 0.10 --json
  gamguard calibrate --bundle out/bundle --from-stored-scores --alpha 0.10
"""

PHANTOM_SEED_BASE = 900_000  # calibration phantoms; training uses derive_seed(seed, ...) streams, tests other bases
PHANTOM_SIZE = 256


def add_arguments(parser):
    parser.add_argument(
        "--bundle",
        metavar="DIR",
        help="bundle directory to calibrate in place (required: the embedded demo bundle is "
        "never modified; copy it first)",
    )
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="DIR", help="in-distribution images, DIR/<class>/*.png|jpg|dcm")
    src.add_argument("--phantoms", metavar="N", type=int, help="generate N hand phantoms per class instead")
    src.add_argument(
        "--site",
        metavar="DIR",
        help="site calibration of an already calibrated bundle: unlabelled in-distribution images of the new "
        "site (every image under DIR); re-fits the null tables and the conformal cut, keeps the references",
    )
    src.add_argument(
        "--from-stored-scores",
        action="store_true",
        help="only re-derive the thresholds for a new --alpha from the held-out scores stored in "
        "reference.npz (no images, no engine; the references do not depend on alpha)",
    )
    parser.add_argument(
        "--alpha", type=float, default=0.05, help="bound on the in-distribution false-rejection rate (default 0.05)"
    )
    parser.add_argument("--site-name", help="name recorded for --site (default: the folder name)")
    parser.add_argument(
        "--site-cut",
        choices=("cross-fit", "split"),
        help="how --site fits the conformal cut: cross-fit (default: every image, out of fold) or split (50/50)",
    )
    parser.add_argument("--seed", type=int, default=0, help="split (and phantom) seed (default 0)")
    parser.add_argument("--providers", help="ONNX Runtime providers, e.g. cuda,cpu (default: TensorRT→CUDA→CPU)")
    parser.add_argument(
        "--threads",
        type=int,
        help="engine intra-op threads (default: env GAMGUARD_THREADS, else ONNX Runtime's: all cores)",
    )
    parser.add_argument("--json", action="store_true", help="print the calibration section as JSON on stdout")


def load_phantoms(n_per_class: int, seed: int, spec, class_names: list[str], garbage: int):
    """Phantom images already brought to the model's input size (identical numbers: preprocessing a
    model-sized image does no further resampling) and their bundle class indices."""
    import numpy as np

    from gamguard.runtime.demo import phantoms
    from gamguard.runtime.preprocess import resize_image

    real = [c for i, c in enumerate(class_names) if i != garbage]
    if list(phantoms.CLASS_NAMES) != real:
        raise ValueError(
            f"the bundle's classes {real} are not the phantom classes {list(phantoms.CLASS_NAMES)}; "
            "calibrate with --data"
        )
    images, labels = phantoms.phantom_set(n_per_class, PHANTOM_SEED_BASE + seed, PHANTOM_SIZE)
    small = np.stack([resize_image(im, spec.height, spec.width, spec.resize) for im in images])
    idx = [class_names.index(phantoms.CLASS_NAMES[y]) for y in labels]
    return small, np.asarray(idx, np.int64)


def run(args):
    import sys
    from pathlib import Path

    from gamguard.runtime import bundle as bundle_mod
    from gamguard.runtime.bundle import BundleError, InputSpec
    from gamguard.runtime.calibration import calibrate_bundle, recalibrate_alpha
    from gamguard.runtime.cli import CommandError

    try:
        bundle_dir = bundle_mod.bundle_to_modify(args.bundle, "calibrate")
    except BundleError as exc:
        raise CommandError(str(exc)) from exc
    if args.data is None and args.phantoms is None and args.site is None and not args.from_stored_scores:
        raise CommandError(
            "give the calibration data: --data DIR or --phantoms N (or --site DIR, or --from-stored-scores)"
        )
    if args.site_name is not None and args.site is None:
        raise CommandError("--site-name goes with --site DIR")
    if args.site_cut is not None and args.site is None:
        raise CommandError("--site-cut goes with --site DIR")
    try:
        if args.site is not None:
            return _print(args, bundle_dir, _calibrate_site(args, bundle_dir))
        if args.from_stored_scores:
            manifest = recalibrate_alpha(bundle_dir, args.alpha, progress=_progress)
            return _print(args, bundle_dir, manifest)
        manifest = bundle_mod.load_manifest(bundle_dir, require_calibration=False)
        spec = InputSpec.from_manifest(manifest["input"])
        names = list(manifest["class_names"])
        garbage = int(manifest["garbage_class"])
        if args.phantoms is not None:
            if args.phantoms < 1:
                raise CommandError("--phantoms must be positive")
            print(
                f"calibrate: generating {args.phantoms} phantoms per class (seed {PHANTOM_SEED_BASE + args.seed})",
                file=sys.stderr,
                flush=True,
            )
            try:
                images, labels = load_phantoms(args.phantoms, args.seed, spec, names, garbage)
            except ValueError as exc:
                raise CommandError(str(exc)) from exc
            get = images.__getitem__
            dataset = {
                "kind": "phantoms",
                "generator": "gamguard.runtime.demo.phantoms.phantom_set",
                "n_per_class": args.phantoms,
                "seed": PHANTOM_SEED_BASE + args.seed,
                "size": PHANTOM_SIZE,
            }
        else:
            from gamguard.runtime.datasets import ImageFolder

            root = Path(args.data)
            if not root.is_dir():
                raise CommandError(f"{root}: not a directory")
            try:
                folder = ImageFolder(root, class_names=names)
            except ValueError as exc:  # DatasetError
                real = [n for i, n in enumerate(names) if i != garbage]
                raise CommandError(
                    f"{exc} (calibration folders must be named after the bundle's real classes: {', '.join(real)})"
                ) from exc
            labels = [y for _, y in folder.samples]
            if garbage in labels:
                raise CommandError(
                    f"{root}: calibration data must be in-distribution; found a folder for the "
                    f"garbage class {names[garbage]!r}"
                )

            def get(i):
                try:
                    return folder.load(i)[0].pixels
                except ValueError as exc:  # DecodeError: name the file relative to --data
                    path = Path(folder.samples[i][0])
                    raise CommandError(
                        f"{path.relative_to(root) if path.is_relative_to(root) else path}: "
                        f"{exc}; fix or remove the file and calibrate again"
                    ) from exc

            dataset = {
                "kind": "image_folder",
                "path": str(root.resolve()),
                "classes": sorted({names[y] for y in labels}),
                "n": len(labels),
            }
        manifest = calibrate_bundle(
            bundle_dir,
            images=get,
            labels=labels,
            dataset=dataset,
            alpha=args.alpha,
            seed=args.seed,
            providers=args.providers,
            threads=args.threads,
            progress=_progress,
        )
    except BundleError as exc:
        raise CommandError(str(exc)) from exc
    return _print(args, bundle_dir, manifest)


def _calibrate_site(args, bundle_dir):
    import hashlib
    from pathlib import Path

    from gamguard.runtime.calibration import calibrate_site, min_site_images
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.datasets import DatasetError, iter_image_files
    from gamguard.runtime.decode import decode_file

    root = Path(args.site)
    if not root.is_dir():
        raise CommandError(f"{root}: not a directory")
    try:
        files = iter_image_files(root)
    except DatasetError as exc:
        raise CommandError(str(exc)) from exc
    cut = args.site_cut or "cross-fit"
    need = min_site_images(args.alpha, cut)
    if len(files) < need:  # before decoding anything
        raise CommandError(
            f"{root}: {len(files)} images; site calibration at alpha={args.alpha} needs at least {need} unlabelled "
            "in-distribution images of the site"
        )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())

    def get(i):
        try:
            return decode_file(files[i]).pixels
        except ValueError as exc:  # DecodeError
            raise CommandError(f"{files[i]}: {exc}; fix or remove the file and calibrate again") from exc

    site = {"name": args.site_name or root.resolve().name, "path": str(root.resolve()), "sha256": digest.hexdigest()}
    return calibrate_site(
        bundle_dir,
        images=get,
        n=len(files),
        site=site,
        alpha=args.alpha,
        seed=args.seed,
        cut=cut,
        providers=args.providers,
        threads=args.threads,
        progress=_progress,
    )


def _print(args, bundle_dir, manifest) -> int:
    import json

    from gamguard.runtime import bundle as bundle_mod

    cal = manifest["calibration"]
    if args.json:
        print(
            json.dumps({"bundle": str(bundle_dir), "bundle_hash": bundle_mod.bundle_hash(manifest), "calibration": cal})
        )
    elif cal.get("site"):  # site-calibrated (also after a later --from-stored-scores on it)
        site = cal["site"]
        print(
            f"site-calibrated {bundle_dir} for {site['name']!r}: {site['n']} images ("
            + (
                "cross-fitted cut: every image in the p-value tables and, out of fold, in the cut"
                if site.get("cut") == "cross-fit"
                else f"null {site['null']}, conformal {site['conformal']}"
            )
            + f"), alpha={cal['alpha']}, measured false-rejection rate on the site images "
            f"{cal['measured_false_rejection_rate']:.3f} (garbage {cal['measured_per_check']['garbage']:.3f}, "
            f"attention {cal['measured_per_check']['attention']:.3f}, "
            f"feature {cal['measured_per_check']['feature']:.3f}); images sha256 {site['sha256'][:16]}"
        )
    else:
        print(
            f"calibrated {bundle_dir}: n={cal['n']} (reference {cal['split']['reference']}, null "
            f"{cal['split']['null']}, conformal {cal['split']['conformal']}), alpha={cal['alpha']}, "
            f"measured held-out false-rejection rate {cal['measured_false_rejection_rate']:.3f} "
            f"(garbage {cal['measured_per_check']['garbage']:.3f}, attention "
            f"{cal['measured_per_check']['attention']:.3f}, feature {cal['measured_per_check']['feature']:.3f})"
        )
    return 0


def _progress(msg: str) -> None:
    import sys

    print(f"calibrate: {msg}", file=sys.stderr, flush=True)
