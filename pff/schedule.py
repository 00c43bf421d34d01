"""Who trains which layer in which chapter, and what each piece of work waits for.

Pipeline Forward-Forward (Aktemur et al., arXiv 2404.08573) divides ``E`` epochs of training into
``S`` *chapters* (splits) of ``E / S`` epochs. A *task* is one layer trained for one chapter.
Task ``(layer l, chapter c)`` starts from version ``c`` of layer ``l`` (version 0 is the bundle's
initial values), trains on the output of the layers below at version ``c + 1`` (what they became
after chapter ``c``) and publishes version ``c + 1`` of layer ``l``. So its dependencies are::

    (l, c)  and  (j, c + 1) for every j < l

These are the same whoever runs the task, so every mode computes the same network as the
sequential run when the data are the same: the pipeline changes *when* work happens, not *what*.

Modes (``owner(layer, chapter)``):

* ``sequential``: one node runs every task, chapter by chapter, layer by layer;
* ``single-layer``: node ``i`` owns layer ``i`` (with fewer nodes than layers, contiguous blocks
  of layers: node ``i`` owns layers ``[i L / N, (i + 1) L / N)``);
* ``all-layers``: chapter ``c`` of every layer belongs to node ``c mod N``: each node trains the
  whole network for its chapters, round-robin, so the load is balanced;
* ``federated``: every node holds its own data shard and never sees another's. A chapter of a
  layer is a *ring*: node 0 trains the layer for ``E / S`` epochs on shard 0 and publishes it,
  node 1 picks it up and trains it on shard 1, ..., node ``N - 1`` publishes the chapter's
  version. So every chapter of every layer sees all the data once per epoch, as in sequential
  FF, and only parameters move between nodes. A task is then a *part* ``p`` of a chapter (node
  ``p``): layer versions count parts (``chapter * N + part``), and the layers below are needed at
  the end of their chapter (version ``(chapter + 1) N``).

Why a ring and not FedAvg (every node trains the layer on its shard in parallel, the store
averages the copies): with the same epochs, FedAvg gives each copy 1/N of the optimizer steps
and averaging does not make up for them (Fashion-MNIST, 784-400x4, 6,000 images, 10 epochs,
2 nodes, in-process: FedAvg 76.5%, ring 79.6%, sequential 80.1%). The ring takes the same steps
on the same data as sequential FF, only the order of the samples within a chapter differs (shard
by shard). The nodes still work in parallel because different layers' rings overlap: while node
1 trains layer 0 on shard 1, node 0 trains layer 1 of the previous chapter on shard 0.

A node runs its tasks in (chapter, layer) order; federated nodes in (chapter + layer, layer)
order, so that the rings of consecutive layers interleave (in (chapter, layer) order node 0
would wait for node 1 at every layer). Every dependency of a task comes earlier in that order
(both are topological orders), so the nodes can never wait on each other in a cycle.
:func:`simulate` plays a schedule with given task durations (the projection to more nodes than
the machine has).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Mode = Literal["sequential", "single-layer", "all-layers", "federated"]
MODES: tuple[Mode, ...] = ("sequential", "single-layer", "all-layers", "federated")


@dataclass(frozen=True, order=True)
class Task:
    """Part ``part`` of ``parts`` of layer ``layer``'s chapter ``chapter``, run by node ``node``.

    Version ``chapter * parts + part`` -> ``+ 1``; ``parts`` is 1 except in federated mode (one part per node).
    """

    chapter: int
    layer: int
    node: int
    part: int = 0
    parts: int = 1

    @property
    def version_in(self) -> int:
        return self.chapter * self.parts + self.part

    @property
    def version_out(self) -> int:
        return self.version_in + 1

    @property
    def lower_version(self) -> int:
        """The version of the layers below that this task trains on: theirs at the end of this chapter."""
        return (self.chapter + 1) * self.parts


@dataclass(frozen=True)
class Schedule:
    mode: Mode
    num_layers: int
    num_nodes: int
    splits: int
    epochs: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Schedule.mode must be one of {MODES}, got {self.mode!r}")
        if self.num_layers < 1:
            raise ValueError(f"Schedule.num_layers must be >= 1, got {self.num_layers}")
        if self.num_nodes < 1:
            raise ValueError(f"Schedule.num_nodes must be >= 1, got {self.num_nodes}")
        if self.mode == "sequential" and self.num_nodes != 1:
            raise ValueError(f"Schedule.num_nodes must be 1 in sequential mode, got {self.num_nodes}")
        if self.mode == "single-layer" and self.num_nodes > self.num_layers:
            raise ValueError(
                f"Schedule.num_nodes ({self.num_nodes}) exceeds the number of layers ({self.num_layers}) in "
                "single-layer mode: a node would have no layer; use fewer nodes or --mode all-layers"
            )
        if self.splits < 1:
            raise ValueError(f"Schedule.splits must be >= 1, got {self.splits}")
        if self.epochs < 1 or self.epochs % self.splits:
            raise ValueError(
                f"Schedule.epochs ({self.epochs}) must be a positive multiple of splits ({self.splits}): "
                "each chapter trains epochs / splits epochs"
            )

    @property
    def chapter_epochs(self) -> int:
        return self.epochs // self.splits

    @property
    def parts(self) -> int:
        """Tasks per chapter of a layer: one per node in federated mode (the ring), else 1."""
        return self.num_nodes if self.mode == "federated" else 1

    @property
    def final_version(self) -> int:
        """Every layer's version at the end of the run."""
        return self.splits * self.parts

    def owner(self, layer: int, chapter: int, part: int = 0) -> int:
        """The node that trains part ``part`` of ``layer``'s chapter ``chapter``."""
        if not (0 <= layer < self.num_layers and 0 <= chapter < self.splits and 0 <= part < self.parts):
            raise ValueError(f"no task (layer {layer}, chapter {chapter}, part {part}) in a {self.num_layers}-layer, "
                             f"{self.splits}-chapter, {self.parts}-part schedule")
        if self.mode == "sequential":
            return 0
        if self.mode == "single-layer":
            return layer * self.num_nodes // self.num_layers
        if self.mode == "federated":
            return part  # node p holds shard p
        return chapter % self.num_nodes

    def tasks(self) -> tuple[Task, ...]:
        """Every task, in an order that respects the dependencies (chapter-major)."""
        return tuple(Task(c, layer, self.owner(layer, c, p), p, self.parts) for c in range(self.splits)
                     for layer in range(self.num_layers) for p in range(self.parts))

    def node_tasks(self, node: int) -> tuple[Task, ...]:
        """Node ``node``'s tasks in the order it runs them (see the module docstring)."""
        if not 0 <= node < self.num_nodes:
            raise ValueError(f"node {node} is out of range for {self.num_nodes} nodes")
        mine = [t for t in self.tasks() if t.node == node]
        if self.mode == "federated":
            mine.sort(key=lambda t: (t.chapter + t.layer, t.layer, t.part))
        return tuple(mine)

    def data_shard(self, node: int) -> int | None:
        """The data shard node ``node`` trains on (federated), or None: the whole training set."""
        return node if self.mode == "federated" else None

    @property
    def num_shards(self) -> int:
        return self.num_nodes if self.mode == "federated" else 1


