"""Builds small synthetic GGUF files for bad-input tests (written with gguf's own writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter


def tiny_writer(path: Path, arch: str = "llama", dim: int = 32, ffn: int = 64) -> GGUFWriter:
    """A GGUFWriter with the tiny models' header: 1 layer, 4 heads (2 kv), context 64, and an
    8-token byte-level BPE vocabulary; the caller adds the tensors and writes the file."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(["a", "b", "c", "d", "ab", "cd", "<s>", "</s>"])
    w.add_token_types([1, 1, 1, 1, 1, 1, 3, 3])
    w.add_token_merges(["a b", "c d"])
    w.add_bos_token_id(6)
    w.add_eos_token_id(7)
    return w


# A ChatML template of the tiny model's own (a model without one is refused chat messages).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_tiny_gguf(path: Path, arch: str = "llama", odd_tensor_type: GGMLQuantizationType | None = None,
                    nan_tensor: str | None = None, chat_template: str | None = TINY_CHAT_TEMPLATE) -> Path:
    """A 1-layer llama-shaped model (dim 32, vocab 8) with a byte-level BPE vocabulary and a
    ChatML chat template.

    `odd_tensor_type` stores blk.0.ffn_up.weight as raw bytes of that type instead of F32;
    `nan_tensor` names a tensor whose first element is NaN (a corrupt model).
    """
    dim, ffn, vocab = 32, 64, 8
    w = tiny_writer(path, arch, dim, ffn)
    if chat_template:
        w.add_chat_template(chat_template)
    rng = np.random.default_rng(0)

    def t(name: str, *shape: int) -> None:
        values = rng.standard_normal(shape).astype(np.float32) * 0.1
        if name == nan_tensor:
            values.flat[0] = np.nan
        w.add_tensor(name, values)

    t("token_embd.weight", vocab, dim)
    t("output_norm.weight", dim)
    t("blk.0.attn_norm.weight", dim)
    t("blk.0.ffn_norm.weight", dim)
    t("blk.0.attn_q.weight", dim, dim)
    t("blk.0.attn_k.weight", dim // 2, dim)
    t("blk.0.attn_v.weight", dim // 2, dim)
    t("blk.0.attn_output.weight", dim, dim)
    t("blk.0.ffn_gate.weight", ffn, dim)
    t("blk.0.ffn_down.weight", dim, ffn)
    if odd_tensor_type is None:
        t("blk.0.ffn_up.weight", ffn, dim)
    else:
        from gguf import GGML_QUANT_SIZES
        block, size = GGML_QUANT_SIZES[odd_tensor_type]
        raw = np.zeros((ffn, dim // block * size), dtype=np.uint8)
        w.add_tensor("blk.0.ffn_up.weight", raw, raw_shape=(ffn, dim // block * size), raw_dtype=odd_tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
