"""A PFF node: a process that trains its layers chapter after chapter, through the parameter store.

For each of its tasks (in the order :meth:`pff.schedule.Schedule.node_tasks` gives) a node

1. skips the task if its output is already published (the node is a restart of one that died; one
   status call at start tells);
2. fetches what the task needs (:func:`pff.schedule.dependencies`: its layer's previous version and
   this chapter's versions of the layers below), long-polling the store; the fetches for the next
   task start in a background thread as soon as the current one starts training, so a layer's
   transfer and decoding only delay the node when it really has to wait; the time it is blocked
   here is the node's *wait*;
3. computes the layer's input from the layers below on its own data (numpy, one thread) and trains
   the layer for the chapter with the device runtime (:func:`pff.chapter.train_chapter`);
4. publishes the layer's parameters (never activations) with a timeline record, from a background
   thread while it goes on with its next task (if it dies before the store acknowledged, the
   restarted node trains that task again).

A node holds nothing the run needs after it publishes, so the coordinator can restart a dead
node (or give its tasks to another) and lose no work but the task in progress.

    python -m fwdfleet.pff.node --store 127.0.0.1:PORT --plan RUN/plan.json --node 0

Start it with ``OPENBLAS_NUM_THREADS=1`` (the coordinator does): multithreaded BLAS on a small
machine shared with other nodes slows Forward-Forward several times.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fwdfleet.bundle import load_bundle
from fwdfleet.device_runtime.ff import FFLayout
from fwdfleet.errors import FwdfleetError
from fwdfleet.pff.chapter import (
    ActivationCache,
    Params,
    continues_adam,
    hands_adam_on,
    split_adam_state,
    train_chapter,
    with_adam_state,
)
from fwdfleet.pff.config import NodeData, PFFConfig, RunPlan, load_data, shard
from fwdfleet.pff.schedule import Schedule, Task, dependencies
from fwdfleet.pff.store import StoreClient
from fwdfleet.pff.wire import Progress, TaskRecord


def node_id(node: int) -> str:
    return f"node-{node}"


class _Outbox:
    """Publications and progress reports, sent in order by one background thread, so that the node's
    compute thread goes on with its next task while the store stores the last one (I/O, not compute)."""

    def __init__(self, client: StoreClient, node: int, every: float, total: int) -> None:
        self.client, self.node, self.every, self.total = client, node, every, total
        self.done = 0
        self._last = 0.0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pff-outbox")
        self._pending: list[Future[object]] = []

    def _submit(self, fn: Callable[..., object], *args: object) -> None:
        still = []
        for f in self._pending:
            if f.done():
                f.result()  # a failed call raises here, in the compute thread
            else:
                still.append(f)
        self._pending = [*still, self._pool.submit(fn, *args)]

    def report(self, state: str, task: Task | None = None, step: int = 0, steps: int = 0, *,
               force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last < self.every:
            return
        self._last = now
        self._submit(self.client.report, Progress(node_id(self.node), state, task.layer if task else 0,
                                                  task.chapter if task else 0, step, steps, self.done,
                                                  self.total, now))

    def publish(self, layer: int, version: int, params: Params, record: TaskRecord) -> None:
        self._submit(self.client.publish, layer, version, params, record)

    def flush(self) -> None:
        """Wait until everything was sent; raises the first failure."""
        for f in self._pending:
            f.result()
        self._pending = []

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def run_node(plan: RunPlan, node: int, client: StoreClient, *, attempt: int = 0) -> int:
    """Run node ``node``'s tasks; returns how many it trained (the rest were published before a restart)."""
    config = plan.config
    schedule = config.schedule()
    layout = FFLayout.from_manifest(load_bundle(plan.bundle).manifest)
    train, _ = load_data(config)
    data = shard(train, schedule.data_shard(node), schedule.num_shards, config.seed)
    tasks = schedule.node_tasks(node)
    outbox = _Outbox(client, node, plan.report_every, len(tasks))
    try:
        outbox.report("ready", force=True)  # the coordinator starts the run when every node is ready
        trained = _run_tasks(layout, schedule, tasks, data, config, client, outbox, node, attempt)
        outbox.report("done", force=True)
        outbox.flush()
    finally:
        outbox.close()
    return trained


