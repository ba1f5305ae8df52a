"""The model bundle: a directory with ``model.onnx``, ``reference.npz``, optional ``model.plan``
and ``bundle.json`` (the manifest).

The manifest records the SHA-256 of every other file in the directory, and ``bundle_hash``: the
SHA-256 of the manifest itself (every field but ``bundle_hash``, canonical JSON), which therefore
covers the files' hashes and every served setting — class names, garbage class, input spec, guard
policy and enforced checks, calibration. The runtime refuses a bundle whose files do not match their
hashes, whose manifest no longer matches its ``bundle_hash`` (edited after it was written), or that
has no calibration: the guard's references and thresholds are part of the model version, so serving a
model without them (or with someone else's) would silently disable the guard.

The recorded hash catches accidental and careless edits; someone able to write the bundle can also
rewrite the hash. Against that, pin the identity you approved: ``gamguard serve --expect-bundle-hash
HEX`` refuses any other bundle (and every verdict and audit line carries the served ``bundle_hash``).
A manifest without ``bundle_hash`` is refused (deleting the field must not bypass the check; bundles
from before it existed must be re-calibrated anyway). The step beyond the pin is a signature by a key the operator holds
(``bundle.sig``, :mod:`gamguard.runtime.signing`; ``gamguard serve --trusted-key``).

``bundle.json`` layout (format version 1)::

    {
      "format_version": 1,
      "model": {"name": str, "version": str},
      "class_names": [str, ...],            # K names, the garbage class included
      "garbage_class": int,                 # index into class_names
      "input": {"channels": 1, "height": H, "width": W,
                "mean": [..], "std": [..],  # per channel, applied to pixels scaled to [0, 1]
                "resize": "stretch",        # how a decoded image is brought to H x W
                "photometric": "MONOCHROME2"},   # what the model expects (bone bright)
      "layers": {"target": str, "early": str},
      "outputs": {"cam": [H, W], "early": [C_e, h_e, w_e]},
      "export": {...},                      # exporter facts (opset, head kind, versions)
      "files": {"model.onnx": sha256, ...}, # every file but bundle.json
      "calibration": null | {...},          # written by `gamguard calibrate`
      "guard": {"policy": "calibrated", "enforced_checks": [...]},
      "bundle_hash": sha256                 # of all the above (see bundle_hash())
    }
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST = "bundle.json"
MODEL_FILE = "model.onnx"
REFERENCE_FILE = "reference.npz"
PLAN_FILE = "model.plan"
HASH_FIELD = "bundle_hash"
SIGNATURE_FILE = "bundle.sig"  # optional operator signature (see gamguard.runtime.signing)


#: Known ways of feeding the model's input channels from a grey image (see InputSpec.channel_source).
CHANNEL_SOURCES = ("grey-replicated",)


class BundleError(Exception):
    """The bundle is missing, malformed, tampered with or not calibrated."""


@dataclass(frozen=True)
class InputSpec:
    """What the model expects; shared by calibration and serving so both see identical numbers."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "stretch"
    photometric: str = "MONOCHROME2"
    #: How the ``channels`` model inputs come from the decoded grey radiograph. ``grey-replicated``:
    #: the same grey pixels in every channel, each channel normalised with its own mean/std — how an
    #: ImageNet-style RGB backbone fine-tuned on X-rays is fed (and, trivially, a 1-channel model).
    channel_source: str = "grey-replicated"

    @classmethod
    def from_manifest(cls, spec: dict) -> "InputSpec":
        try:
            out = cls(
                channels=int(spec["channels"]),
                height=int(spec["height"]),
                width=int(spec["width"]),
                mean=tuple(float(v) for v in spec["mean"]),
                std=tuple(float(v) for v in spec["std"]),
                resize=str(spec.get("resize", "stretch")),
                photometric=str(spec.get("photometric", "MONOCHROME2")),
                channel_source=str(spec.get("channel_source", "grey-replicated")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"bundle.json: bad 'input' section: {exc}") from exc
        if out.channel_source not in CHANNEL_SOURCES:
            raise BundleError(
                f"bundle.json: unknown input channel_source {out.channel_source!r} (this gamguard knows "
                f"{', '.join(CHANNEL_SOURCES)})"
            )
        if len(out.mean) not in (1, out.channels) or len(out.std) not in (1, out.channels):
            raise BundleError(
                f"bundle.json: input has {out.channels} channels but {len(out.mean)} means and {len(out.std)} stds"
            )
        return out

    def to_manifest(self) -> dict:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "photometric": self.photometric,
            "channel_source": self.channel_source,
        }


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(bundle_dir: str | Path) -> list[Path]:
    """Every regular file of the bundle except the manifest and its signature, sorted."""
    d = Path(bundle_dir)
    return sorted(p for p in d.iterdir() if p.is_file() and p.name not in (MANIFEST, SIGNATURE_FILE))


