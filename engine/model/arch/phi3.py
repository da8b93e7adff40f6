"""phi3: Phi-3 / Phi-3.5 mini. One fused qkv projection and one fused [gate | up] projection.

The 128k-context variants carry `rope_factors_long/short.weight` (LongRoPE): those files
are refused by the unused-tensor check (not implemented). The file's sliding window (2047 in
Phi-3-mini) applies to every layer, as in transformers (llama.cpp currently disables it).
"""

from engine.model.arch import Architecture

ARCH = Architecture(
    name="phi3",
    rope_style="neox",
    fused_qkv=True,
    fused_gate_up=True,
)
