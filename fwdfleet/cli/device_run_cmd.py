"""``fwdfleet device run``: take part in federated rounds as a device.

    fwdfleet device run --config device.toml
    fwdfleet device run --address agg.lan:50051 --device-id pi-3 --token-file token.txt --ca ca.pem \\
        --data train.csv --bundle-dir ~/.fwdfleet

``device.toml``::

    bundle_dir = "~/.fwdfleet"     # where the downloaded bundle is kept
    rounds = 0                     # 0: until stopped (Ctrl-C / SIGTERM)
    threads = 2                    # onnxruntime intra-op threads (0: its choice)
    providers = ["cpu"]
    [client]                       # DeviceClientConfig: address, device_id, token_file, root_cert, ...
    address = "agg.lan:50051"
    device_id = "pi-3"
    token_file = "token.txt"
    root_cert = "ca.pem"
    [data]                         # the device's own examples (never leave the device)
    path = "train.csv"
    split = "train"
    label_column = "label"

Flags override the file. The token comes from ``--token``, ``--token-file``, ``client.token_file``
or ``$FWDFLEET_TOKEN``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from fwdfleet.errors import ConfigError

_TOP = ("bundle_dir", "rounds", "threads", "providers")


def register_run(device_subparsers: Any) -> None:
    """Add ``run`` to the ``fwdfleet device`` subcommands (called by ``device_cmd.register``)."""
    p = device_subparsers.add_parser("run", help="take part in federated rounds (the device side of the protocol)",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="device TOML file ([client], [data] tables)")
    p.add_argument("--address", help="aggregator host:port")
    p.add_argument("--device-id", help="this device's id (unique in the fleet)")
    p.add_argument("--token", help="bearer token (prefer --token-file or $FWDFLEET_TOKEN)")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--ca", help="PEM of the CA that signed the aggregator's certificate")
    p.add_argument("--server-name", help="TLS name to verify when --address is not the certificate's name")
    p.add_argument("--insecure", action="store_true", help="plaintext connection (local development only)")
    p.add_argument("--data", help="the device's training data (CSV, IDX folder, npz)")
    p.add_argument("--split", help="train/test split to read from an IDX folder (default train)")
    p.add_argument("--label-column", help="label column of a CSV (default label)")
    p.add_argument("--bundle-dir", help="where to keep the downloaded bundle (default ./fwdfleet-device)")
    p.add_argument("--rounds", type=int, help="stop after this many accepted results (default: until stopped)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (0: its choice)")
    p.add_argument("--provider", action="append", help="execution provider, e.g. cpu, nnapi (repeatable)")
    p.add_argument("--verbose", action="store_true", help="log every step")
    p.set_defaults(func=_run)


def _settings(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    data: dict[str, Any] = {}
    if args.config:
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read the device config {args.config}: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{args.config} is not valid TOML: {e}") from e
    unknown = sorted(set(data) - {*_TOP, "client", "data"})
    if unknown:
        raise ConfigError(f"{args.config}: unknown key(s) {unknown}; valid: {[*_TOP, '[client]', '[data]']}")
    client = dict(data.get("client", {}))
    flags = {"address": args.address, "device_id": args.device_id, "token": args.token,
             "token_file": args.token_file, "root_cert": args.ca, "server_name": args.server_name}
    client.update({k: v for k, v in flags.items() if v is not None})
    if args.insecure:
        client["insecure"] = True
    dataset = dict(data.get("data", {}))
    dataset.update({k: v for k, v in {"path": args.data, "split": args.split,
                                      "label_column": args.label_column}.items() if v is not None})
    top = {k: data[k] for k in _TOP if k in data}
    top.update({k: v for k, v in {"bundle_dir": args.bundle_dir, "rounds": args.rounds, "threads": args.threads,
                                  "providers": args.provider}.items() if v is not None})
    return client, dataset, top


def _run(args: argparse.Namespace) -> int:
    from fwdfleet.device_runtime.client import ClientStats, DeviceClient, DeviceClientConfig, describe
    from fwdfleet.device_runtime.credentials import read_token
    from fwdfleet.device_runtime.data import load_dataset
    from fwdfleet.device_runtime.session import SessionOptions, provider_name

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    client, data, top = _settings(args)
    client["token"] = read_token(client.get("token"), client.pop("token_file", None))
    known = {f.name for f in fields(DeviceClientConfig)}
    if sorted(set(client) - known):
        raise ConfigError(f"unknown [client] key(s) {sorted(set(client) - known)}; valid: {sorted(known)}")
    for required in ("address", "device_id"):
        if not client.get(required):
            raise ConfigError(f"no {required}: pass --{required.replace('_', '-')} or set client.{required}")
    if not data.get("path"):
        raise ConfigError("no training data: pass --data PATH or set data.path")
    try:
        config = DeviceClientConfig(**client)
        options = SessionOptions(providers=tuple(provider_name(p) for p in top.get("providers", ["cpu"])),
                                 intra_op_threads=int(top.get("threads", 0)))
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from e
    rounds = int(top.get("rounds", 0)) or None
    path, split, label = data["path"], data.get("split", "train"), data.get("label_column", "label")
    device = DeviceClient(config, Path(top.get("bundle_dir", "fwdfleet-device")).expanduser(),
                          lambda bundle: load_dataset(path, bundle, split=split, label_column=label),
                          session_options=options)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: device.stop())
    stats: ClientStats = device.run(rounds)
    print(f"device {config.device_id}: {describe(stats)}", file=sys.stderr)
    return 0
