"""``fwdfleet pack``: write a device kit (bundle, device settings, credentials, the fwdfleet wheel).

Copy the kit to a phone or a board (``android_harness/adb_run.sh`` pushes it with adb), install
with the kit's ``scripts/termux_setup.sh`` or ``scripts/pi_setup.sh``, then run the device with
``python -m fwdfleet.device_runtime.kit KIT``. See :mod:`device_runtime.kit` for the layout.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from fwdfleet.errors import ConfigError

# Files of the source checkout copied into the kit's scripts/ folder when present.
HARNESS_SCRIPTS = ("termux_setup.sh", "pi_setup.sh", "README.md")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pack",
        help="write a device kit (bundle, settings, credentials, wheel) to copy to a phone or a board",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", help="bundle folder or .zip (the one the aggregator serves)")
    p.add_argument("--out", required=True, help="kit folder to write")
    p.add_argument("--address", required=True, help="aggregator host:port as the device reaches it")
    p.add_argument("--device-id", required=True, help="this device's id (one kit per device)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", help="the device's bearer token")
    tok.add_argument("--token-file", help="file holding the device's bearer token")
    tok.add_argument(
        "--new-token",
        metavar="ALLOW_LIST",
        help="mint a fresh token bound to --device-id and append its hash to this aggregator allow-list file",
    )
    p.add_argument("--ca", help="PEM of the CA that signed the aggregator's certificate (ca.pem of gen-certs)")
    p.add_argument("--server-name", help="TLS name to verify when --address is not the certificate's name")
    p.add_argument("--insecure", action="store_true", help="plaintext connection (local development only)")
    p.add_argument("--data", help="local data file to ship with the kit (else pass --data on the device)")
    p.add_argument("--wheel", help="use this fwdfleet wheel instead of building one from the source tree")
    p.add_argument("--ram-mb", type=int, default=0, help="RAM the device reports when it joins")
    p.add_argument("--compute-speed", type=float, default=1.0, help="relative speed the device reports")
    p.add_argument("--platform", help="platform label the device reports (default: detected on the device)")
    p.add_argument("--no-scripts", action="store_true", help="do not copy the android_harness setup scripts")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_pack)


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    if args.token_file:
        from fwdfleet.device_runtime.credentials import read_token_file

        return read_token_file(args.token_file)
    if args.new_token:
        from fwdfleet.aggregator.auth import append_token, new_token

        token = new_token()
        append_token(args.new_token, token, args.device_id, args.device_id)
        print(f"added a token for device {args.device_id} to {args.new_token} (restart the aggregator to load it)")
        return token
    return None


def _pack(args: argparse.Namespace) -> int:
    from fwdfleet.bundle import load_bundle
    from fwdfleet.device_runtime.client import DeviceClientConfig
    from fwdfleet.device_runtime.kit import build_wheel, pack_kit, source_tree

    if args.ca and not Path(args.ca).is_file():
        raise ConfigError(f"--ca {args.ca} is not a file")
    if args.data and not Path(args.data).exists():
        raise ConfigError(f"--data {args.data} does not exist")
    if Path(args.out).exists() and not args.force:
        raise ConfigError(f"{args.out} already exists; remove it or pass --force to replace it")
    if not args.insecure and not (args.token or args.token_file or args.new_token):
        raise ConfigError("a TLS aggregator needs a device token: pass --token, --token-file or --new-token")
    bundle = load_bundle(args.bundle, verify=True)
    source = source_tree()
    if not args.wheel and source is None:
        raise ConfigError("fwdfleet is not running from a source checkout: pass --wheel with a fwdfleet wheel")
    extra: dict[str, Path] = {}
    if source is not None and not args.no_scripts:
        for name in HARNESS_SCRIPTS:
            f = source / "android_harness" / name
            if f.is_file():
                extra[f"scripts/{name}"] = f
    settings: dict[str, Any] = {"ram_mb": args.ram_mb, "compute_speed": args.compute_speed}
    if args.platform:
        settings["platform"] = args.platform
    try:
        config = DeviceClientConfig(
            address=args.address,
            device_id=args.device_id,
            root_cert=str(Path(args.ca).resolve()) if args.ca else None,
            insecure=args.insecure,
            server_name=args.server_name,
            **settings,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    with tempfile.TemporaryDirectory(prefix="fwdfleet-pack-") as tmp:
        wheel = Path(args.wheel) if args.wheel else build_wheel(source, tmp)  # type: ignore[arg-type]
        if args.wheel and not wheel.is_file():
            raise ConfigError(f"--wheel {wheel} is not a file")
        # The token comes last, once everything else checked out, so that a failed pack mints none.
        config = _with_token(config, _token(args))
        kit = pack_kit(args.out, bundle=bundle, config=config, wheel=wheel, data=args.data,
                       extra_files=extra, overwrite=args.force)  # fmt: skip
    m = kit.manifest
    print(f"wrote kit {kit.path} for device {args.device_id} -> {args.address}")
    for rel in sorted(m.files):
        print(f"  {rel}")
    print("on the device: bash scripts/termux_setup.sh . (Termux) or bash scripts/pi_setup.sh . (aarch64 Linux),")
    print("then: python -m fwdfleet.device_runtime.kit . --rounds 10")
    return 0


def _with_token(config: Any, token: str | None) -> Any:
    import dataclasses

    return dataclasses.replace(config, token=token) if token else config