def dependencies(task: Task) -> tuple[tuple[int, int], ...]:
    """The (layer, version) pairs ``task`` needs: its own layer's input version and the chapter's layers below."""
    return ((task.layer, task.version_in), *((j, task.lower_version) for j in range(task.layer)))


@dataclass(frozen=True)
class SimulatedTask:
    task: Task
    start: float
    end: float


def simulate(schedule: Schedule, seconds: Callable[[Task], float], *, latency: float = 0.0) -> list[SimulatedTask]:
    """Play ``schedule`` with task durations ``seconds(task)``: each node runs its tasks in order, a task
    starts when its node is free and ``latency`` after its last dependency was published."""
    done: dict[tuple[int, int], float] = {(layer, 0): 0.0 for layer in range(schedule.num_layers)}
    free = [0.0] * schedule.num_nodes
    queues = [list(schedule.node_tasks(n)) for n in range(schedule.num_nodes)]
    out: list[SimulatedTask] = []
    while any(queues):
        progressed = False
        for n, queue in enumerate(queues):
            while queue and all(d in done for d in dependencies(queue[0])):
                task = queue.pop(0)
                ready = max((done[d] + (latency if d[1] > 0 else 0.0) for d in dependencies(task)), default=0.0)
                start = max(free[n], ready)
                end = start + seconds(task)
                free[n] = end
                done[(task.layer, task.version_out)] = end
                out.append(SimulatedTask(task, start, end))
                progressed = True
        if not progressed:  # cannot happen for the modes above (see the module docstring)
            raise RuntimeError("the schedule deadlocks: a node waits on a task that comes later in its own order")
    return sorted(out, key=lambda s: (s.start, s.task))


def makespan(simulated: list[SimulatedTask]) -> float:
    return max((s.end for s in simulated), default=0.0)
