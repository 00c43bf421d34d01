"""The PFF coordinator: export the network, serve the store, run N node processes, watch, evaluate.

:class:`PFFRun` exports an FF-MLP bundle (``export.ff_mlp``; a head per layer for ``pon``/``sff``),
starts the parameter store (:mod:`pff.store`, in this process) and publishes every layer's
initial values as version 0, then starts one ``python -m fwdfleet.pff.node`` process per node with
``OPENBLAS_NUM_THREADS=1`` (one compute thread each). While they run it shows a progress bar
per node (rich, on stderr) and restarts a node that dies (killed, crashed) up to
``max_restarts`` times; the restarted node skips what it had already published. At the end it
reads the timeline from the store's records and evaluates the final network (:mod:`pff.evaluate`).

``mode="sequential"`` is the baseline: one node process runs every task in order, with the same
code, data and single thread, so a speedup measured against it is fair.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.ff import FFLayout
from fwdfleet.errors import FwdfleetError
from fwdfleet.pff.config import PFFConfig, RunPlan, load_data
from fwdfleet.pff.evaluate import evaluate
from fwdfleet.pff.store import StoreClient, StoreServer
from fwdfleet.pff.wire import Progress, TaskRecord

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class PFFError(FwdfleetError):
    """A PFF run cannot go on (a node keeps failing, the store refused its data)."""


@dataclass(frozen=True)
class TimelineRow:
    """One task as it happened; times in seconds since the run's first task started."""

    node: int
    layer: int
    chapter: int
    start: float
    end: float
    wait_seconds: float
    input_seconds: float
    train_seconds: float
    loss: float
    attempt: int


@dataclass(frozen=True)
class NodeSummary:
    node: int
    tasks: int
    busy_seconds: float
    wait_seconds: float  # blocked on the layers below
    idle_seconds: float  # not computing, over the whole training span
    restarts: int


@dataclass
class PFFResult:
    config: PFFConfig
    train_seconds: float  # first task start -> last task end
    wall_seconds: float  # including process start-up and evaluation
    timeline: list[TimelineRow]
    nodes: list[NodeSummary]
    accuracy: dict[str, float]
    restarts: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "train_seconds": round(self.train_seconds, 3),
                "wall_seconds": round(self.wall_seconds, 3), "accuracy": self.accuracy,
                "nodes": [asdict(n) for n in self.nodes], "restarts": self.restarts,
                "timeline": [asdict(r) for r in self.timeline]}


def _node_index(record: TaskRecord) -> int:
    return int(record.node_id.rsplit("-", 1)[1])


def build_timeline(records: list[TaskRecord]) -> tuple[list[TimelineRow], float, float]:
    """Rows relative to the first start, the training span (first start to last end), the first start."""
    if not records:
        return [], 0.0, 0.0
    t0 = min(r.start for r in records)
    rows = [TimelineRow(_node_index(r), r.layer, r.chapter, r.start - t0, r.end - t0, r.wait_seconds,
                        r.input_seconds, r.train_seconds, r.loss, r.attempt) for r in records]
    rows.sort(key=lambda r: (r.start, r.node))
    return rows, max(r.end for r in rows), t0


def summarize_nodes(rows: list[TimelineRow], num_nodes: int, span: float,
                    restarts: dict[int, int]) -> list[NodeSummary]:
    out = []
    for n in range(num_nodes):
        mine = [r for r in rows if r.node == n]
        busy = sum(r.end - r.start for r in mine)
        out.append(NodeSummary(n, len(mine), round(busy, 3), round(sum(r.wait_seconds for r in mine), 3),
                               round(max(0.0, span - busy), 3), restarts.get(n, 0)))
    return out


