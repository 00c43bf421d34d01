"""``fwdfleet aggregator``: serve rounds over gRPC, show a running server's status, make dev certificates.

    fwdfleet aggregator serve --config aggregator.toml [--set rounds.deadline_s=30 ...] [--port 0]
    fwdfleet aggregator status --address host:port --ca ca.pem --token-file token.txt [--json]
    fwdfleet aggregator gen-certs --out certs/ [--host myserver.lan ...]
    fwdfleet aggregator add-token --tokens-file tokens.txt --name phone-1 [--device phone-1]

The TOML file holds the coordinator's tables (``[rounds]``, ``[perturbation]``, ...; see
:mod:`aggregator.config`) and a ``[server]`` table for the transport (:class:`ServerConfig`):
``bundle``, ``port``, ``tls_cert``, ``tls_key``, ``tokens_file``, ... ``--set server.port=0``
works like any other override.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any

from fwdfleet.errors import ConfigError, FwdfleetError


def register(sub: Any) -> None:
    p = sub.add_parser("aggregator", help="serve federated rounds over gRPC", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    asub = p.add_subparsers(dest="aggregator_command", metavar="ACTION", required=True)

    s = asub.add_parser("serve", help="run the aggregator (TLS and device tokens by default)")
    s.add_argument("--config", help="TOML file ([server], [rounds], [perturbation], ... tables)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rounds.deadline_s=30 (repeatable)")
    s.add_argument("--bundle", help="bundle folder or zip devices train (server.bundle)")
    s.add_argument("--checkpoint-dir", help="checkpoint folder: resume from it, write to it (checkpoint.dir)")
    s.add_argument("--host", help="address to bind (server.host; default 0.0.0.0 with TLS, 127.0.0.1 with --insecure)")
    s.add_argument("--port", type=int, help="port to bind; 0 picks a free one and prints it (server.port)")
    s.add_argument("--tls-cert", help="server certificate PEM (server.tls_cert)")
    s.add_argument("--tls-key", help="server private key PEM (server.tls_key)")
    s.add_argument("--tokens-file", help="allow-list of device token hashes (server.tokens_file)")
    s.add_argument("--insecure", action="store_true", help="serve WITHOUT TLS: local development only")
    s.set_defaults(func=_serve)

    st = asub.add_parser("status", help="print a running aggregator's status")
    _add_connection_args(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(func=_status)

    g = asub.add_parser("gen-certs", help="make a self-signed CA and a server certificate (development)")
    g.add_argument("--out", required=True, help="output folder (ca.pem, server.pem, server.key)")
    g.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="extra DNS name or IP the certificate is valid for (localhost and 127.0.0.1 always are)")
    g.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    g.set_defaults(func=_gen_certs)

    t = asub.add_parser("add-token", help="create a device token and add its hash to the allow-list")
    t.add_argument("--tokens-file", required=True, help="allow-list file (created if missing)")
    t.add_argument("--name", required=True, help="who holds the token (for logs)")
    t.add_argument("--device", default="*", help="device id the token may act for (default *: any)")
    t.set_defaults(func=_add_token)


def _add_connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, help="host:port of the aggregator")
    p.add_argument("--token", help="bearer token (or --token-file, or $FWDFLEET_TOKEN)")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--ca", help="PEM of the CA that signed the server certificate (default: system roots)")
    p.add_argument("--server-name", help="TLS name to verify when --address is not the certificate's name")
    p.add_argument("--insecure", action="store_true", help="plaintext connection (local development)")


# ---------------------------------------------------------------------------------------- serve


def build_configs(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(AggregatorConfig, ServerConfig, server table) from the TOML file, overrides and flags."""
    from fwdfleet.aggregator.config import apply_overrides, config_from_dict
    from fwdfleet.aggregator.server import ServerConfig

    data: dict[str, Any] = {}
    source = "command line"
    if args.config:
        source = args.config
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read the config file {args.config}: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{args.config} is not valid TOML: {e}") from e
    data = apply_overrides(data, args.overrides)
    server = dict(data.pop("server", {}))
    flags = {"bundle": args.bundle, "host": args.host, "port": args.port, "tls_cert": args.tls_cert,
             "tls_key": args.tls_key, "tokens_file": args.tokens_file}
    server.update({k: v for k, v in flags.items() if v is not None})
    if args.insecure:
        server["insecure"] = True
    if args.checkpoint_dir:
        data.setdefault("checkpoint", {})["dir"] = args.checkpoint_dir
    return config_from_dict(data, source=source), ServerConfig.from_dict(server, source=source), server


