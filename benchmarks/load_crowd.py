"""Load benchmark: an asyncio crowd of simulated devices against one real aggregator process.

Starts ``fwdfleet aggregator serve`` (TLS, a token allow-list, a tiny classifier bundle) in a child
process, then runs ``--devices`` simulated devices in one asyncio loop, each with its own TLS
channel (``grpc.aio``): join, long-poll for a task, answer it with a valid scalar result (the
issued indices, small derivatives, one minibatch of samples), submit, poll again, until the
aggregator has applied ``--rounds`` updates. Devices do no model work: the benchmark measures the
server and the protocol, not onnxruntime. Every transient status is retried with the client's own
jittered backoff (:mod:`fwdfleet.protocol.retry`, honouring a busy server's retry-after); a
device that fails ``--give-up`` times in a row gives up and is counted.

Reported: rounds applied and rounds/s, Submit latency p50/p99 (each successful Submit call,
retries excluded), every non-OK status by code, devices that gave up, and the server's peak RSS
(VmHWM of the child process, which holds only the aggregator).

    python benchmarks/load_crowd.py --devices 1000 --rounds 10           # a table
    python benchmarks/load_crowd.py --devices 200 --rounds 10 --json     # one JSON object

The crowd and the server share the machine, so figures on a loaded 2-core machine are pessimistic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from fwdfleet.aggregator.auth import append_token
from fwdfleet.aggregator.tls import write_dev_certificates
from fwdfleet.export.onnx_mlp import MLPConfig, export_mlp
from fwdfleet.protocol import bearer_metadata, serde
from fwdfleet.protocol.retry import Backoff, backoff_delay, is_transient, retry_after
from fwdfleet.task import DeviceResult

TOKEN = "load-benchmark-fleet-token"
BACKOFF = Backoff(initial_s=0.2, max_s=5.0, multiplier=2.0, jitter=0.5)


def _config(devices: int, rounds: int, fraction: float, k: int) -> str:
    return f"""
