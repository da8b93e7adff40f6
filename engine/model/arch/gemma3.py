"""gemma3: Gemma 3 text models (270M, 1B, and the text part of 4B+).

Embeddings scaled by sqrt(dim); per-head q/k RMSNorm; RMSNorm on each branch's output
before its residual add; GeGLU with the tanh GELU; attention scaled by 1/sqrt(head_dim)
(llama.cpp: 1/sqrt(dim / heads) for the 27B); five sliding-window layers then one global
layer (llama.cpp's set_swa_pattern(6), or the file's `attention.sliding_window_pattern`),
the sliding ones with RoPE base 10000 (or `rope.freq_base_swa`). The converter stores the
norm weights as 1 + w, so RMSNorm multiplies by them directly.
"""

from engine.model.arch import Architecture


def layer_windows(n_layers: int, window: int, pattern: int) -> tuple[int, ...]:
    """Layer i slides (window) unless i % pattern == pattern - 1 (global: 0)."""
    if window == 0:
        return (0,) * n_layers
    return tuple(window if (pattern == 0 or i % pattern < pattern - 1) else 0 for i in range(n_layers))


def attention_scale(n_layers: int, dim: int, n_heads: int, head_dim: int) -> float:
    return (dim / n_heads) ** -0.5 if n_layers == 62 else head_dim ** -0.5  # 62 layers: the 27B


ARCH = Architecture(
    name="gemma3",
    rope_style="neox",
    qk_norm=True,
    post_norms=True,
    activation="gelu_tanh",
    embed_scale=True,
    layer_windows=layer_windows,
    default_window_pattern=6,
    swa_rope_base=10000.0,
    attention_scale=attention_scale,
)
