"""Export a block-wise CNN trained by Scalable Forward-Forward (SFF) as a bundle of kind ``ff_cnn``.

The network (SFF, arXiv 2501.03176)
-----------------------------------
An image ``x`` (batch, C, H, W) passes through blocks; each block is local: its loss never
sends a gradient into the previous block. Block kinds (:class:`BlockSpec`):

* ``conv``: 3x3 convolution (no bias) -> batch norm -> ReLU -> optional 2x2 max pool;
* ``residual``: conv-BN-ReLU -> conv-BN, plus the input (a 1x1 conv-BN when the channel
  count changes), -> ReLU -> optional 2x2 max pool (ResNet basic block).

After every block sits its auxiliary head, a 1x1 convolution from the block's channels to one
channel per class (``heads.i.weight``, ``heads.i.bias``). The class goodness of class ``c`` is
the spatial mean of the squared projected activation, ``g_c = mean_hw(z_c ** 2)``, and the
block's loss is SFF's log-sum-exp loss ``logsumexp_c(g_c) - g_label`` (no negative data).
Batch norm sits inside the block; its running statistics are **state** that the device carries
and updates (graph inputs and outputs, ``state.npz``), not trainables.

Graph contract
--------------
``block_i`` (``block_i.onnx``): inputs ``x`` float32 (batch, C_i, H_i, W_i) (the input image, or
the previous block's ``h``), ``labels`` int64 (batch,), the block's trainables and its BN state
(``blocks.i.<bn>.running_mean`` / ``running_var``). Batch norm uses the batch's statistics
(training mode). Outputs ``h`` (the block output), ``class_goodness`` (batch, classes), ``loss``
(batch,) per sample, and ``new.<state name>`` for each running statistic (momentum update).
Perturbed inference of this graph trains the block on inference-only hardware.

``grad_i`` (``grad_i.onnx``): the **block-local gradient graph**, same inputs as ``block_i``;
outputs ``grad.<name>`` for each of the block's trainables (the gradient of the batch-mean loss),
``loss`` (scalar, the batch mean), ``h`` and the ``new.<state>`` tensors. It holds inference
operators only (Conv, ConvTranspose, ReduceMean, Where, ...): see :func:`_conv` for how.

``model`` (``model.onnx``): inputs ``x`` (batch, C, H, W), ``labels``, every trainable and every
state tensor; batch norm uses the running statistics (inference mode). Outputs ``logits`` (the
sum of every head's class goodness), ``logits_last`` (the last head's) and ``loss`` (batch,) =
cross-entropy of ``logits``.

How the gradient graph is made
------------------------------
The block's loss is written with torch functions; ``torch.func.grad_and_value`` differentiates
it and ``make_fx`` traces forward and backward together into one graph of aten ops, which the
dynamo exporter (``torch.onnx.export(..., dynamo=True)``) translates to ONNX. The trace would
contain ``aten.convolution_backward``, which has no ONNX translation, so convolutions go through
:class:`_Conv2d`, an autograd function whose backward is written with forward operators: the
input gradient is ``conv_transpose2d`` of the output gradient with the same weights, the weight
gradient a ``conv2d`` of the input (channels and batch swapped) with the output gradient as the
kernel, the bias gradient a sum. Batch norm is written out (mean, variance, scale) and max
pooling is a reshape and ``amax``, so their backward passes are elementwise operators too. At
export every graph is checked against torch (``F.conv2d``, ``F.batch_norm``, ``F.max_pool2d``,
and ``torch.autograd`` for the gradients) at another batch size than the traced one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fwdfleet.bundle import GraphSpec, TensorSpec
from fwdfleet.errors import ExportError
from fwdfleet.export.kinds import Built, ExportKind, ManifestExtras, Sample, perturbed

BlockKind = Literal["conv", "residual"]
BLOCK_KINDS: tuple[BlockKind, ...] = ("conv", "residual")
STATE_FILE = "state.npz"
MIN_OPSET, MAX_OPSET = 18, 23


@dataclass(frozen=True)
class BlockSpec:
    """One block: its kind, input and output channels, and whether a 2x2 max pool ends it."""

    kind: BlockKind
    in_channels: int
    out_channels: int
    pool: bool = True

    def __post_init__(self) -> None:
        if self.kind not in BLOCK_KINDS:
            raise ValueError(f"BlockSpec.kind must be one of {BLOCK_KINDS}, got {self.kind!r}")
        for name in ("in_channels", "out_channels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"BlockSpec.{name} must be >= 1, got {getattr(self, name)}")

    def text(self) -> str:
        return f"{self.kind}:{self.in_channels}:{self.out_channels}{':pool' if self.pool else ''}"

    @classmethod
    def parse(cls, text: str) -> BlockSpec:
        """``kind:in:out[:pool]``, e.g. ``conv:1:16:pool`` or ``residual:32:32``."""
        parts = text.strip().split(":")
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "pool"):
            raise ValueError(f"a block is kind:in_channels:out_channels[:pool] (e.g. conv:1:16:pool), got {text!r}")
        try:
            cin, cout = int(parts[1]), int(parts[2])
        except ValueError as e:
            raise ValueError(f"block {text!r}: in_channels and out_channels must be integers") from e
        return cls(parts[0], cin, cout, len(parts) == 4)  # type: ignore[arg-type]  # checked in __post_init__


def parse_blocks(text: str) -> tuple[BlockSpec, ...]:
    """Comma-separated :meth:`BlockSpec.parse` entries."""
    return tuple(BlockSpec.parse(part) for part in text.split(",") if part.strip())


DEFAULT_BLOCKS = (BlockSpec("conv", 1, 16), BlockSpec("conv", 16, 32), BlockSpec("residual", 32, 32, pool=False))


@dataclass(frozen=True)
class FFCNNConfig:
    """What to export: the image shape, the blocks (each input channel count the previous output's)."""

    blocks: tuple[BlockSpec, ...] = DEFAULT_BLOCKS
    in_channels: int = 1
    image_size: tuple[int, int] = (28, 28)
    num_classes: int = 10
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    opset: int = 18
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("FFCNNConfig.blocks must hold at least one block")
        if self.in_channels < 1:
            raise ValueError(f"FFCNNConfig.in_channels must be >= 1, got {self.in_channels}")
        if len(self.image_size) != 2 or any(int(s) < 1 for s in self.image_size):
            raise ValueError(f"FFCNNConfig.image_size must be (height, width) >= 1, got {self.image_size}")
        if self.num_classes < 2:
            raise ValueError(f"FFCNNConfig.num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"FFCNNConfig.bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if not self.bn_eps > 0:
            raise ValueError(f"FFCNNConfig.bn_eps must be positive, got {self.bn_eps}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(f"FFCNNConfig.opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {self.opset}")
        channels = self.in_channels
        h, w = self.image_size
        for i, b in enumerate(self.blocks):
            if not isinstance(b, BlockSpec):
                raise ValueError(f"FFCNNConfig.blocks[{i}] must be a BlockSpec, got {type(b).__name__}")
            if b.in_channels != channels:
                what = "FFCNNConfig.in_channels" if i == 0 else f"blocks[{i - 1}].out_channels"
                raise ValueError(f"FFCNNConfig.blocks[{i}].in_channels is {b.in_channels} but {what} is {channels}: "
                                 "the blocks do not chain; make each block take the previous block's channels")
            if b.pool:
                if h % 2 or w % 2:
                    raise ValueError(f"FFCNNConfig.blocks[{i}].pool: the block's input is {h}x{w}, which a 2x2 "
                                     "max pool cannot halve; drop the pool or change image_size")
                h, w = h // 2, w // 2
            channels = b.out_channels

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def input_shape(self, i: int) -> tuple[int, int, int]:
        """(channels, height, width) of block ``i``'s input; ``i == num_blocks``: the last output."""
        h, w = self.image_size
        c = self.in_channels
        for b in self.blocks[:i]:
            if b.pool:
                h, w = h // 2, w // 2
            c = b.out_channels
        return c, h, w

    def settings(self) -> dict[str, Any]:
        return {
            "blocks": [b.text() for b in self.blocks], "in_channels": self.in_channels,
            "image_size": list(self.image_size), "num_classes": self.num_classes,
            "bn_momentum": self.bn_momentum, "bn_eps": self.bn_eps, "seed": self.seed,
            "state_file": STATE_FILE, "exporter": "dynamo (make_fx of torch.func.grad for grad_i)",
            "goodness": "spatial mean of squared head activation", "loss": "sff_logsumexp",
        }

    @classmethod
    def from_settings(cls, s: Mapping[str, Any]) -> FFCNNConfig:
        return cls(blocks=tuple(BlockSpec.parse(t) for t in s["blocks"]), in_channels=int(s["in_channels"]),
                   image_size=(int(s["image_size"][0]), int(s["image_size"][1])),
                   num_classes=int(s["num_classes"]), bn_momentum=float(s["bn_momentum"]),
                   bn_eps=float(s["bn_eps"]), seed=int(s["seed"]))


# ------------------------------------------------------------------------------- names and shapes


def _convs(b: BlockSpec) -> list[tuple[str, int, int, int]]:
    """(name, in, out, kernel) of the block's convolutions, each followed by a batch norm ``bn<suffix>``."""
    if b.kind == "conv":
        return [("conv1", b.in_channels, b.out_channels, 3)]
    convs = [("conv1", b.in_channels, b.out_channels, 3), ("conv2", b.out_channels, b.out_channels, 3)]
    if b.in_channels != b.out_channels:
        convs.append(("shortcut", b.in_channels, b.out_channels, 1))
    return convs


def _bn(conv: str) -> str:
    return {"conv1": "bn1", "conv2": "bn2", "shortcut": "bn_shortcut"}[conv]


def block_trainable_shapes(config: FFCNNConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Block ``i``'s trainables (its convolutions, batch-norm scales and shifts, its head) in canonical order."""
    out: dict[str, tuple[int, ...]] = {}
    for conv, cin, cout, k in _convs(config.blocks[i]):
        out[f"blocks.{i}.{conv}.weight"] = (cout, cin, k, k)
        out[f"blocks.{i}.{_bn(conv)}.weight"] = (cout,)
        out[f"blocks.{i}.{_bn(conv)}.bias"] = (cout,)
    out[f"heads.{i}.weight"] = (config.num_classes, config.blocks[i].out_channels, 1, 1)
    out[f"heads.{i}.bias"] = (config.num_classes,)
    return out


def block_state_shapes(config: FFCNNConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Block ``i``'s batch-norm running statistics (state, not trainables)."""
    out: dict[str, tuple[int, ...]] = {}
    for conv, _, cout, _ in _convs(config.blocks[i]):
        out[f"blocks.{i}.{_bn(conv)}.running_mean"] = (cout,)
        out[f"blocks.{i}.{_bn(conv)}.running_var"] = (cout,)
    return out


def initial_values(config: FFCNNConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Seeded initial trainables (Kaiming-uniform convolutions, BN scale 1 shift 0) and state (mean 0, var 1)."""
    rng = np.random.default_rng(config.seed)
    trainables: dict[str, np.ndarray] = {}
    state: dict[str, np.ndarray] = {}
    for i in range(config.num_blocks):
        for name, shape in block_trainable_shapes(config, i).items():
            if name.endswith("bn1.weight") or name.endswith("bn2.weight") or name.endswith("bn_shortcut.weight"):
                v = np.ones(shape)
            elif len(shape) == 4:
                bound = 1.0 / math.sqrt(shape[1] * shape[2] * shape[3])
                v = rng.uniform(-bound, bound, shape) * math.sqrt(3.0)
            else:
                v = np.zeros(shape)
            trainables[name] = v.astype(np.float32)
        for name, shape in block_state_shapes(config, i).items():
            state[name] = (np.zeros(shape) if name.endswith("mean") else np.ones(shape)).astype(np.float32)
    return trainables, state


# --------------------------------------------------------------------------------- torch functions


def _make_conv_function() -> Any:
    F = nn.functional

    class _Conv2d(torch.autograd.Function):
        """``conv2d`` (stride 1, no bias) whose backward uses forward operators only (see the module doc)."""

        @staticmethod
        def forward(x: Any, w: Any, padding: int) -> Any:
            return F.conv2d(x, w, padding=padding)

        @staticmethod
        def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
            x, w, padding = inputs
            ctx.save_for_backward(x, w)
            ctx.padding = padding

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            x, w = ctx.saved_tensors
            grad_x = F.conv_transpose2d(grad_out, w, padding=ctx.padding)
            grad_w = F.conv2d(x.transpose(0, 1), grad_out.transpose(0, 1), padding=ctx.padding).transpose(0, 1)
            return grad_x, grad_w, None

    return _Conv2d


class _Ops:
    """The block's building blocks in torch: ``reference=True`` uses torch's own ops (the parity
    reference), ``False`` the export-friendly forms (see the module doc)."""

    def __init__(self, config: FFCNNConfig, reference: bool) -> None:
        self.torch = torch
        self.config = config
        self.reference = reference
        self.conv_fn = None if reference else _make_conv_function()

    def conv(self, x: Any, w: Any) -> Any:
        pad = int(w.shape[-1]) // 2
        if self.reference:
            return self.torch.nn.functional.conv2d(x, w, padding=pad)
        return self.conv_fn.apply(x, w, pad)  # type: ignore[union-attr]

    def bn(self, x: Any, gamma: Any, beta: Any, mean: Any, var: Any, train: bool) -> tuple[Any, Any, Any]:
        c = self.config
        F = self.torch.nn.functional
        if self.reference:
            rm, rv = mean.clone(), var.clone()
            y = F.batch_norm(x, rm, rv, gamma, beta, training=train, momentum=c.bn_momentum, eps=c.bn_eps)
            return y, rm, rv
        if train:
            mu = x.mean(dim=(0, 2, 3))
            d = x - mu[None, :, None, None]
            v = (d * d).mean(dim=(0, 2, 3))
            n = x.shape[0] * x.shape[2] * x.shape[3]
            new_mean = (1 - c.bn_momentum) * mean + c.bn_momentum * mu.detach()
            new_var = (1 - c.bn_momentum) * var + c.bn_momentum * v.detach() * (n / (n - 1))
        else:
            d = x - mean[None, :, None, None]
            v, new_mean, new_var = var, mean, var
        y = d / self.torch.sqrt(v + c.bn_eps)[None, :, None, None] * gamma[None, :, None, None] \
            + beta[None, :, None, None]
        return y, new_mean, new_var

    def pool(self, x: Any) -> Any:
        if self.reference:
            return self.torch.nn.functional.max_pool2d(x, 2)
        n, ch, h, w = x.shape
        return x.reshape(n, ch, h // 2, 2, w // 2, 2).amax(dim=(3, 5))

    def block(self, i: int, p: Mapping[str, Any], s: Mapping[str, Any], x: Any,
              train: bool) -> tuple[Any, dict[str, Any]]:
        """Block ``i`` on ``x``: its output and its updated state (full names)."""
        b = self.config.blocks[i]
        new: dict[str, Any] = {}

        def cbn(conv: str, inp: Any) -> Any:
            pre, bn = f"blocks.{i}.{conv}", f"blocks.{i}.{_bn(conv)}"
            y, new[f"{bn}.running_mean"], new[f"{bn}.running_var"] = self.bn(
                self.conv(inp, p[f"{pre}.weight"]), p[f"{bn}.weight"], p[f"{bn}.bias"],
                s[f"{bn}.running_mean"], s[f"{bn}.running_var"], train)
            return y

        relu = self.torch.relu
        if b.kind == "conv":
            h = relu(cbn("conv1", x))
        else:
            y = cbn("conv2", relu(cbn("conv1", x)))
            skip = cbn("shortcut", x) if b.in_channels != b.out_channels else x
            h = relu(y + skip)
        if b.pool:
            h = self.pool(h)
        return h, new

    def class_goodness(self, i: int, p: Mapping[str, Any], h: Any) -> Any:
        z = self.conv(h, p[f"heads.{i}.weight"]) + p[f"heads.{i}.bias"][None, :, None, None]
        return (z * z).mean(dim=(2, 3))

    def sff_loss(self, g: Any, labels: Any) -> Any:
        """Per-sample ``logsumexp(g) - g[label]``."""
        torch = self.torch
        if self.reference:
            return torch.nn.functional.cross_entropy(g, labels, reduction="none")
        onehot = (labels[:, None] == torch.arange(g.shape[1])[None, :]).to(g.dtype)
        return torch.logsumexp(g, 1) - (g * onehot).sum(1)


# --------------------------------------------------------------------------------------- graphs


def _names(config: FFCNNConfig, i: int) -> tuple[list[str], list[str]]:
    return list(block_trainable_shapes(config, i)), list(block_state_shapes(config, i))


def graph_specs(config: FFCNNConfig) -> tuple[GraphSpec, ...]:
    """The ``model`` graph, then ``block_i`` and ``grad_i`` for every block."""
    nc = config.num_classes
    all_t = [n for i in range(config.num_blocks) for n in block_trainable_shapes(config, i)]
    shapes = {k: v for i in range(config.num_blocks) for k, v in
              {**block_trainable_shapes(config, i), **block_state_shapes(config, i)}.items()}
    all_s = [n for i in range(config.num_blocks) for n in block_state_shapes(config, i)]

    def t(name: str) -> TensorSpec:
        return TensorSpec(name, shapes[name])

    labels = TensorSpec("labels", ("batch",), "int64")
    specs = [GraphSpec(
        "model", "model.onnx",
        (TensorSpec("x", ("batch", *config.input_shape(0))), labels, *(t(n) for n in all_t), *(t(n) for n in all_s)),
        (TensorSpec("logits", ("batch", nc)), TensorSpec("logits_last", ("batch", nc)),
         TensorSpec("loss", ("batch",))), tuple(all_t))]
    for i in range(config.num_blocks):
        tn, sn = _names(config, i)
        inputs = (TensorSpec("x", ("batch", *config.input_shape(i))), labels, *(t(n) for n in tn), *(t(n) for n in sn))
        h = TensorSpec("h", ("batch", *config.input_shape(i + 1)))
        new = tuple(TensorSpec(f"new.{n}", shapes[n]) for n in sn)
        specs.append(GraphSpec(f"block_{i}", f"block_{i}.onnx", inputs,
                               (h, TensorSpec("class_goodness", ("batch", nc)), TensorSpec("loss", ("batch",)), *new),
                               tuple(tn)))
        specs.append(GraphSpec(f"grad_{i}", f"grad_{i}.onnx", inputs,
                               (*(TensorSpec(f"grad.{n}", shapes[n]) for n in tn), TensorSpec("loss", ()), h, *new),
                               tuple(tn)))
    return tuple(specs)


def _graph_function(config: FFCNNConfig, spec: GraphSpec, ops: _Ops) -> Callable[..., tuple[Any, ...]]:
    """The computation of graph ``spec`` as a function of its inputs in order (export forms or reference)."""
    torch = ops.torch
    names = [t.name for t in spec.inputs]

    if spec.name == "model":
        def model(*args: Any) -> tuple[Any, ...]:
            f = dict(zip(names, args, strict=True))
            h = f["x"]
            scores = []
            for i in range(config.num_blocks):
                h, _ = ops.block(i, f, f, h, train=False)
                scores.append(ops.class_goodness(i, f, h))
            total = sum(scores[1:], scores[0])
            return total, scores[-1], ops.sff_loss(total, f["labels"])
        return model

    i = int(spec.name.split("_")[1])
    tn, sn = _names(config, i)

    def forward(*args: Any) -> tuple[Any, ...]:
        f = dict(zip(names, args, strict=True))
        h, new = ops.block(i, f, f, f["x"], train=True)
        g = ops.class_goodness(i, f, h)
        return (h, g, ops.sff_loss(g, f["labels"]), *(new[n] for n in sn))

    if spec.name.startswith("block_"):
        return forward

    if ops.reference:
        def reference_grad(*args: Any) -> tuple[Any, ...]:
            f = dict(zip(names, args, strict=True))
            params = {n: f[n].detach().clone().requires_grad_(True) for n in tn}
            h, new = ops.block(i, {**f, **params}, f, f["x"], train=True)
            loss = ops.sff_loss(ops.class_goodness(i, {**f, **params}, h), f["labels"]).mean()
            grads = torch.autograd.grad(loss, [params[n] for n in tn])
            return (*grads, loss.detach(), h.detach(), *(new[n] for n in sn))
        return reference_grad

    def local_loss(params: dict[str, Any], f: dict[str, Any]) -> tuple[Any, tuple[Any, ...]]:
        h, new = ops.block(i, {**f, **params}, f, f["x"], train=True)
        loss = ops.sff_loss(ops.class_goodness(i, {**f, **params}, h), f["labels"]).mean()
        return loss, (loss.detach(), h.detach(), *(new[n] for n in sn))

    def grad(*args: Any) -> tuple[Any, ...]:
        f = dict(zip(names, args, strict=True))
        grads, (_, aux) = torch.func.grad_and_value(local_loss, has_aux=True)({n: f[n] for n in tn}, f)
        return (*(grads[n] for n in tn), *aux)
    return grad


def _export_graph(config: FFCNNConfig, spec: GraphSpec, example: Sequence[Any], path: Path) -> None:
    """Trace the graph's function (symbolic batch) with ``make_fx`` and export it with the dynamo exporter."""
    from torch.fx.experimental.proxy_tensor import make_fx

    fn = _graph_function(config, spec, _Ops(config, reference=False))
    traced = make_fx(fn, tracing_mode="symbolic")(*example)

    class Graph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.traced = traced

        def forward(self, *args: Any) -> Any:
            return self.traced(*args)

    batch = torch.export.Dim("batch", min=2)
    dynamic = tuple({0: batch} if t.shape and t.shape[0] == "batch" else None for t in spec.inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Graph(), tuple(example), dynamo=True, dynamic_shapes=(dynamic,),
                                    input_names=[t.name for t in spec.inputs],
                                    output_names=[t.name for t in spec.outputs], opset_version=config.opset,
                                    external_data=False, verbose=False)
    if program is None:
        raise ExportError(f"the dynamo exporter returned no program for graph {spec.name!r}")
    program.save(str(path), external_data=False)


def _example(config: FFCNNConfig, spec: GraphSpec, values: Mapping[str, np.ndarray], batch: int,
             seed: int) -> dict[str, np.ndarray]:
    """Feeds for ``spec``: random images or activations, labels, and ``values`` for the rest."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        if t.name == "labels":
            feeds[t.name] = rng.integers(0, config.num_classes, batch).astype(np.int64)
        elif t.name == "x":
            x = rng.standard_normal((batch, *(int(d) for d in t.shape[1:])))
            feeds[t.name] = (np.maximum(x, 0) if spec.name != "model" and not spec.name.endswith("_0") else x
                             ).astype(np.float32)
        else:
            feeds[t.name] = values[t.name]
    return feeds


class FFCNNKind(ExportKind[FFCNNConfig]):
    name = "ff_cnn"
    config_type = FFCNNConfig
    rtol = 1e-3
    atol = 2e-4

    def build(self, config: FFCNNConfig, work: Path) -> Built:
        trainables, state = initial_values(config)
        values = {**trainables, **state}
        specs = graph_specs(config)
        for spec in specs:
            feeds = _example(config, spec, values, 4, config.seed + 11)
            _export_graph(config, spec, [torch.from_numpy(v) for v in feeds.values()], work / spec.file)
        np.savez(work / STATE_FILE, **state)  # type: ignore[arg-type]
        return Built(specs, trainables, config.opset, state=state)

    def samples(self, config: FFCNNConfig, built: Built) -> Sequence[Sample]:
        """Every graph at batch 5 (traced at 4), with perturbed trainables and non-trivial statistics."""
        values = perturbed(built.initial, 0.05, config.seed + 2)
        rng = np.random.default_rng(config.seed + 3)
        state = {k: (v + 0.1 * np.abs(rng.standard_normal(v.shape))).astype(np.float32)
                 for k, v in built.state.items()}
        return [Sample(s.name, _example(config, s, {**values, **state}, 5, config.seed + 1 + j))
                for j, s in enumerate(built.graphs)]

    def reference(self, config: FFCNNConfig, built: Built, sample: Sample) -> Sequence[np.ndarray]:
        spec = next(g for g in built.graphs if g.name == sample.graph)
        fn = _graph_function(config, spec, _Ops(config, reference=True))
        args = [torch.from_numpy(np.asarray(sample.feeds[t.name])) for t in spec.inputs]
        if spec.name.startswith("grad_"):
            out = fn(*args)
        else:
            with torch.no_grad():
                out = fn(*args)
        return [o.detach().numpy() for o in out]

    def manifest_extras(self, config: FFCNNConfig, built: Built) -> ManifestExtras:
        settings = {**config.settings(), "state": {k: list(v.shape) for k, v in built.state.items()}}
        return ManifestExtras(labels=tuple(str(c) for c in range(config.num_classes)), settings=settings)


KIND = FFCNNKind()


def torch_network(config: FFCNNConfig, trainables: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]) -> Any:
    """The same blocks as a ``torch.nn.Module`` for end-to-end backprop: ``forward(x)`` returns
    ``(features, head_scores)``: the last block's output and the sum of the heads' class goodness.
    Batch norm layers are ``nn.BatchNorm2d`` with the bundle's statistics loaded."""
    class Block(nn.Module):
        def __init__(self, b: BlockSpec) -> None:
            super().__init__()
            self.spec = b
            for conv, cin, cout, k in _convs(b):
                setattr(self, conv, nn.Conv2d(cin, cout, k, padding=k // 2, bias=False))
                setattr(self, _bn(conv), nn.BatchNorm2d(cout, eps=config.bn_eps, momentum=config.bn_momentum))

        def forward(self, x: Any) -> Any:
            m: Any = self  # convolutions and batch norms set by name above
            if self.spec.kind == "conv":
                h = torch.relu(m.bn1(m.conv1(x)))
            else:
                y = m.bn2(m.conv2(torch.relu(m.bn1(m.conv1(x)))))
                h = torch.relu(y + (m.bn_shortcut(m.shortcut(x)) if hasattr(self, "shortcut") else x))
            return nn.functional.max_pool2d(h, 2) if self.spec.pool else h

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block(b) for b in config.blocks)
            self.heads = nn.ModuleList(nn.Conv2d(b.out_channels, config.num_classes, 1) for b in config.blocks)

        def forward(self, x: Any) -> tuple[Any, Any]:
            total = None
            for block, head in zip(self.blocks, self.heads, strict=True):
                x = block(x)
                g = (head(x) ** 2).mean(dim=(2, 3))
                total = g if total is None else total + g
            return x, total

    net = Net()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in {**trainables, **state}.items()}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise ExportError(f"torch network and bundle disagree: missing {missing}, unexpected {unexpected}")
    return net


def export_ff_cnn(config: FFCNNConfig, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the bundle (``model``, ``block_i``, ``grad_i`` graphs, trainables, state, manifest)."""
    return KIND.export(config, out_dir, overwrite=overwrite).bundle.path
