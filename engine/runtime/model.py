"""The llama-family decoder, as one forward pass over a backend.

`Transformer.forward` takes a batch of sequence segments (each: its KV cache,
the new tokens and the position of the first), concatenates their tokens for
every weight GEMM, and runs attention per segment against that segment's own
cache. Prefill (a whole prompt), decode (one token) and a mix of both in one
step are the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from backends.base import Backend, TensorData
from engine.errors import ModelFormatError
from engine.memory.kv_cache import SequenceKV
from engine.memory.paged import PagedKV, PagedStep
from engine.model.gguf_file import ModelConfig, ModelFile


@dataclass
class LayerWeights:
    attn_norm: Any
    wqkv: Any  # q, k and v projections fused along the output axis
    wo: Any
    ffn_norm: Any
    w_gate_up: Any  # gate and up projections fused: [gate | up]
    w_down: Any


@dataclass
class Weights:
    embedding: Any
    layers: list[LayerWeights]
    output_norm: Any
    output: Any


def load_weights(model: ModelFile, config: ModelConfig, backend: Backend, fmt: str) -> Weights:
    """Hand every tensor of the file to the backend in the plan's weight format."""
    backend.check_weight_format(fmt)

    def tensor(name: str) -> TensorData:
        info = model.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{model.path}: tensor {name!r} is missing")
        return TensorData(model.raw(name), info.type, info.shape)

    layers = []
    for i in range(config.n_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=backend.load_vector(tensor(p + "attn_norm.weight")),
            wqkv=backend.load_linear([tensor(p + "attn_q.weight"), tensor(p + "attn_k.weight"),
                                      tensor(p + "attn_v.weight")], fmt),
            wo=backend.load_linear([tensor(p + "attn_output.weight")], fmt),
            ffn_norm=backend.load_vector(tensor(p + "ffn_norm.weight")),
            w_gate_up=backend.load_linear([tensor(p + "ffn_gate.weight"), tensor(p + "ffn_up.weight")], fmt),
            w_down=backend.load_linear([tensor(p + "ffn_down.weight")], fmt),
        ))
    embedding = backend.load_embedding(tensor("token_embd.weight"))
    output = (backend.tied_output(embedding) if config.tied_output
              else backend.load_linear([tensor("output.weight")], fmt))
    return Weights(embedding, layers, backend.load_vector(tensor("output_norm.weight")), output)


@dataclass
class Segment:
    """New tokens of one sequence in a forward step."""

    kv: SequenceKV
    tokens: np.ndarray  # (n,) int token ids
    start: int  # position of tokens[0]; the cache must hold positions 0..start-1
    logits: str = "last"  # "last" (generation), "all" (scoring) or "none" (a prompt chunk before its end)


def _paged_step(segments: Sequence[Segment]) -> PagedStep | None:
    """The step's one scatter and the decoders' block tables, when every segment pages one arena.

    Sequences decoding one token (two or more) get their attention in one batched call over
    the arena; under a batch-invariant plan that is still each sequence's own computation
    (the backend contract's `decode_attention` guarantee)."""
    kvs = [s.kv for s in segments]
    if not all(isinstance(kv, PagedKV) and kv.arena is kvs[0].arena for kv in kvs):
        return None
    decoders = [i for i, s in enumerate(segments) if len(s.tokens) == 1]
    return PagedStep(kvs, [s.start for s in segments], [len(s.tokens) for s in segments],
                     decoders if len(decoders) >= 2 else [])


