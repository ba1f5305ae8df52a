"""Bundle signatures: an Ed25519 key the operator holds signs a bundle's ``bundle_hash``; the server
verifies it at load (``gamguard serve --trusted-key operator.pub``) and refuses anything else.

``bundle_hash`` already covers every file and every setting of ``bundle.json`` (see
:mod:`gamguard.runtime.bundle`), so signing it signs the whole bundle. Unlike the recorded hash, which
anyone able to write the bundle can recompute, the signature needs the private key.

``bundle.sig`` (JSON, next to ``bundle.json``, not itself covered by the file hashes)::

    {"algorithm": "ed25519", "bundle_hash": HEX, "public_key_sha256": HEX, "signature": BASE64}

The signed message is ``b"gamguard-bundle-v1:" + bundle_hash`` (ASCII). Keys are PEM files
(PKCS#8 private key, SubjectPublicKeyInfo public key), made by ``gamguard sign --generate-key``.
Needs the ``cryptography`` package (``pip install 'gamguard[sign]'``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from .bundle import SIGNATURE_FILE, BundleError, bundle_hash, load_manifest

ALGORITHM = "ed25519"
_CONTEXT = b"gamguard-bundle-v1:"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise BundleError("bundle signatures need the 'cryptography' package: pip install 'gamguard[sign]'") from None
    return serialization, ed25519


def _public_bytes(public_key) -> bytes:
    serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_key(prefix: str | Path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``PREFIX.key`` (private, mode 0600) and ``PREFIX.pub``."""
    serialization, ed25519 = _crypto()
    private = ed25519.Ed25519PrivateKey.generate()
    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for path in (key_path, pub_path):
        if path.exists():
            raise BundleError(f"{path} exists; not overwriting a key")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_bytes(
        private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return key_path, pub_path


def _load_key(path: str | Path, private: bool):
    serialization, ed25519 = _crypto()
    try:
        data = Path(path).read_bytes()
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: not a readable PEM {'private' if private else 'public'} key ({exc})") from None
    wanted = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, wanted):
        raise BundleError(f"{path}: not an Ed25519 key")
    return key


def sign_bundle(bundle_dir: str | Path, private_key: str | Path) -> dict:
    """Check the bundle (hashes, calibration) and write ``bundle.sig`` for its ``bundle_hash``."""
    d = Path(bundle_dir)
    manifest = load_manifest(d)
    key = _load_key(private_key, private=True)
    digest = bundle_hash(manifest)
    record = {
        "algorithm": ALGORITHM,
        "bundle_hash": digest,
        "public_key_sha256": hashlib.sha256(_public_bytes(key.public_key())).hexdigest(),
        "signature": base64.b64encode(key.sign(_CONTEXT + digest.encode())).decode(),
    }
    (d / SIGNATURE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def verify_bundle_signature(bundle_dir: str | Path, manifest: dict, public_key: str | Path) -> None:
    """Raise :class:`BundleError` unless ``bundle.sig`` is a valid signature of this manifest's
    ``bundle_hash`` by ``public_key``."""
    from cryptography.exceptions import InvalidSignature

    d = Path(bundle_dir)
    key = _load_key(public_key, private=False)
    path = d / SIGNATURE_FILE
    if not path.is_file():
        raise BundleError(
            f"{d}: no {SIGNATURE_FILE}, but a trusted key was given: sign the bundle with "
            "`gamguard sign --bundle DIR --key OPERATOR.key`"
        )
    try:
        record = json.loads(path.read_text())
        signature = base64.b64decode(record["signature"], validate=True)
        algorithm, signed_hash = record["algorithm"], record["bundle_hash"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{path}: malformed signature file") from None
    if algorithm != ALGORITHM:
        raise BundleError(f"{path}: unsupported signature algorithm {algorithm!r} (expected {ALGORITHM})")
    digest = bundle_hash(manifest)
    if signed_hash != digest:
        raise BundleError(
            f"{d}: the signature is for bundle_hash {str(signed_hash)[:12]}…, this bundle is "
            f"{digest[:12]}…: the bundle changed after it was signed"
        )
    try:
        key.verify(signature, _CONTEXT + digest.encode())
    except InvalidSignature:
        raise BundleError(f"{d}: {SIGNATURE_FILE} is not a valid signature by {public_key}") from None