def _serve(args: argparse.Namespace) -> int:
    from fwdfleet.aggregator.coordinator import Coordinator
    from fwdfleet.aggregator.server import INSECURE_WARNING, insecure_binding, serve
    from fwdfleet.bundle import load_bundle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, server_config, _ = build_configs(args)
    if not server_config.bundle:
        raise ConfigError("no bundle to serve: pass --bundle PATH or set server.bundle in the config")
    bundle = load_bundle(server_config.bundle)
    checkpoint_dir = Path(config.checkpoint.dir) if config.checkpoint.dir else None
    coordinator = Coordinator(config, bundle, checkpoint_dir=checkpoint_dir)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    running = serve(server_config, coordinator, bundle)
    if server_config.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        print(insecure_binding(server_config), file=sys.stderr, flush=True)
    mode = "INSECURE" if server_config.insecure else "TLS"
    print(f"listening on {server_config.host}:{running.port} ({mode})", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping: finishing running calls, writing a final checkpoint", file=sys.stderr, flush=True)
        running.stop()
    return 0


# ---------------------------------------------------------------------------------------- status


def fetch_status(address: str, *, token: str | None, ca: str | None, insecure: bool,
                 server_name: str | None = None, timeout: float = 10.0) -> Any:
    """Call Status on a running aggregator and return a :class:`fwdfleet.protocol.serde.ServerStatus`."""
    import grpc

    from fwdfleet.protocol import bearer_metadata, rpc, serde

    options: list[tuple[str, Any]] = []
    if insecure:
        channel = grpc.insecure_channel(address)
    else:
        root = Path(ca).read_bytes() if ca else None
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=root), options=options)
    try:
        reply = rpc.unary_call(channel, "Status")(
            serde.status_request(), timeout=timeout, metadata=bearer_metadata(token) if token else ()
        )
    except grpc.RpcError as e:
        raise FwdfleetError(f"status call to {address} failed: {e.code().name}: {e.details()}") from e
    finally:
        channel.close()
    return serde.status_from_bytes(reply)


def _status(args: argparse.Namespace) -> int:
    from fwdfleet.device_runtime.credentials import read_token

    status = fetch_status(args.address, token=read_token(args.token, args.token_file), ca=args.ca,
                          insecure=args.insecure, server_name=args.server_name)
    body = json.loads(status.status_json)
    if args.json:
        print(json.dumps({"protocol_version": status.protocol_version, "server_version": status.server_version,
                          "uptime_seconds": round(status.uptime_seconds, 3), "coordinator": body}, indent=2))
        return 0
    print(f"aggregator {args.address}  fwdfleet {status.server_version}  protocol v{status.protocol_version}  "
          f"up {status.uptime_seconds:.0f} s")
    for key, value in body.items():
        print(f"  {key:<20} {value}")
    return 0


# ---------------------------------------------------------------------------------------- certificates


def _gen_certs(args: argparse.Namespace) -> int:
    from fwdfleet.aggregator.tls import write_dev_certificates

    if args.days < 1:
        raise ConfigError(f"--days must be >= 1, got {args.days}")
    paths = write_dev_certificates(args.out, args.host, args.days)
    print(f"wrote {paths['ca']} (give it to devices: --ca), {paths['cert']} and {paths['key']} (server.tls_cert, "
          "server.tls_key). For development only: the CA key is not kept.")
    return 0


def _add_token(args: argparse.Namespace) -> int:
    from fwdfleet.aggregator.auth import append_token, new_token

    token = new_token()
    append_token(args.tokens_file, token, args.name, args.device)
    print(token)
    print(f"added the hash of this token for {args.name!r} (device {args.device}) to {args.tokens_file}; "
          "the token itself is not stored: give it to the device now", file=sys.stderr)
    return 0
