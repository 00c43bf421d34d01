"""Text generation with a causal-LM bundle and its current trainables: see what fine-tuning changed.

The bundle's graph is an inference graph over a whole sequence, so each new token re-runs the
sequence so far (no KV cache): fine for trying a model, slow for long outputs. The next-token
scores come from the graph's ``next_token_logits`` output (prompted-classification bundles, whose
LM head runs at the last position only) or from ``logits`` at the last real token (language-model
bundles). Inputs a bundle needs only for its loss (``labels``, ``loss_mask``) get zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fwdfleet.bundle import Bundle
from fwdfleet.device_runtime.data import load_tokenizer, pad_right
from fwdfleet.device_runtime.session import BundleSession
from fwdfleet.errors import DataError

EOS_TOKENS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # sample among the k most likely tokens (0: all); only with temperature > 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"GenerationSettings.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError("GenerationSettings.temperature and top_k must be >= 0")


def _next_scores(session: BundleSession, trainables: Mapping[str, npt.NDArray[Any]], ids: list[int],
                 width: int, pad_id: int) -> npt.NDArray[np.float32]:
    feeds: dict[str, npt.NDArray[Any]] = dict(pad_right([ids], width, pad_id))
    for t in session.graph.data_inputs:
        if t.name not in feeds:  # labels, loss_mask: only the loss reads them
            shape = tuple(1 if d == "batch" or i == 0 else width for i, d in enumerate(t.shape))
            feeds[t.name] = np.zeros(shape, dtype=np.dtype(t.dtype))
    outputs = {o.name for o in session.graph.outputs}
    if "next_token_logits" in outputs:
        return np.asarray(session.run(trainables, feeds, ("next_token_logits",))["next_token_logits"][0])
    return np.asarray(session.run(trainables, feeds, ("logits",))["logits"][0, len(ids) - 1])


def generate(bundle: Bundle, prompt: str, settings: GenerationSettings | None = None, *,
             trainables: Mapping[str, npt.NDArray[Any]] | None = None,
             session: BundleSession | None = None) -> str:
    """The continuation of ``prompt`` (greedy, or sampled with ``temperature``/``top_k``)."""
    s = settings or GenerationSettings()
    if bundle.manifest.kind != "causal_lm_lora":
        raise DataError(f"bundle kind {bundle.manifest.kind!r} does not generate text; use a causal-lm bundle")
    tok = load_tokenizer(bundle)
    tok.no_padding()
    tok.no_truncation()
    spec = bundle.manifest.tokenizer
    max_length = spec.max_length if spec is not None else 0
    seq_dim = next(t for t in bundle.manifest.graph("model").data_inputs if t.name == "input_ids").shape[1]
    limit = seq_dim if isinstance(seq_dim, int) else max_length
    ids = list(tok.encode(prompt).ids)
    if len(ids) >= limit:
        raise DataError(f"the prompt is {len(ids)} tokens but the bundle's sequence length is {limit}: shorten "
                        "the prompt or export the bundle with a longer --max-length")
    session = session or BundleSession(bundle)
    values = trainables if trainables is not None else bundle.load_trainables()
    pad = bundle.manifest.settings.get("pad_token_id", 0)
    pad_id = int(pad) if isinstance(pad, int) else 0
    eos = {i for i in (tok.token_to_id(t) for t in EOS_TOKENS) if i is not None}
    rng = np.random.default_rng(s.seed)
    new: list[int] = []
    for _ in range(min(s.max_new_tokens, limit - len(ids))):
        scores = _next_scores(session, values, ids + new, seq_dim if isinstance(seq_dim, int) else len(ids) + len(new),
                              pad_id).astype(np.float64)
        if s.temperature == 0:
            token = int(np.argmax(scores))
        else:
            if s.top_k:
                cut = np.partition(scores, -s.top_k)[-s.top_k]
                scores = np.where(scores >= cut, scores, -np.inf)
            p = np.exp((scores - scores.max()) / s.temperature)
            token = int(rng.choice(len(p), p=p / p.sum()))
        if token in eos:
            break
        new.append(token)
    return str(tok.decode(new))
