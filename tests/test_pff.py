"""Pipeline Forward-Forward: schedules, the parameter store (disk and gRPC), real multi-process runs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fwdfleet.device_runtime.ff import FFLayout
from fwdfleet.errors import ConfigError
from fwdfleet.pff.config import NodeData, PFFConfig
from fwdfleet.pff.run import PFFRun, run_pff
from fwdfleet.pff.schedule import Schedule, Task, dependencies, makespan, simulate
from fwdfleet.pff.store import ParameterStore, StoreClient, StoreServer
from fwdfleet.pff.wire import StoreError, TaskRecord

# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    ("mode", "layers", "nodes", "owners"),
    [
        ("sequential", 3, 1, {(0, 0, 0): 0, (2, 1, 0): 0}),
        ("single-layer", 3, 3, {(0, 0, 0): 0, (1, 0, 0): 1, (2, 0, 0): 2, (2, 3, 0): 2}),
        ("single-layer", 4, 2, {(0, 0, 0): 0, (1, 2, 0): 0, (2, 0, 0): 1, (3, 3, 0): 1}),
        ("all-layers", 3, 2, {(0, 0, 0): 0, (2, 0, 0): 0, (0, 1, 0): 1, (2, 1, 0): 1, (1, 2, 0): 0}),
        # federated: part p of every chapter of every layer is node p's (its shard)
        ("federated", 3, 3, {(0, 0, 0): 0, (0, 0, 1): 1, (0, 0, 2): 2, (1, 3, 1): 1, (2, 2, 2): 2}),
    ],
)
def test_owners_and_tasks(mode: str, layers: int, nodes: int, owners: dict[tuple[int, int, int], int]) -> None:
    s = Schedule(mode, layers, nodes, splits=4, epochs=8)  # type: ignore[arg-type]
    for (layer, chapter, part), node in owners.items():
        assert s.owner(layer, chapter, part) == node
    parts = nodes if mode == "federated" else 1
    assert s.parts == parts and s.final_version == 4 * parts
    all_tasks = s.tasks()
    assert sorted((t.layer, t.chapter, t.part) for t in all_tasks) == [
        (la, c, p) for la in range(layers) for c in range(4) for p in range(parts)]
    # the versions of a layer form one chain: each task takes the previous one's output
    assert sorted((t.layer, t.version_in) for t in all_tasks) == [
        (la, v) for la in range(layers) for v in range(4 * parts)]
    producer = {(t.layer, t.version_out): t.node for t in all_tasks}
    per_node = [s.node_tasks(n) for n in range(nodes)]
    assert sum(len(t) for t in per_node) == len(all_tasks)
    assert all(len(t) > 0 for t in per_node)  # no idle node
    for tasks in per_node:  # every dependency a node produces itself comes earlier in its own order
        seen: set[tuple[int, int]] = {(la, 0) for la in range(layers)}
        for t in tasks:
            assert all(d in seen or producer[d] != t.node for d in dependencies(t))
            seen.add((t.layer, t.version_out))
    assert s.data_shard(nodes - 1) == (nodes - 1 if mode == "federated" else None)
    assert s.chapter_epochs == 2


def test_federated_ring_versions_and_order() -> None:
    s = Schedule("federated", 3, 2, splits=4, epochs=4)
    t = Task(chapter=2, layer=1, node=1, part=1, parts=2)
    assert (t.version_in, t.version_out, t.lower_version) == (5, 6, 6)
    # part 1 of layer 1, chapter 2 continues part 0 and trains on layer 0 at the end of chapter 2
    assert dependencies(t) == ((1, 5), (0, 6))
    # node 0 interleaves the rings of consecutive layers: (chapter + layer, layer) order
    assert [(x.chapter, x.layer) for x in s.node_tasks(0)][:6] == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]


def test_dependencies_are_own_previous_and_this_chapters_layers_below() -> None:
    assert dependencies(Task(chapter=3, layer=2, node=0)) == ((2, 3), (0, 4), (1, 4))
    assert dependencies(Task(chapter=0, layer=0, node=0)) == ((0, 0),)


@pytest.mark.parametrize(
    ("mode", "layers", "nodes", "expected"),
    [
        ("sequential", 4, 1, 40.0),
        ("single-layer", 2, 2, 11.0),  # pipeline fill: S + L - 1
        ("single-layer", 4, 2, 22.0),  # node 1's blocks finish 2 tasks after node 0's
        ("all-layers", 4, 2, 21.0),  # S L / 2 + 1
        ("all-layers", 4, 4, 13.0),  # S + L - 1: a chapter can start one layer after the previous one
        # a ring of N parts of 1/N each: all-layers plus the first ring's fill, 1 - 1/N
        ("federated", 4, 2, 21.5),
        ("federated", 4, 8, 13.375),
    ],
)
def test_simulated_makespan(mode: str, layers: int, nodes: int, expected: float) -> None:
    s = Schedule(mode, layers, nodes, splits=10, epochs=10)  # type: ignore[arg-type]
    sim = simulate(s, lambda t: 1.0 / t.parts)
    assert makespan(sim) == pytest.approx(expected)
    ends = {(x.task.layer, x.task.version_out): x.end for x in sim}
    for x in sim:  # nothing starts before what it needs
        assert all(ends.get(d, 0.0) <= x.start + 1e-9 for d in dependencies(x.task))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(mode="sequential", nodes=2), "nodes"),
        (dict(mode="single-layer", nodes=3, layers=(64, 32, 32)), "nodes"),
        (dict(epochs=10, splits=4), "epochs"),
        (dict(mode="pipeline"), "mode"),
        (dict(negatives="hard"), "negatives"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"PFFConfig.{field}"):
        PFFConfig(**kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------- store


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layers.0.weight": rng.standard_normal((5, 3)).astype(np.float32),
            "layers.0.bias": rng.standard_normal(5).astype(np.float32)}


def test_store_persists_and_versions_are_immutable(tmp_path: Path) -> None:
    store = ParameterStore(tmp_path)
    rec = TaskRecord(node_id="node-1", layer=0, chapter=2, start=1.0, end=2.5, loss=0.3)
    assert store.publish(0, 3, _params(1), rec) is False
    assert store.publish(0, 3, _params(1), rec) is True  # a retry of the same bytes
    with pytest.raises(StoreError, match="immutable"):
        store.publish(0, 3, _params(2), rec)
    reopened = ParameterStore(tmp_path)  # a restarted store
    lv = reopened.fetch(0, 3)
    assert lv is not None and lv.record == rec
    for name, value in _params(1).items():
        np.testing.assert_array_equal(lv.params[name], value)
    assert reopened.fetch(0, 4) is None
    blob = tmp_path / "l0.v3.f32"
    data = bytearray(blob.read_bytes())
    data[0] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="sha256"):
        ParameterStore(tmp_path)


def test_store_over_grpc_long_poll_and_restart(tmp_path: Path) -> None:
    server = StoreServer(tmp_path / "store")
    client = StoreClient(server.address, retry_seconds=10)
    try:
        assert client.fetch(1, 1, wait_seconds=0.0) is None
        timer = threading.Timer(0.3, lambda: StoreClient(server.address).publish(1, 1, _params(3), TaskRecord()))
        timer.start()
        t = time.monotonic()
        lv = client.fetch(1, 1, wait_seconds=5.0)  # waits for the publication
        assert lv is not None and 0.2 < time.monotonic() - t < 4.0
        np.testing.assert_array_equal(lv.params["layers.0.bias"], _params(3)["layers.0.bias"])
        with pytest.raises(StoreError, match="immutable"):
            client.publish(1, 1, _params(4), TaskRecord())
        published, _ = client.status()
        assert [(la, v) for la, v, _ in published] == [(1, 1)]
        stop = threading.Event()
        stop.set()
        with pytest.raises(StoreError, match="stopped while waiting"):  # a node shutting down stops waiting
            client.wait_for(2, 1, poll_seconds=0.1, stop=stop)
    finally:
        server.stop()
        client.close()
    server = StoreServer(tmp_path / "store")  # restarted on the same folder
    client = StoreClient(server.address)
    try:
        lv = client.fetch(1, 1)
        assert lv is not None
        np.testing.assert_array_equal(lv.params["layers.0.weight"], _params(3)["layers.0.weight"])
    finally:
        server.stop()
        client.close()


# ---------------------------------------------------------------- real runs (node processes, gRPC)

DIGITS = dict(layers=(64, 128, 128), dataset="digits", epochs=12, splits=6, seed=0)


@pytest.fixture(scope="module")
def sequential() -> dict[str, float]:
    return run_pff(PFFConfig(mode="sequential", nodes=1, **DIGITS)).accuracy  # type: ignore[arg-type]


def test_two_node_single_layer_matches_sequential(sequential: dict[str, float], tmp_path: Path) -> None:
    result = run_pff(PFFConfig(mode="single-layer", nodes=2, **DIGITS), tmp_path)  # type: ignore[arg-type]
    assert sequential["goodness"] > 0.8  # chance is 0.1
    # the same tasks on the same data: the pipeline changes when work happens, not what it computes
    for key in ("goodness", "softmax"):
        assert abs(result.accuracy[key] - sequential[key]) <= 0.02
    assert {(r.node, r.layer) for r in result.timeline} == {(0, 0), (1, 1)}
    assert len(result.timeline) == 2 * 6
    layer1 = sorted((r for r in result.timeline if r.layer == 1), key=lambda r: r.chapter)
    layer0_end = {r.chapter: r.end for r in result.timeline if r.layer == 0}
    assert all(r.start >= layer0_end[r.chapter] - 1e-3 for r in layer1)  # waited for chapter c of layer 0
    assert all(n.tasks == 6 and n.idle_seconds >= 0 for n in result.nodes)
    assert sorted(p.name for p in (tmp_path / "store").glob("*.json"))[:2] == ["l0.v0.json", "l0.v1.json"]


def test_federated_ring_uses_every_shard_and_matches_sequential(sequential: dict[str, float]) -> None:
    result = run_pff(PFFConfig(mode="federated", nodes=2, **DIGITS))  # type: ignore[arg-type]
    # the same steps on the same data as sequential FF, in another order (shard 0's half, then shard 1's)
    assert abs(result.accuracy["goodness"] - sequential["goodness"]) <= 0.03
    assert len(result.timeline) == 2 * 6 * 2  # every chapter of every layer: one part per node
    for layer in range(2):
        for chapter in range(6):
            parts = sorted((r for r in result.timeline if (r.layer, r.chapter) == (layer, chapter)),
                           key=lambda r: r.start)
            assert [r.node for r in parts] == [0, 1]  # node 0 on shard 0, then node 1 on shard 1
            assert parts[1].start >= parts[0].end - 1e-3  # the hand-off: node 1 continues node 0's layer
    busy = [n.busy_seconds for n in result.nodes]
    assert min(busy) > 0.3 * max(busy)  # both nodes work


def test_shards_partition_the_training_set() -> None:
    from fwdfleet.pff.config import shard

    data = NodeData(np.zeros((101, 2), np.float32), np.arange(101) % 10, np.arange(101))
    parts = [shard(data, k, 3, seed=7) for k in range(3)]
    ids = np.concatenate([p.ids for p in parts])
    assert sorted(ids.tolist()) == list(range(101)) and all(33 <= p.ids.size <= 34 for p in parts)


@pytest.mark.parametrize("mode", ["all-layers", "federated"])
def test_killed_node_is_restarted_and_the_run_finishes(sequential: dict[str, float], tmp_path: Path,
                                                       mode: str) -> None:
    config = PFFConfig(mode=mode, nodes=2, **DIGITS)  # type: ignore[arg-type]
    parts = config.schedule().parts
    run = PFFRun(config, tmp_path)
    run.start()
    try:
        killed_pid = None
        deadline = time.time() + 60
        while killed_pid is None and time.time() < deadline:
            run._check_processes()
            run._release()
            assert run.client is not None
            published, _ = run.client.status()
            if any(r.node_id == "node-1" for _, v, r in published if v > 0):
                killed_pid = run.pids[1]
                os.kill(killed_pid, signal.SIGKILL)
            time.sleep(0.02)
        assert killed_pid is not None, "node 1 never published"
        result = run.wait(timeout=120)
    finally:
        run.close()
    assert [ev["node"] for ev in result.restarts] == [1]
    assert result.restarts[0]["exit_code"] == -signal.SIGKILL
    assert result.nodes[1].restarts == 1
    assert len(result.timeline) == 2 * 6 * parts  # every task published exactly once
    assert any(r.attempt == 1 for r in result.timeline if r.node == 1)  # the restart trained the rest
    # nothing lost, nothing changed (federated: the same steps as sequential FF in another order)
    assert abs(result.accuracy["goodness"] - sequential["goodness"]) <= (0.02 if parts == 1 else 0.03)


def test_cli_json_and_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fwdfleet.cli.main import main

    png = tmp_path / "timeline.png"
    code = main(["pff", "run", "--mode", "all-layers", "--nodes", "2", "--layers", "64,32,32", "--epochs", "2",
                 "--splits", "2", "--objective", "pon", "--json", "--timeline", str(png)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"]["head"] > 0.3 and len(out["timeline"]) == 4
    assert png.stat().st_size > 10_000


# ---------------------------------------------------------------- one task (in process)


def _tiny() -> tuple[FFLayout, dict[int, dict[str, np.ndarray]], NodeData]:
    from fwdfleet.export.ff_mlp import FFMLPConfig, initial_trainables

    layout = FFLayout(sizes=(20, 16, 16, 16), num_classes=4)
    init = initial_trainables(FFMLPConfig(layers=(20, 16, 16, 16), num_classes=4))
    params = {i: {n: init[n] for n in layout.param_names(i).values()} for i in range(3)}
    rng = np.random.default_rng(0)
    data = NodeData(rng.random((50, 20)).astype(np.float32), rng.integers(0, 4, 50), np.arange(50))
    return layout, params, data


@pytest.mark.parametrize("negatives", ["fixed", "random", "adaptive"])
def test_layer_inputs_negatives_and_cache(negatives: str) -> None:
    from fwdfleet.device_runtime.ff_objectives import layer_forward
    from fwdfleet.pff.chapter import ActivationCache, layer_inputs

    layout, params, data = _tiny()
    cfg = PFFConfig(layers=(20, 16, 16, 16), negatives=negatives).train_config()  # type: ignore[arg-type]
    cache = ActivationCache()
    t = Task(chapter=1, layer=2, node=0)
    pos, neg = layer_inputs(layout, t, params, params[2], data, cfg, cache)
    h = layout.embed_labels(data.x, data.y)
    for j in range(2):
        h = layer_forward(layout.layer_params(j, params[j]), h, layout.layer_shape(j)).h
    np.testing.assert_allclose(pos, h, rtol=1e-5, atol=1e-6)
    assert neg is not None and not np.allclose(neg, pos)
    pos_again, neg_again = layer_inputs(layout, t, params, params[2], data, cfg, cache)
    np.testing.assert_array_equal(pos_again, pos)  # from the cache
    np.testing.assert_array_equal(neg_again, neg)  # deterministic in (seed, layer, chapter)
    _, neg_next = layer_inputs(layout, Task(2, 2, 0), params, params[2], data, cfg, cache)
    assert neg_next is not None
    assert np.array_equal(neg_next, neg) == (negatives == "fixed")  # FixedNEG drawn once, others re-drawn
    if negatives != "adaptive":  # (AdaptiveNEG's all-labels pass is not cached)
        # per rows and version only the deepest output is kept (layer 1's: the chain goes on from it)
        assert {(k[1], k[2]) for k in cache._data} == {(1, 2), (1, 3)}
    cache.retain({3})  # what the node's remaining tasks need
    assert all(k[2] == 3 for k in cache._data)


def test_train_chapter_is_deterministic_and_changes_only_its_layer() -> None:
    from fwdfleet.pff.chapter import train_chapter

    layout, params, data = _tiny()
    cfg = PFFConfig(layers=(20, 16, 16, 16)).train_config()
    t = Task(chapter=0, layer=1, node=0)
    a = train_chapter(layout, t, params, params[1], data, cfg, 2)
    b = train_chapter(layout, t, params, params[1], data, cfg, 2)
    assert set(a.params) == {"layers.1.weight", "layers.1.bias"}
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert not np.allclose(a.params["layers.1.weight"], params[1]["layers.1.weight"])
    assert np.isfinite(a.loss)


def test_progress_display_shows_each_node() -> None:
    from fwdfleet.pff.run import _Display
    from fwdfleet.pff.wire import Progress

    display = _Display(2)
    try:
        display.update([Progress("node-0", "training", layer=1, chapter=2, step=5, total_steps=10, tasks_done=3,
                                 tasks_total=8), Progress("node-1", "done", tasks_done=8, tasks_total=8)])
        first, second = display.bars.tasks
        assert first.description == "node 0: training layer 1 ch 2" and first.completed == pytest.approx(3.5)
        assert second.description == "node 1: done" and second.completed == 8
    finally:
        display.close()


def test_speedup_benchmark_repeats_modes_and_takes_the_median(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/pff_speedup.py --repeats: every repetition computes the same network (it checks), and the
    reported speedup is the median of the per-repetition ratios against the same repetition's sequential run."""
    import statistics
    import sys

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.pff_speedup import main

    assert main(["--datasets", "digits", "--layers", "64,32,32", "--epochs", "2", "--splits", "2", "--max-train", "300",
                 "--modes", "all-layers", "--repeats", "3", "--skip-classic", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["mode"]: r for r in out["datasets"][0]["rows"]}
    assert set(rows) == {"sequential", "all-layers"}
    assert rows["sequential"]["speedups"] == [1.0, 1.0, 1.0]
    ratios = rows["all-layers"]["speedups"]
    assert len(ratios) == 3 and all(x > 0 for x in ratios)
    assert rows["all-layers"]["speedup"] == pytest.approx(statistics.median(ratios), abs=2e-3)
    assert rows["all-layers"]["delta_points"] == 0.0  # all-layers computes exactly what sequential does
    slow = rows["all-layers"]["task_slowdown"]
    assert slow is not None and 0.2 < slow["train"] < 5.0


def test_train_chapter_hands_adam_state_on_when_given() -> None:
    """A ring's next part can continue the previous part's Adam state (benchmarks/pff_ring_adam.py):
    the step counts go on, and the result differs from restarting Adam."""
    from fwdfleet.pff.chapter import train_chapter

    layout, params, data = _tiny()
    cfg = PFFConfig(layers=(20, 16, 16, 16)).train_config()
    first = train_chapter(layout, Task(0, 1, 0, 0, 2), params, params[1], data, cfg, 1)
    steps = -(-data.y.size // cfg.batch_size)
    assert set(first.state.t.values()) == {steps}
    fresh = train_chapter(layout, Task(0, 1, 1, 1, 2), params, first.params, data, cfg, 1)
    handed = train_chapter(layout, Task(0, 1, 1, 1, 2), params, first.params, data, cfg, 1, state=first.state)
    assert set(fresh.state.t.values()) == {steps} and set(handed.state.t.values()) == {2 * steps}
    assert not np.allclose(fresh.params["layers.1.weight"], handed.params["layers.1.weight"])


def test_ring_adam_benchmark_reproduces_the_nodes_ring(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/pff_ring_adam.py's in-process rings are the nodes' federated runs, with Adam restarted at each
    hand-off and with Adam handed on (PFFConfig.ring_adam)."""
    import sys

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.pff_ring_adam import VARIANTS, main

    assert main(["--dataset", "digits", "--layers", "64,32,32", "--epochs", "2", "--splits", "2", "--max-train", "300",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    base = dict(dataset="digits", layers=(64, 32, 32), epochs=2, splits=2, max_train=300)
    for variant, ring_adam in ((VARIANTS[1], "restart"), (VARIANTS[2], "hand-on")):
        nodes = run_pff(PFFConfig(mode="federated", nodes=2, ring_adam=ring_adam, **base)).accuracy  # type: ignore[arg-type]
        assert row[variant] == nodes["goodness"], variant
    assert row[VARIANTS[1]] != row[VARIANTS[2]]


def test_adam_state_travels_with_the_parameters_and_back() -> None:
    from fwdfleet.device_runtime.ff_train import AdamState
    from fwdfleet.pff.chapter import split_adam_state, with_adam_state

    params = {"layers.0.weight": np.ones((3, 2), np.float32), "layers.0.bias": np.zeros(2, np.float32)}
    state = AdamState(t={k: 7 for k in params}, m={k: v + 0.5 for k, v in params.items()},
                      v={k: v + 0.25 for k, v in params.items()})
    tensors = with_adam_state(params, state)
    assert len(tensors) == 8 and all(v.dtype == np.float32 for v in tensors.values())
    back, got = split_adam_state({k: v.copy() for k, v in tensors.items()})
    assert set(back) == set(params) and got is not None and got.t == state.t
    for k in params:
        np.testing.assert_array_equal(got.m[k], state.m[k])
        np.testing.assert_array_equal(got.v[k], state.v[k])
    assert split_adam_state(params) == (params, None)
    with pytest.raises(ConfigError, match="ring_adam"):
        PFFConfig(ring_adam="sometimes")


def test_a_ring_part_continues_adam_from_its_predecessor_and_the_last_part_publishes_no_state() -> None:
    from fwdfleet.pff.chapter import continues_adam, hands_adam_on

    ring = [t for t in PFFConfig(mode="federated", nodes=3, layers=(64, 8, 8), epochs=2, splits=2).schedule().tasks()
            if t.layer == 1 and t.chapter == 1]
    assert [t.part for t in ring] == [0, 1, 2]
    assert [continues_adam(t, "hand-on") for t in ring] == [False, True, True]
    assert [hands_adam_on(t, "hand-on") for t in ring] == [True, True, False]
    assert not any(continues_adam(t, "restart") or hands_adam_on(t, "restart") for t in ring)


def test_lr_schedule_sets_each_chapters_rate_and_the_nodes_follow_it(capsys: pytest.CaptureFixture[str]) -> None:
    """PFFConfig.lr_schedule: chapter c trains at round_lr(lr, c, splits, schedule), in the node processes
    as in benchmarks/pff_ring_adam.py's in-process run."""
    import sys

    from fwdfleet.lr_schedule import round_lr

    config = PFFConfig(layers=(20, 16), epochs=4, splits=4, lr=0.01, lr_schedule="cosine")
    assert [config.train_config(c).lr for c in range(4)] == [round_lr(0.01, c, 4, "cosine") for c in range(4)]
    assert config.train_config(0).lr == 0.01 and config.train_config(3).lr < 0.002
    assert PFFConfig(layers=(20, 16)).train_config(9).lr == PFFConfig().lr  # constant by default
    with pytest.raises(ConfigError, match="lr_schedule"):
        PFFConfig(lr_schedule="step")  # type: ignore[arg-type]

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.pff_ring_adam import RING, main

    args = ["--dataset", "digits", "--layers", "64,32,32", "--epochs", "2", "--splits", "2", "--max-train", "300",
            "--ring-adam", "hand-on", "--json"]
    rows = {}
    for schedule in ("constant", "linear"):
        assert main([*args, "--lr-schedule", schedule, "--curve"]) == 0
        rows[schedule] = json.loads(capsys.readouterr().out)["rows"][0]
    ring = RING["hand-on"]
    assert set(rows["linear"]) == {"seed", "prediction", "sequential", ring, f"{ring}: points",
                                   "sequential: curve", f"{ring}: curve"}
    for variant in ("sequential", ring):  # test accuracy after each chapter; the last is the final network's
        assert len(rows["linear"][f"{variant}: curve"]) == 2
        assert rows["linear"][f"{variant}: curve"][-1] == rows["linear"][variant]
    base = dict(dataset="digits", layers=(64, 32, 32), epochs=2, splits=2, max_train=300, lr_schedule="linear")
    nodes = run_pff(PFFConfig(mode="federated", nodes=2, **base)).accuracy  # type: ignore[arg-type]
    assert rows["linear"][RING["hand-on"]] == nodes["goodness"]
    assert rows["linear"] != rows["constant"]  # the second chapter's halved rate changes the result