def read_manifest(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a gamguard bundle (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(
            f"{path}: unsupported format_version {manifest.get('format_version')!r} "
            f"(this gamguard reads {FORMAT_VERSION})"
        )
    return manifest


def write_manifest(bundle_dir: str | Path, manifest: dict) -> dict:
    """Recompute the hash of every file in the bundle and write ``bundle.json``; returns the manifest."""
    d = Path(bundle_dir)
    manifest = {k: v for k, v in manifest.items() if k != HASH_FIELD}
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {p.name: sha256_file(p) for p in bundle_files(d)}
    manifest = json.loads(json.dumps(manifest))  # hash exactly what a reader will parse back
    manifest[HASH_FIELD] = bundle_hash(manifest)
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(d / MANIFEST)
    return manifest


def verify_hashes(bundle_dir: str | Path, manifest: dict) -> None:
    """Raise :class:`BundleError` unless every file listed matches its hash and none is unlisted."""
    d = Path(bundle_dir)
    listed = manifest.get("files") or {}
    if MODEL_FILE not in listed:
        raise BundleError(f"{d}: {MANIFEST} lists no {MODEL_FILE}")
    for name, expected in listed.items():
        path = d / name
        if not path.is_file():
            raise BundleError(f"{d}: {name} is listed in {MANIFEST} but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{d}: {name} does not match its SHA-256 in {MANIFEST} "
                f"(expected {expected[:12]}…, found {actual[:12]}…): the bundle was modified; "
                "re-export or re-calibrate it"
            )
    unlisted = [p.name for p in bundle_files(d) if p.name not in listed]
    if unlisted:
        raise BundleError(f"{d}: files not covered by {MANIFEST} hashes: {', '.join(unlisted)}")


def bundle_hash(manifest: dict) -> str:
    """The identity of a bundle version: the SHA-256 of its manifest (canonical JSON: sorted keys, no
    whitespace) without the ``bundle_hash`` field. It covers every file (through their hashes) and every
    setting in ``bundle.json``, so changing any of them changes it."""
    body = {k: v for k, v in manifest.items() if k != HASH_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def verify_manifest_hash(bundle_dir: str | Path, manifest: dict, *, allow_missing: bool = False) -> None:
    """Raise :class:`BundleError` when ``bundle.json`` records a ``bundle_hash`` its content no longer has, or
    records none. ``allow_missing``: for the commands that re-write the manifest (``calibrate``), which is how
    a bundle from before the field existed gets one; nothing serves such a bundle."""
    recorded = manifest.get(HASH_FIELD)
    if recorded is None and allow_missing:
        return
    if recorded is None:
        # Refused rather than served under its computed hash: deleting the field must not be a way round
        # the check. Bundles written before the field existed need re-calibration anyway (the reference
        # format changed in the same release), which writes it.
        raise BundleError(
            f"{bundle_dir}: {MANIFEST} records no {HASH_FIELD} (written by an older gamguard, or the field was "
            "removed): re-run `gamguard calibrate` on the bundle, which re-writes the manifest with its hash"
        )
    actual = bundle_hash(manifest)
    if recorded != actual:
        raise BundleError(
            f"{bundle_dir}: {MANIFEST} was modified after it was written (its content hashes to {actual[:12]}…, "
            f"it records {str(recorded)[:12]}…): a setting such as the class names, the garbage class, the "
            "guard policy or the calibration was changed by hand; restore it, or re-run the command that "
            "wrote it (gamguard export / calibrate)"
        )


def load_manifest(bundle_dir: str | Path, *, require_calibration: bool = True) -> dict:
    """Read and check a bundle: hashes always; calibration unless ``require_calibration`` is False."""
    d = Path(bundle_dir)
    if not d.is_dir():
        raise BundleError(f"{d}: bundle directory does not exist")
    manifest = read_manifest(d)
    verify_manifest_hash(d, manifest, allow_missing=not require_calibration)
    verify_hashes(d, manifest)
    if require_calibration:
        if not manifest.get("calibration"):
            raise BundleError(
                f"{d}: the bundle has no calibration; run `gamguard calibrate --bundle {d} --data ...` "
                "first (the guard is part of the model version and cannot run without it)"
            )
        if REFERENCE_FILE not in manifest.get("files", {}):
            raise BundleError(f"{d}: calibrated bundle lacks {REFERENCE_FILE}")
    return manifest


def default_bundle_dir() -> Path:
    """The embedded demo bundle shipped inside the package (:mod:`gamguard.runtime.demo`)."""
    return Path(__file__).resolve().parent / "demo" / "bundle"


def resolve_bundle(arg: str | Path | None) -> Path:
    """``--bundle DIR`` or, when omitted, the embedded demo bundle."""
    return Path(arg) if arg else default_bundle_dir()


def bundle_to_modify(arg: str | Path | None, command: str) -> Path:
    """``--bundle DIR`` for a command that rewrites the bundle in place. The embedded demo bundle is
    part of the installed package (read-only in site-packages, tracked files in a checkout), so such
    commands never default to it."""
    if not arg:
        raise BundleError(
            f"{command} modifies a bundle in place: pass --bundle DIR (to start from the demo bundle, "
            f"copy it first: cp -r {default_bundle_dir()} my_bundle)"
        )
    return Path(arg)