class Transformer:
    def __init__(self, config: ModelConfig, weights: Weights, backend: Backend):
        self.config = config
        self.weights = weights
        self.backend = backend
        backend.configure_rope(config.rope_dim, config.rope_theta, config.rope_style, config.context_length)

    def new_kv(self, capacity: int) -> SequenceKV:
        c = self.config
        if getattr(self.backend, "resident", False):  # a device backend keeps the cache beside its weights
            return self.backend.new_kv(c.n_layers, c.n_kv_heads, c.head_dim, capacity)
        return SequenceKV(c.n_layers, c.n_kv_heads, c.head_dim, capacity)

    def forward(self, segments: Sequence[Segment]) -> list[np.ndarray]:
        """Run new tokens through the model, extend each segment's cache, return logits.

        Returns per segment float32 logits: (n, vocab) for "all", (1, vocab) for "last",
        (0, vocab) for "none".
        """
        c, be, w = self.config, self.backend, self.weights
        xp = getattr(be, "xp", np)  # the backend's array module: numpy, or cupy when device-resident
        q_dim, kv_dim = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        tokens = np.concatenate([s.tokens for s in segments])
        positions = np.concatenate([np.arange(s.start, s.start + len(s.tokens)) for s in segments])
        bounds = np.cumsum([0] + [len(s.tokens) for s in segments])

        paged = _paged_step(segments) if xp is np else None
        decoders = paged.lengths.size if paged is not None else 0
        dec_rows = bounds[:-1][[len(s.tokens) == 1 for s in segments]] if decoders else None
        # the rest attend one by one: prompt chunks, and a lone decoder
        singles = [(s, lo, hi) for s, lo, hi in zip(segments, bounds[:-1], bounds[1:])
                   if not (decoders and hi - lo == 1)]
        x = be.embedding(w.embedding, tokens)  # (n_tokens, dim)
        for layer, lw in enumerate(w.layers):
            # attention: qkv projections for all new tokens in one GEMM
            h = be.rms_norm(x, lw.attn_norm, c.norm_eps)
            qkv = be.linear(h, lw.wqkv)  # (n_tokens, q_dim + 2 * kv_dim)
            q = be.rope(qkv[:, :q_dim].reshape(-1, c.n_heads, c.head_dim), positions)
            k = be.rope(qkv[:, q_dim:q_dim + kv_dim].reshape(-1, c.n_kv_heads, c.head_dim), positions)
            v = qkv[:, q_dim + kv_dim:].reshape(-1, c.n_kv_heads, c.head_dim)
            # each sequence attends over its own cache
            attn = xp.empty((len(tokens), q_dim), dtype=np.float32)
            if paged is not None:  # one scatter for every new token; the decoders' attention in one call
                paged.write(layer, k, v)
                if decoders:
                    attn[dec_rows] = be.paged_decode_attention(q[dec_rows], *paged.pages(layer), paged.table,
                                                               paged.lengths)
            for s, lo, hi in singles:
                if paged is None:
                    s.kv.write(layer, s.start, k[lo:hi], v[lo:hi])
                k_all, v_all = s.kv.read(layer, s.start + hi - lo)  # (n_kv_heads, t, head_dim)
                attn[lo:hi] = be.attention(q[lo:hi], k_all, v_all, positions[lo:hi])
            x = x + be.linear(attn, lw.wo)
            # feed-forward: SwiGLU
            h = be.rms_norm(x, lw.ffn_norm, c.norm_eps)
            x = x + be.linear(be.silu_mul(be.linear(h, lw.w_gate_up)), lw.w_down)

        for s in segments:
            s.kv.length = s.start + len(s.tokens)
        # output head only where logits are wanted
        wanted = [{"all": np.arange(lo, hi), "last": np.array([hi - 1]), "none": np.array([], dtype=np.int64)}[s.logits]
                  for s, lo, hi in zip(segments, bounds[:-1], bounds[1:])]
        rows = np.concatenate(wanted)
        if len(rows):
            h = be.rms_norm(x[xp.asarray(rows)], w.output_norm, c.norm_eps)
            logits = be.linear(h, w.output)  # (rows, vocab)
        else:
            logits = xp.empty((0, c.vocab_size), dtype=np.float32)
        if xp is not np:
            logits = be.to_host(logits)  # the step's one device-to-host copy
        counts = np.cumsum([0] + [len(r) for r in wanted])
        return [logits[lo:hi] for lo, hi in zip(counts[:-1], counts[1:])]
