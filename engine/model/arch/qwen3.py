"""qwen3: Qwen3 dense models. No biases; an RMSNorm over each q and k head before RoPE."""

from engine.model.arch import Architecture

ARCH = Architecture(
    name="qwen3",
    rope_style="neox",
    qk_norm=True,
)