class PFFRun:
    """One PFF run in ``workdir`` (bundle/, store/, logs/, plan.json)."""

    def __init__(self, config: PFFConfig, workdir: str | Path, *, bundle: str | Path | None = None,
                 progress: bool = False, max_restarts: int = 3) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.bundle_path = Path(bundle) if bundle else None
        self.progress = progress
        self.max_restarts = max_restarts
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.attempts: dict[int, int] = {}
        self.restart_log: list[dict[str, Any]] = []
        self.server: StoreServer | None = None
        self.client: StoreClient | None = None
        self._t_start = 0.0
        self._released = False

    @property
    def pids(self) -> dict[int, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def _bundle(self) -> Path:
        if self.bundle_path is not None:
            return self.bundle_path
        return export_network(self.config, self.workdir / "bundle")

    def start(self) -> None:
        self._t_start = time.time()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        bundle_dir = self._bundle()
        bundle = load_bundle(bundle_dir)
        layout = FFLayout.from_manifest(bundle.manifest)
        if tuple(layout.sizes) != tuple(self.config.layers):
            raise PFFError(f"bundle {bundle_dir} has layers {layout.sizes}, the run asks for {self.config.layers}")
        self._data = load_data(self.config)  # fails here, with a clear message, before any node starts
        self.plan_path = RunPlan(self.config, str(bundle_dir)).write(self.workdir / "plan.json")
        self.server = StoreServer(self.workdir / "store", workers=max(16, 2 * self.config.nodes + 8))  # long polls
        self.client = StoreClient(self.server.address)
        self._layout, self._initial = layout, bundle.load_trainables()
        for n in range(self.config.nodes):
            self._spawn(n)

    def _release(self) -> None:
        """Publish every layer's version 0 once every node has loaded its data, so that all start together
        (process start-up, which varies between nodes, stays out of the measured training span)."""
        assert self.client is not None
        if self._released:
            return
        _, reports = self.client.status()
        if len({p.node_id for p in reports}) < self.config.nodes:
            return
        for i in range(self._layout.num_layers):
            params = {name: self._initial[name] for name in self._layout.param_names(i).values()}
            self.client.publish(i, 0, params, TaskRecord(node_id="bundle", layer=i))
        self._released = True

    def _spawn(self, n: int) -> None:
        assert self.server is not None
        attempt = self.attempts.get(n, -1) + 1
        self.attempts[n] = attempt
        log = open(self.workdir / "logs" / f"node-{n}.{attempt}.log", "wb")  # noqa: SIM115 (child keeps it)
        cmd = [sys.executable, "-m", "fwdfleet.pff.node", "--store", self.server.address, "--plan", str(self.plan_path),
               "--node", str(n), "--attempt", str(attempt)]
        root = str(Path(__file__).resolve().parent.parent)  # so `-m fwdfleet.pff.node` works from any folder
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, **ONE_THREAD, "PYTHONPATH": path}
        # its own session: a node is an independent process (as on its own machine); with the kernel's
        # autogroup scheduling, processes of one session share one CPU slice, which would serialise the nodes
        self.procs[n] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()

    def _all_published(self) -> bool:
        assert self.client is not None
        published, _ = self.client.status()
        have = {(layer, v) for layer, v, _ in published}
        return all((t.layer, t.version_out) in have for t in self.config.schedule().tasks())

    def _check_processes(self) -> bool:
        """Restart dead nodes; True when every node has exited cleanly."""
        finished = True
        for n, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                finished = False
            elif code != 0:
                log = (self.workdir / "logs" / f"node-{n}.{self.attempts[n]}.log").read_text(errors="replace")
                if len(self.restart_log) >= self.max_restarts * self.config.nodes or \
                        self.attempts[n] >= self.max_restarts:
                    raise PFFError(f"node {n} failed {self.attempts[n] + 1} times (exit {code}); last log:\n"
                                   + "\n".join(log.splitlines()[-8:]))
                self.restart_log.append({"node": n, "exit_code": code, "unix_time": time.time(),
                                         "attempt": self.attempts[n] + 1})
                self._spawn(n)
                finished = False
        return finished

    def wait(self, timeout: float = 3600.0) -> PFFResult:
        """Watch the nodes until every task is published; then evaluate."""
        deadline = time.time() + timeout
        display = _Display(self.config.nodes) if self.progress else None
        try:
            while not self._check_processes():
                self._release()
                if time.time() > deadline:
                    raise PFFError(f"the run did not finish in {timeout:.0f} s; see {self.workdir / 'logs'}")
                if display is not None and self.client is not None:
                    display.update(self.client.status()[1])
                time.sleep(0.2)
            if not self._all_published():
                raise PFFError(f"every node exited but some layers were never published; see {self.workdir}/logs")
            return self._result()
        finally:
            if display is not None:
                display.close()
            self.close()

    def _result(self) -> PFFResult:
        assert self.client is not None
        published, _ = self.client.status()
        records = [r for _, v, r in published if v > 0]
        rows, span, t0 = build_timeline(records)
        restart_log = [{**ev, "run_time": round(ev["unix_time"] - t0, 3)} for ev in self.restart_log]
        layout = FFLayout.from_manifest(load_bundle(RunPlan.read(self.plan_path).bundle).manifest)
        final: dict[str, Any] = {}
        for i in range(layout.num_layers):
            lv = self.client.fetch(i, self.config.schedule().final_version)
            assert lv is not None
            final.update(lv.params)
        train, test = self._data
        accuracy = {k: round(v, 4) for k, v in evaluate(layout, final, train, test, seed=self.config.seed).items()}
        restarts = {n: a for n, a in self.attempts.items()}
        return PFFResult(self.config, span, time.time() - self._t_start, rows,
                         summarize_nodes(rows, self.config.nodes, span, restarts), accuracy, restart_log)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
            self.server = None


