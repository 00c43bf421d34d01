"""A real aggregator on 127.0.0.1 (port 0) with real TLS certificates and tokens, for transport tests."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _tiny_bundles import make_classifier_bundle

from fwdfleet.aggregator.auth import append_token
from fwdfleet.aggregator.config import config_from_dict
from fwdfleet.aggregator.coordinator import Coordinator
from fwdfleet.aggregator.server import RunningServer, ServerConfig, serve
from fwdfleet.aggregator.tls import write_dev_certificates
from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import ArrayDataset
from fwdfleet.protocol import bearer_metadata, rpc

FLEET_TOKEN = "fleet-token-for-tests"
DEVICE_TOKEN = "token-of-phone-a"  # bound to device "phone-a"


@dataclass
class Env:
    tmp: Path
    bundle: Bundle
    certs: dict[str, Path]
    tokens: Path


def make_env(tmp: Path) -> Env:
    bundle = make_classifier_bundle(tmp / "bundle", in_dim=4, num_classes=3)
    certs = write_dev_certificates(tmp / "certs")  # real CA + server certificate (cryptography)
    tokens = tmp / "tokens.txt"
    append_token(tokens, FLEET_TOKEN, "fleet")
    append_token(tokens, DEVICE_TOKEN, "phone-a", "phone-a")
    return Env(tmp, bundle, certs, tokens)


def aggregator_config(**tables: Mapping[str, Any]) -> Any:
    data: dict[str, Any] = {"rounds": {"min_devices": 2, "deadline_s": 30}, "perturbation": {"k": 4}}
    for name, table in tables.items():
        data[name] = {**data.get(name, {}), **table}
    return config_from_dict(data)


def start(env: Env, config: Any, *, checkpoint_dir: Path | None = None, **server: Any) -> RunningServer:
    coordinator = Coordinator(config, env.bundle, checkpoint_dir=checkpoint_dir)
    settings = {"host": "127.0.0.1", "port": 0, "tls_cert": str(env.certs["cert"]), "tls_key": str(env.certs["key"]),
                "tokens_file": str(env.tokens), "advance_interval_s": 0.05, "shutdown_grace_s": 0.5, **server}
    return serve(ServerConfig(**settings), coordinator, env.bundle)


def channel(env: Env, port: int) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=env.certs["ca"].read_bytes())
    return grpc.secure_channel(f"127.0.0.1:{port}", creds)


def call(ch: grpc.Channel, method: str, request: bytes, token: str | None = FLEET_TOKEN, timeout: float = 10) -> bytes:
    metadata = bearer_metadata(token) if token else ()
    return rpc.unary_call(ch, method)(request, timeout=timeout, metadata=metadata)


def dataset(seed: int = 0, n: int = 64) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset({"x": rng.standard_normal((n, 4)).astype(np.float32),
                         "labels": rng.integers(0, 3, n).astype(np.int64)})
