"""llama: Llama 1/2/3.x, SmolLM2, TinyLlama, Mistral (converted as llama), Mistral-Nemo.

RMSNorm before attention and feed-forward, SwiGLU, RoPE on adjacent pairs (the converter
permutes q/k). Llama 3.1+ stores its rope scaling as the `rope_freqs.weight` tensor
(read by engine/model/config.py). Biases are optional, as llama.cpp loads them.
"""

from engine.model.arch import Architecture

ARCH = Architecture(
    name="llama",
    rope_style="interleaved",
    biases=("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"),
    rope_freqs=True,
)