class _Display:
    """One rich progress bar per node (stderr)."""

    def __init__(self, nodes: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bars = Progress(TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.fields[tasks]}"),
                             TimeElapsedColumn(), console=Console(stderr=True))
        self.ids = [self.bars.add_task(f"node {n}: starting", total=1.0, tasks="") for n in range(nodes)]
        self.bars.start()

    def update(self, reports: list[Progress]) -> None:
        for p in reports:
            n = int(p.node_id.rsplit("-", 1)[1])
            if not 0 <= n < len(self.ids):
                continue
            frac = p.step / p.total_steps if p.total_steps else 0.0
            what = p.state if p.state in ("ready", "done") else f"{p.state} layer {p.layer} ch {p.chapter}"
            self.bars.update(self.ids[n], description=f"node {n}: {what}", total=max(p.tasks_total, 1),
                             completed=p.tasks_done + (frac if p.state == "training" else 0.0),
                             tasks=f"{p.tasks_done}/{p.tasks_total} tasks")

    def close(self) -> None:
        self.bars.stop()


def export_network(config: PFFConfig, out: Path) -> Path:
    """Export ``config``'s initial network (seeded by ``config.seed``) as an FF-MLP bundle in ``out``."""
    from fwdfleet.export.ff_mlp import FFMLPConfig, export_ff_mlp

    cfg = FFMLPConfig(layers=config.layers, num_classes=10, heads=config.head,  # type: ignore[arg-type]
                      seed=config.seed)
    return export_ff_mlp(cfg, out, overwrite=True)


def run_pff(config: PFFConfig, workdir: str | Path | None = None, *, bundle: str | Path | None = None,
            progress: bool = False, max_restarts: int = 3) -> PFFResult:
    """Run ``config`` to the end (in ``workdir``, or a temporary folder) and return the result."""
    with tempfile.TemporaryDirectory(prefix="pff-") as tmp:
        run = PFFRun(config, workdir or tmp, bundle=bundle, progress=progress, max_restarts=max_restarts)
        try:
            run.start()
        except BaseException:
            run.close()
            raise
        return run.wait()