master_seed = 1
[rounds]
min_devices = {max(2, int(devices * fraction))}
fraction = {fraction}
num_rounds = {rounds}
deadline_s = 60
min_results = {max(1, int(devices * fraction * 0.9))}
[perturbation]
k = {k}
[optimizer]
lr = 0.01
"""


class Stats:
    def __init__(self) -> None:
        self.submit_s: list[float] = []
        self.codes: Counter[str] = Counter()
        self.gave_up = 0
        self.accepted = 0


async def _call(channel: grpc.aio.Channel, method: str, request: bytes, stats: Stats, give_up: int,
                rng: random.Random, timeout: float) -> bytes | None:
    """One unary call, retried on transient statuses with the shared backoff; None: gave up or refused."""
    for attempt in range(give_up):
        try:
            t0 = time.perf_counter()
            reply: bytes = await channel.unary_unary(f"/fwdfleet.v1.Fleet/{method}")(
                request, timeout=timeout, metadata=bearer_metadata(TOKEN))
            if method == "Submit":
                stats.submit_s.append(time.perf_counter() - t0)
            return reply
        except grpc.aio.AioRpcError as e:
            stats.codes[f"{method}:{e.code().name}"] += 1
            if not is_transient(e):
                return None
            await asyncio.sleep(backoff_delay(attempt, BACKOFF, rng, retry_after(e)))
    stats.gave_up += 1
    raise _GaveUp


class _GaveUp(Exception):
    pass


async def _device(i: int, address: str, ca: bytes, stats: Stats, done: asyncio.Event, give_up: int) -> None:
    rng = random.Random(i)
    device_id = f"sim-{i:05d}"
    channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    try:
        profile = serde.DeviceProfile(platform="sim", num_samples=64)
        await _call(channel, "Join", serde.join_request(device_id, profile, "load"), stats, give_up, rng, 30)
        while not done.is_set():
            reply = await _call(channel, "GetTask", serde.get_task_request(device_id, 5.0), stats, give_up, rng, 40)
            if reply is None:
                await asyncio.sleep(1.0)
                continue
            poll = serde.task_poll_from_bytes(reply)
            task = poll.task
            if task is None:
                if poll.retry_after_seconds > 0:
                    await asyncio.sleep(poll.retry_after_seconds * (0.5 + rng.random()))
                continue
            ks = list(task.candidate_indices)[: task.num_perturbations]
            result = DeviceResult(round_id=task.round_id, model_version=task.model_version, indices=tuple(ks),
                                  derivatives=tuple(float(d) for d in np.random.default_rng(i).normal(0, 0.1, len(ks))),
                                  num_samples=task.batch_size, loss_mean=1.0)
            ack = await _call(channel, "Submit", serde.submit_request(device_id, result), stats, give_up, rng, 30)
            if ack is not None:
                stats.accepted += 1
    except _GaveUp:
        pass
    finally:
        await channel.close()


async def _monitor(address: str, ca: bytes, rounds: int, done: asyncio.Event) -> None:
    channel = grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    try:
        while True:
            try:
                reply = await channel.unary_unary("/fwdfleet.v1.Fleet/Status")(
                    serde.status_request(), timeout=30, metadata=bearer_metadata(TOKEN))
                if serde.status_from_bytes(reply).model_version >= rounds:
                    done.set()
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    finally:
        await channel.close()


async def _crowd(args: argparse.Namespace, address: str, ca: bytes, stats: Stats) -> float:
    done = asyncio.Event()
    t0 = time.monotonic()
    devices = [asyncio.create_task(_device(i, address, ca, stats, done, args.give_up)) for i in range(args.devices)]
    monitor = asyncio.create_task(_monitor(address, ca, args.rounds, done))
    await asyncio.wait_for(monitor, timeout=args.timeout)
    elapsed = time.monotonic() - t0
    await asyncio.gather(*devices)
    return elapsed


def _peak_rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else float("nan")


def run(args: argparse.Namespace) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.devices + 256)), hard))
    work = Path(tempfile.mkdtemp(prefix="fwdfleet-load-"))
    bundle = export_mlp(MLPConfig(layer_sizes=(64, 16, 10), seed=0, opset=17), work / "bundle")
    certs = write_dev_certificates(work / "certs")
    tokens = work / "tokens.txt"
    append_token(tokens, TOKEN, "crowd")
    (work / "aggregator.toml").write_text(_config(args.devices, args.rounds, args.fraction, args.k))
    cmd = [sys.executable, "-m", "fwdfleet.cli.main", "aggregator", "serve", "--config", str(work / "aggregator.toml"),
           "--bundle", str(bundle), "--host", "127.0.0.1", "--port", "0", "--tls-cert", str(certs["cert"]),
           "--tls-key", str(certs["key"]), "--tokens-file", str(tokens),
           "--set", f"server.max_devices_per_token={args.devices + 10}"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = server.stdout.readline() if server.stdout else ""
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if not match:
            raise SystemExit(f"the aggregator did not start: {line!r}")
        address = f"127.0.0.1:{match.group(1)}"
        stats = Stats()
        elapsed = asyncio.run(_crowd(args, address, certs["ca"].read_bytes(), stats))
        rss = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    lat = np.array(stats.submit_s) if stats.submit_s else np.array([np.nan])
    return {"devices": args.devices, "rounds": args.rounds, "fraction": args.fraction, "k": args.k,
            "elapsed_s": round(elapsed, 1), "rounds_per_s": round(args.rounds / elapsed, 3),
            "submits_accepted": stats.accepted, "submit_p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
            "submit_p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1), "gave_up": stats.gave_up,
            "non_ok": dict(stats.codes), "server_peak_rss_mb": round(rss, 1), "cpus": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.1, help="rounds.fraction: share of devices per round")
    p.add_argument("--k", type=int, default=4, help="perturbations per device")
    p.add_argument("--give-up", type=int, default=30, help="consecutive failed attempts before a device gives up")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:20s} {value}")
    return 0 if out["gave_up"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
