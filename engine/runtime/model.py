"""The decoder of every architecture in engine/model/arch/, as one forward pass over a backend.

The llama block, top to bottom, with each architecture's variants (biases, q/k norms, post
norms, GeGLU, embedding scale, sliding windows, per-layer RoPE bases) switched on by its
flags and by the tensors its file holds; docs/13_architectures.md.

`Transformer.forward` takes a batch of sequence segments (each: its KV cache,
the new tokens and the position of the first), concatenates their tokens for
every weight GEMM, and runs attention per segment against that segment's own
cache. Prefill (a whole prompt), decode (one token) and a mix of both in one
step are the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from backends.base import Backend, TensorData
from backends.quants import dequantize
from engine.errors import ContextOverflow, ModelFormatError
from engine.memory.kv_cache import SequenceKV
from engine.memory.paged import PagedKV, PagedStep
from engine.model.arch import ARCHITECTURES
from engine.model.config import global_tensors, layer_tensors
from engine.model.gguf_file import ModelConfig, ModelFile


@dataclass
class LayerWeights:
    attn_norm: Any
    wqkv: Any  # q, k and v projections fused along the output axis
    wo: Any
    ffn_norm: Any
    w_gate_up: Any  # gate and up projections fused: [gate | up]
    w_down: Any
    # architecture variants (engine/model/arch/): None where the architecture has none
    bqkv: Any = None  # (q_dim + 2 * kv_dim,) bias of the fused qkv projection
    bo: Any = None
    b_gate_up: Any = None
    b_down: Any = None
    q_norm: Any = None  # (head_dim,) per-head RMSNorm weights
    k_norm: Any = None
    post_attn_norm: Any = None  # RMSNorm of the attention output before the residual add
    post_ffn_norm: Any = None


@dataclass
class Weights:
    embedding: Any
    layers: list[LayerWeights]
    output_norm: Any
    output: Any
    rope_freqs: np.ndarray | None = None  # (rope_dim / 2,) frequency divisors (Llama 3.1+)

    @property
    def has_biases(self) -> bool:
        return any(b is not None for lw in self.layers for b in (lw.bqkv, lw.bo, lw.b_gate_up, lw.b_down))


def load_weights(model: ModelFile, config: ModelConfig, backend: Backend, fmt: str) -> Weights:
    """Hand every tensor of the file to the backend in the plan's weight format.

    The tensor names come from the architecture (engine/model/config.py: layer_tensors),
    which has already checked that the file holds no tensor it would leave unused."""
    backend.check_weight_format(fmt)
    arch = ARCHITECTURES[config.architecture]
    q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim

    def tensor(name: str) -> TensorData:
        info = model.tensors.get(name)
        if info is None:
            raise ModelFormatError(f"{model.path}: tensor {name!r} is missing")
        return TensorData(model.raw(name), info.type, info.shape)

    def check_rows(name: str, rows: int) -> None:
        if model.tensors[name].shape[0] != rows:
            raise ModelFormatError(f"{model.path}: tensor {name!r} has shape {model.tensors[name].shape}, "
                                   f"expected {rows} rows from the metadata")

    def host(name: str | None, size: int) -> np.ndarray:
        """A small tensor as float32, zeros when the file has none (an absent bias)."""
        if name is None:
            return np.zeros(size, dtype=np.float32)
        t = tensor(name)
        return dequantize(t.raw, t.qtype, t.shape).reshape(-1)

    def vector(*parts: tuple[str | None, int]) -> Any:
        """Bias vectors of fused projections, concatenated; None when the file has none of them."""
        if all(name is None for name, _ in parts):
            return None
        data = np.concatenate([host(name, size) for name, size in parts])
        return backend.load_vector(TensorData(data.view(np.uint8), T.F32, data.shape))

    layers = []
    for i in range(config.n_layers):
        t = layer_tensors(arch, i, model.tensors.__contains__)
        if "attn_qkv" in t:
            check_rows(t["attn_qkv"], q_dim + 2 * kv_dim)
            wqkv = backend.load_linear([tensor(t["attn_qkv"])], fmt)
            bqkv = vector((t["attn_qkv.bias"], q_dim + 2 * kv_dim)) if t.get("attn_qkv.bias") else \
                vector((t.get("attn_q.bias"), q_dim), (t.get("attn_k.bias"), kv_dim), (t.get("attn_v.bias"), kv_dim))
        else:
            for role, rows in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                check_rows(t[role], rows)
            wqkv = backend.load_linear([tensor(t["attn_q"]), tensor(t["attn_k"]), tensor(t["attn_v"])], fmt)
            bqkv = vector((t.get("attn_q.bias"), q_dim), (t.get("attn_k.bias"), kv_dim), (t.get("attn_v.bias"), kv_dim))
        if arch.fused_gate_up:
            check_rows(t["ffn_up"], 2 * config.ffn_dim)
            w_gate_up = backend.load_linear([tensor(t["ffn_up"])], fmt)
            b_gate_up = vector((t.get("ffn_up.bias"), 2 * config.ffn_dim))
        else:
            w_gate_up = backend.load_linear([tensor(t["ffn_gate"]), tensor(t["ffn_up"])], fmt)
            b_gate_up = vector((t.get("ffn_gate.bias"), config.ffn_dim), (t.get("ffn_up.bias"), config.ffn_dim))
        optional = {role: backend.load_vector(tensor(t[role])) if t.get(role) else None
                    for role in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")}
        layers.append(LayerWeights(
            attn_norm=backend.load_vector(tensor(t["attn_norm"])),
            wqkv=wqkv,
            wo=backend.load_linear([tensor(t["attn_output"])], fmt),
            ffn_norm=backend.load_vector(tensor(t["ffn_norm"])),
            w_gate_up=w_gate_up,
            w_down=backend.load_linear([tensor(t["ffn_down"])], fmt),
            bqkv=bqkv,
            bo=vector((t.get("attn_output.bias"), config.dim)),
            b_gate_up=b_gate_up,
            b_down=vector((t.get("ffn_down.bias"), config.dim)),
            q_norm=optional["attn_q_norm"],
            k_norm=optional["attn_k_norm"],
            post_attn_norm=optional["post_attention_norm"],
            post_ffn_norm=optional["post_ffw_norm"],
        ))
    names = global_tensors(arch, config)
    embedding = backend.load_embedding(tensor(names["token_embd"]))
    output = (backend.tied_output(embedding) if config.tied_output
              else backend.load_linear([tensor(names["output"])], fmt))
    rope_freqs = host(names["rope_freqs"], config.rope_dim // 2) if names["rope_freqs"] else None
    if rope_freqs is not None and rope_freqs.shape != (config.rope_dim // 2,):
        raise ModelFormatError(f"{model.path}: tensor 'rope_freqs.weight' has {rope_freqs.size} values, "
                               f"expected rope_dim / 2 = {config.rope_dim // 2}")
    return Weights(embedding, layers, backend.load_vector(tensor(names["output_norm"])), output, rope_freqs)


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
    """The decoder of every architecture in engine/model/arch/: the llama block, with each
    architecture's variants switched on by its flags and the weights the file holds."""

    def __init__(self, config: ModelConfig, weights: Weights, backend: Backend):
        self.config = config
        self.arch = ARCHITECTURES[config.architecture]
        self.weights = weights
        self.backend = backend
        backend.check_model(config, config.variants() + (["biases"] if weights.has_biases else []))
        c = config
        # one rotary table per distinct RoPE base: global layers, and sliding ones where they differ
        self.rope_global = backend.configure_rope(c.rope_dim, c.rope_theta, c.rope_style, c.context_length,
                                                  c.rope_freq_scale, weights.rope_freqs, c.rope_yarn)
        self.rope_swa = self.rope_global
        if c.sliding_window and c.rope_theta_swa != c.rope_theta:
            self.rope_swa = backend.configure_rope(c.rope_dim, c.rope_theta_swa, c.rope_style, c.context_length)
        # the backend scales scores by 1/sqrt(head_dim); another scale is applied to q
        default = math.isclose(c.attention_scale, c.head_dim ** -0.5, rel_tol=1e-6)
        self.q_scale = None if default else np.float32(c.attention_scale * math.sqrt(c.head_dim))
        # the plain llama block, which a backend may run as one call a layer at decode
        self.plain_block = (self.arch.activation == "silu" and self.q_scale is None and not any(c.layer_windows)
                            and all(lw.bqkv is None and lw.bo is None and lw.b_gate_up is None and lw.b_down is None
                                    and lw.q_norm is None and lw.post_attn_norm is None and lw.post_ffn_norm is None
                                    for lw in weights.layers))

    def new_kv(self, capacity: int) -> SequenceKV:
        c = self.config
        if self.backend.resident:  # a device backend keeps the cache beside its weights
            return self.backend.new_kv(c.n_layers, c.n_kv_heads, c.head_dim, capacity)
        return SequenceKV(c.n_layers, c.n_kv_heads, c.head_dim, capacity)

    def _project(self, x: Any, weight: Any, bias: Any = None, post_norm: Any = None) -> Any:
        """x @ weight, plus the bias (qwen2, phi3) and the RMSNorm after it (gemma) where the
        layer has them."""
        y = self.backend.linear(x, weight)
        if bias is not None:
            y = y + bias
        if post_norm is not None:
            y = self.backend.rms_norm(y, post_norm, self.config.norm_eps)
        return y

    def _fused_decode(self, segment: Segment, x: np.ndarray) -> np.ndarray:
        """Every layer for one token of one sequence, a backend call a layer (`decode_layer`:
        the same ops, the same bits, none of the Python between them)."""
        c, w, kv = self.config, self.weights, segment.kv
        if segment.start + 1 > kv.capacity:
            raise ContextOverflow(f"sequence needs {segment.start + 1} cache positions but was given {kv.capacity}")
        x = np.array(x, dtype=np.float32, order="C")  # updated in place, layer by layer
        for layer, lw in enumerate(w.layers):
            nxt = w.layers[layer + 1].wqkv if layer + 1 < len(w.layers) else w.output
            self.backend.decode_layer(x, lw, *kv.layer_views(layer), segment.start, self.rope_global, c.norm_eps,
                                      c.n_heads, nxt)
        return x

    def forward(self, segments: Sequence[Segment]) -> list[np.ndarray]:
        """Run new tokens through the model, extend each segment's cache, return logits.

        Returns per segment float32 logits: (n, vocab) for "all", (1, vocab) for "last",
        (0, vocab) for "none".
        """
        c, be, w, arch = self.config, self.backend, self.weights, self.arch
        xp = be.xp  # the backend's array module: numpy, or cupy when device-resident
        q_dim, kv_dim, hd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.head_dim
        tokens = np.concatenate([s.tokens for s in segments])
        positions = np.concatenate([np.arange(s.start, s.start + len(s.tokens)) for s in segments])
        bounds = np.cumsum([0] + [len(s.tokens) for s in segments])

        # a resident backend (arrays in device memory) with caches the runtime keeps on the host
        # (the worker's arena): keys and values come to the host once a layer to be stored, and
        # attention reads the host cache (the backend uploads it)
        host_kv = xp is not np and not all(be.holds_cache(s.kv) for s in segments)
        paged = _paged_step(segments) if xp is np or host_kv else None
        decoders = paged.lengths.size if paged is not None else 0
        # the decoders' rows of the step, in the backend's array module once (not once a layer)
        dec_rows = xp.asarray(bounds[:-1][[len(s.tokens) == 1 for s in segments]]) if decoders else None
        # the rest attend one by one: prompt chunks, and a lone decoder
        singles = [(s, lo, hi) for s, lo, hi in zip(segments, bounds[:-1], bounds[1:])
                   if not (decoders and hi - lo == 1)]
        everyone = list(zip(segments, bounds[:-1], bounds[1:]))
        x = be.embedding(w.embedding, tokens)  # (n_tokens, dim)
        if c.embed_scale != 1.0:  # gemma
            x = x * np.float32(c.embed_scale)
        # one token of one sequence whose float32 cache is one run of memory (its own, or
        # consecutive arena blocks: a lone stream of the server): fused where the backend can
        one = len(segments) == 1 and len(tokens) == 1 and self.plain_block and be.fuses_decode(w.layers[0])
        views = segments[0].kv.layer_views(0) if one else None  # asked only where the backend fuses (host caches)
        fused = views is not None and views[0].dtype == np.float32
        if fused:
            x = self._fused_decode(segments[0], x)
        for layer, lw in enumerate(() if fused else w.layers):  # the general path
            window = c.layer_windows[layer]  # 0: this layer attends to the whole context
            rope = self.rope_swa if window else self.rope_global
            # attention: qkv projections for all new tokens in one GEMM
            h = be.rms_norm(x, lw.attn_norm, c.norm_eps)
            qkv = self._project(h, lw.wqkv, lw.bqkv)  # (n_tokens, q_dim + 2 * kv_dim)
            q = qkv[:, :q_dim].reshape(-1, c.n_heads, hd)  # (n_tokens, n_heads, head_dim)
            k = qkv[:, q_dim:q_dim + kv_dim].reshape(-1, c.n_kv_heads, hd)  # (n_tokens, n_kv_heads, head_dim)
            v = qkv[:, q_dim + kv_dim:].reshape(-1, c.n_kv_heads, hd)
            if lw.q_norm is not None:  # qwen3, gemma3: RMSNorm over each head
                q = be.rms_norm(np.ascontiguousarray(q).reshape(-1, hd), lw.q_norm, c.norm_eps).reshape(-1, c.n_heads, hd)
                k = be.rms_norm(np.ascontiguousarray(k).reshape(-1, hd), lw.k_norm, c.norm_eps).reshape(-1, c.n_kv_heads, hd)
            q = be.rope(q, positions, rope)
            k = be.rope(k, positions, rope)
            if self.q_scale is not None:  # gemma3's attention scale, folded into q as llama.cpp does
                q = q * self.q_scale
            # each sequence attends over its own cache (a sliding layer: over its window only)
            attn = xp.empty((len(tokens), q_dim), dtype=np.float32)
            k_new, v_new = (be.to_host(k), be.to_host(v)) if host_kv else (k, v)
            if paged is not None:  # one scatter for every new token; the decoders' attention in one call
                paged.write(layer, k_new, v_new)
                if decoders and not window:
                    attn[dec_rows] = be.paged_decode_attention(q[dec_rows], *paged.pages(layer), paged.table,
                                                               paged.lengths)
            for s, lo, hi in (everyone if window else singles):
                if paged is None:
                    s.kv.write(layer, s.start, k_new[lo:hi], v_new[lo:hi])
                end = s.start + hi - lo
                if window:  # keys from the oldest any of these queries can see
                    first = max(0, s.start - window + 1)
                    k_win, v_win = s.kv.read(layer, end, first)  # (n_kv_heads, end - first, head_dim)
                    attn[lo:hi] = be.attention(q[lo:hi], k_win, v_win, positions[lo:hi] - first, window)
                else:
                    k_all, v_all = s.kv.read(layer, end)  # (n_kv_heads, t, head_dim)
                    attn[lo:hi] = be.attention(q[lo:hi], k_all, v_all, positions[lo:hi])
            x = x + self._project(attn, lw.wo, lw.bo, lw.post_attn_norm)  # (n_tokens, dim)
            # feed-forward: SwiGLU, or GeGLU (gemma)
            h = be.rms_norm(x, lw.ffn_norm, c.norm_eps)
            gate_up = self._project(h, lw.w_gate_up, lw.b_gate_up)  # (n_tokens, 2 * ffn_dim)
            act = be.silu_mul(gate_up) if arch.activation == "silu" else be.gelu_tanh_mul(gate_up)
            x = x + self._project(act, lw.w_down, lw.b_down, lw.post_ffn_norm)  # (n_tokens, dim)

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
