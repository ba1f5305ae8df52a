"""`gamguard sign`: sign a bundle with the operator's Ed25519 key (verified by `serve --trusted-key`)."""

from __future__ import annotations

HELP = "sign a bundle with an operator key, or make a key pair (serve --trusted-key verifies it)"
DESCRIPTION = """\
Signs a bundle's bundle_hash — which covers every file and every setting of bundle.json — with an
Ed25519 private key the operator holds, writing DIR/bundle.sig. `gamguard serve --trusted-key KEY.pub`
then refuses any bundle without a valid signature by that key: unlike the hash recorded in
bundle.json, which anyone able to write the bundle can recompute, a signature needs the private key.
Sign after the last step that modifies the bundle (export, calibrate, build-engine). Needs the
'cryptography' package (pip install 'gamguard[sign]').

examples:
  gamguard sign --generate-key /secure/operator          # writes operator.key (0600) and operator.pub
  gamguard sign --bundle out/bundle --key /secure/operator.key
  gamguard serve --bundle out/bundle --trusted-key operator.pub --tls-cert s.crt --tls-key s.key
"""


def add_arguments(parser):
    parser.add_argument("--bundle", metavar="DIR", help="bundle directory to sign (it is checked first)")
    parser.add_argument("--key", metavar="FILE", help="Ed25519 private key (PEM, PKCS#8)")
    parser.add_argument(
        "--generate-key", metavar="PREFIX", help="write a new key pair PREFIX.key (private) and PREFIX.pub"
    )
    parser.add_argument("--json", action="store_true", help="print the signature record as JSON")


def run(args) -> int:
    import json

    from gamguard.runtime.bundle import BundleError
    from gamguard.runtime.cli import CommandError
    from gamguard.runtime.signing import generate_key, sign_bundle

    if bool(args.generate_key) == bool(args.bundle or args.key):
        raise CommandError("give either --generate-key PREFIX, or --bundle DIR and --key FILE")
    try:
        if args.generate_key:
            key, pub = generate_key(args.generate_key)
            print(
                json.dumps({"private_key": str(key), "public_key": str(pub)})
                if args.json
                else f"wrote {key} (private: keep it off the serving machines) and {pub} (give to serve --trusted-key)"
            )
            return 0
        if not (args.bundle and args.key):
            raise CommandError("signing needs both --bundle DIR and --key FILE")
        record = sign_bundle(args.bundle, args.key)
    except BundleError as exc:
        raise CommandError(str(exc)) from None
    print(
        json.dumps(record) if args.json else f"signed bundle_hash {record['bundle_hash']} -> {args.bundle}/bundle.sig"
    )
    return 0
