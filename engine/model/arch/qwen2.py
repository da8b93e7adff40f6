"""qwen2: Qwen2, Qwen2.5. The llama decoder with q/k/v biases and NeoX RoPE pairing."""

from engine.model.arch import Architecture

ARCH = Architecture(
    name="qwen2",
    rope_style="neox",
)