class _Prefetch:
    """Fetches the next task's missing inputs in a background thread while the current task trains, so the
    transfer and decoding of a layer are off the compute path unless the node really has to wait for it."""

    def __init__(self, client: StoreClient) -> None:
        self.client = client
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pff-prefetch")
        self._pending: dict[tuple[int, int], Future[Params]] = {}
        self._closed = threading.Event()

    def _get(self, key: tuple[int, int]) -> Params:
        # short long-polls, so that close() ends the thread soon
        return self.client.wait_for(*key, poll_seconds=2.0, stop=self._closed).params

    def want(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._get, key)

    def take(self, key: tuple[int, int]) -> Params:
        self.want([key])
        return self._pending.pop(key).result()

    def ready(self, key: tuple[int, int]) -> bool:
        f = self._pending.get(key)
        return f is not None and f.done()

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _run_tasks(layout: FFLayout, schedule: Schedule, tasks: tuple[Task, ...], data: NodeData,
               config: PFFConfig, client: StoreClient, outbox: _Outbox, node: int, attempt: int) -> int:
    # what was published before this (re)start: one status call, not one fetch per task
    published = {(layer, version) for layer, version, _ in client.status()[0]}
    todo = [t for t in tasks if (t.layer, t.version_out) not in published]
    outbox.done += len(tasks) - len(todo)
    known: dict[tuple[int, int], Params] = {}
    cache = ActivationCache()
    prefetch = _Prefetch(client)
    try:
        for i, task in enumerate(todo):
            rest = todo[i:]
            needed = {key for t in rest for key in dependencies(t)}
            for key in [k for k in known if k not in needed]:
                del known[key]
            cache.retain({t.lower_version for t in rest})
            missing = [key for key in dependencies(task) if key not in known]
            if any(not prefetch.ready(key) for key in missing):
                outbox.report("waiting", task, force=True)
            t_wait = time.time()
            for key in missing:
                known[key] = prefetch.take(key)
            wait = time.time() - t_wait
            if i + 1 < len(todo):  # the next task's inputs that this task does not produce
                prefetch.want([key for key in dependencies(todo[i + 1])
                               if key not in known and key != (task.layer, task.version_out)])
            start = time.time()
            outbox.report("training", task, 0, 1, force=True)

            def on_step(step: int, steps: int, task: Task = task) -> None:
                outbox.report("training", task, step, steps)

            # a ring's hand-off inside a chapter may carry Adam's state (PFFConfig.ring_adam)
            own, state = split_adam_state(known[(task.layer, task.version_in)])
            lower = {j: known[(j, task.lower_version)] for j in range(task.layer)}
            result = train_chapter(layout, task, lower, own, data, config.train_config(task.chapter),
                                   schedule.chapter_epochs, cache=cache, on_step=on_step,
                                   state=state if continues_adam(task, config.ring_adam) else None)
            end = time.time()
            record = TaskRecord(node_id(node), task.layer, task.chapter, start, end, wait, result.input_seconds,
                                result.train_seconds, result.loss, attempt)
            out = result.params
            if hands_adam_on(task, config.ring_adam):
                out = with_adam_state(result.params, result.state)
            outbox.publish(task.layer, task.version_out, out, record)
            known[(task.layer, task.version_out)] = out
            outbox.done += 1
    finally:
        prefetch.close()
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run one PFF node (started by `fwdfleet pff run`).")
    p.add_argument("--store", required=True, help="the parameter store's host:port")
    p.add_argument("--plan", required=True, type=Path, help="the run's plan.json")
    p.add_argument("--node", required=True, type=int, help="this node's index")
    p.add_argument("--attempt", type=int, default=0, help="how many times this node was restarted")
    p.add_argument("--ca", help="CA certificate (PEM) of a TLS store")
    p.add_argument("--token-file", help="file holding this node's token for the store (or $FWDFLEET_TOKEN)")
    args = p.parse_args(argv)
    from fwdfleet.device_runtime.credentials import read_token

    client = StoreClient(args.store, root_cert=args.ca, token=read_token(None, args.token_file))
    try:
        run_node(RunPlan.read(args.plan), args.node, client, attempt=args.attempt)
    except FwdfleetError as e:
        print(f"pff node {args.node}: error: {e}", file=sys.stderr)
        return 2
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
