"""Architectures as data: what each `general.architecture` stores and how its forward differs.

One small module per architecture (llama.py, qwen2.py, ...) declares an `Architecture`:
which tensors a layer holds, which norms, activation, RoPE pairing and attention variants
it uses, and how its sliding-window layers are laid out. The hyperparameters are read from
the GGUF metadata in one place (engine/model/config.py) and the forward pass
(engine/runtime/model.py) reads the flags; neither knows an architecture by name.

Adding an architecture: docs/13_architectures.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# The linear projections of a layer, by their GGUF tensor names (without "blk.N." and ".weight").
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def same_window(n_layers: int, window: int, pattern: int = 0) -> tuple[int, ...]:
    """Every layer attends to the whole context (window 0) unless the file names a window,
    which then applies to every layer (transformers' Mistral and Phi-3 sliding window)."""
    return (window,) * n_layers


@dataclass(frozen=True)
class Architecture:
    """How one `general.architecture` is laid out and computed.

    Each flag names a variant of the llama decoder; the defaults are llama's.
    """

    name: str
    # RoPE pairing: llama.cpp's converter permutes the q/k rows of llama-family checkpoints so
    # that RoPE rotates adjacent pairs (x[2i], x[2i+1]): "interleaved"; NeoX-style models
    # rotate (x[i], x[i + d/2]): "neox".
    rope_style: str = "interleaved"
    # q, k and v as one tensor blk.N.attn_qkv.weight ([q | k | v] rows, phi3), else three.
    fused_qkv: bool = False
    # gate and up as one tensor blk.N.ffn_up.weight ([gate | up] rows, phi3), else two.
    fused_gate_up: bool = False
    # Bias tensors (blk.N.<linear>.bias) the file may hold; llama.cpp loads q/k/v biases for
    # every architecture (create_tensor_qkv), others per architecture.
    biases: tuple[str, ...] = ("attn_q", "attn_k", "attn_v")
    # Llama 3.1+ rope scaling stored as per-frequency divisors, tensor `rope_freqs.weight`.
    rope_freqs: bool = False
    # Per-head RMSNorm of q and k before RoPE: blk.N.attn_q_norm / attn_k_norm (qwen3, gemma3).
    qk_norm: bool = False
    # RMSNorm of each branch's output before the residual add: blk.N.post_attention_norm,
    # blk.N.post_ffw_norm (gemma2/3).
    post_norms: bool = False
    # The gated feed-forward's gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
    activation: str = "silu"
    # Token embeddings scaled by sqrt(dim) before the first layer (gemma).
    embed_scale: bool = False
    # Per-layer sliding windows (0 = global) from (n_layers, the file's window, its pattern).
    layer_windows: Callable[[int, int, int], tuple[int, ...]] = same_window
    # The pattern when the file names none (`attention.sliding_window_pattern`).
    default_window_pattern: int = 0
    # RoPE base of the sliding-window layers when it differs from the global one (gemma3:
    # fixed at 10000 by llama.cpp, not stored in the file); None = the file's freq_base.
    swa_rope_base: float | None = None
    # Attention scale when not 1/sqrt(head_dim): f(n_layers, dim, n_heads, head_dim) (gemma3).
    attention_scale: Callable[[int, int, int, int], float] | None = None

    def __post_init__(self) -> None:
        assert self.rope_style in ("interleaved", "neox"), self.rope_style
        assert self.activation in ("silu", "gelu_tanh"), self.activation
        assert set(self.biases) <= set(LINEARS), self.biases


def _registry() -> dict[str, Architecture]:
    from engine.model.arch import gemma3, llama, phi3, qwen2, qwen3
    return {a.name: a for a in (llama.ARCH, qwen2.ARCH, qwen3.ARCH, phi3.ARCH, gemma3.ARCH)}


ARCHITECTURES: dict[str, Architecture] = _registry()
