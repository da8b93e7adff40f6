"""Hyperparameters from GGUF metadata, read in one place, as llama.cpp reads them.

`read_config` turns a file's `{arch}.*` keys into a `ModelConfig`, and `layer_tensors`
names the tensors each layer of an architecture uses. Nothing in a file is ignored
silently: a metadata key under `{arch}.` that this engine does not read is refused by
name, unless it is listed below as one that does not change the numerics; a tensor that
no part of the architecture uses is refused by name; mixture-of-experts files are refused
as such.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from backends.base import RopeYarn
from engine.errors import ModelFormatError, UnsupportedModel
from engine.model.arch import ARCHITECTURES, Architecture

# Keys under `{arch}.` that do not change what a forward pass computes.
NO_NUMERICS_KEYS = {
    "rope.scaling.finetuned",  # a flag llama.cpp only prints
    "tensor_data_layout",  # "Meta AI original pth" in old llama conversions; the layout is the tensors'
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a decoder-only transformer, read from GGUF metadata."""

    architecture: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int  # `attention.key_length`, else dim / n_heads
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rope_dim: int
    rope_style: str
    norm_eps: float
    tied_output: bool
    # RoPE: positions times rope_freq_scale (1 / the file's `rope.scaling.factor`, linear or
    # yarn); rope_freqs: the `rope_freqs.weight` tensor divides each frequency (Llama 3.1+).
    rope_freq_scale: float = 1.0
    rope_freqs: bool = False
    rope_yarn: RopeYarn | None = None  # YaRN (arXiv:2309.00071) when rope.scaling.type = yarn
    # sliding-window attention: per layer the window (0 = the whole context), and the RoPE
    # base of the sliding layers
    layer_windows: tuple[int, ...] = ()
    rope_theta_swa: float = 0.0
    attention_scale: float = 0.0  # softmax(q.k * attention_scale); 1/sqrt(head_dim) unless the arch says
    embed_scale: float = 1.0  # token embeddings times this (gemma: sqrt(dim))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def sliding_window(self) -> int:
        return max(self.layer_windows, default=0)

    def variants(self) -> list[str]:
        """What this model computes beyond the plain llama decoder (SmolLM2's): a backend
        that lacks one refuses the model instead of computing it wrong. (Bias tensors are
        the loader's to report: Weights.has_biases.)"""
        arch = ARCHITECTURES[self.architecture]
        found = {
            "per-head q/k RMSNorm": arch.qk_norm,
            "post-branch RMSNorm": arch.post_norms,
            f"{arch.activation} feed-forward": arch.activation != "silu",
            "embedding scale": self.embed_scale != 1.0,
            "rope frequency factors (rope_freqs)": self.rope_freqs,
            "linear rope scaling": self.rope_freq_scale != 1.0 and self.rope_yarn is None,
            "yarn rope scaling": self.rope_yarn is not None,
            "rope dimension below head_dim": self.rope_dim != self.head_dim,
            "sliding-window attention": self.sliding_window > 0,
            "attention scale": not math.isclose(self.attention_scale, self.head_dim ** -0.5, rel_tol=1e-6),
        }
        return [name for name, used in found.items() if used]


def architecture(path: object, metadata: Mapping[str, Any]) -> Architecture:
    name = str(metadata.get("general.architecture", "unknown"))
    if name not in ARCHITECTURES:
        raise UnsupportedModel(f"{path}: architecture {name!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name]


def read_config(path: object, metadata: Mapping[str, Any], tensors: Mapping[str, Any]) -> ModelConfig:
    """The file's hyperparameters; UnsupportedModel for anything this engine would compute wrong."""
    arch = architecture(path, metadata)
    prefix = arch.name + "."
    read: set[str] = set()

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        read.add(key)
        value = metadata.get(prefix + key)
        if value is None:
            if required:
                raise ModelFormatError(f"{path}: metadata key {prefix}{key} is missing")
            return default
        return value

    def per_layer(key: str, default: Any = None, required: bool = False) -> Any:
        """A count that may be stored per layer (llama.cpp's get_key_or_arr): one value only."""
        value = get(key, default, required)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedModel(f"{path}: {prefix}{key} differs between layers ({value[:8]}...); "
                                       f"per-layer sizes are not supported")
            value = value[0]
        return value

    def refuse(key: str, why: str) -> UnsupportedModel:
        return UnsupportedModel(f"{path}: {prefix}{key} = {metadata.get(prefix + key)!r}: {why}")

    # mixture-of-experts first: its files also lack the dense ffn tensors
    if int(get("expert_count", 0)) > 0:
        raise UnsupportedModel(f"{path}: mixture-of-experts is not supported "
                               f"({prefix}expert_count = {metadata[prefix + 'expert_count']})")
    if int(get("expert_used_count", 0)) > 0:
        raise refuse("expert_used_count", "mixture-of-experts is not supported")

    n_layers = int(get("block_count", required=True))
    dim = int(get("embedding_length", required=True))
    n_heads = int(per_layer("attention.head_count", required=True))
    n_kv_heads = int(per_layer("attention.head_count_kv", n_heads))
    head_dim = int(get("attention.key_length", dim // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise refuse("attention.value_length", f"a value head size other than the key head size "
                     f"{head_dim} is not supported")
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim > head_dim or rope_dim % 2:
        raise refuse("rope.dimension_count", f"must be even and at most head_dim {head_dim}")
    if not get("attention.causal", True):
        raise refuse("attention.causal", "only causal (decoder) attention is supported")

    # rope scaling: none, linear or yarn; the Llama 3 kind comes as the rope_freqs.weight tensor
    scaling = str(get("rope.scaling.type", "linear"))  # llama.cpp's default when absent
    factor = float(get("rope.scaling.factor", 0.0) or get("rope.scale_linear", 0.0) or 0.0)
    if scaling not in ("none", "linear", "yarn"):
        raise refuse("rope.scaling.type", f"rope scaling {scaling!r} is not supported (supported: none, linear, yarn)")
    freq_scale = 1.0 / factor if (scaling != "none" and factor not in (0.0, 1.0)) else 1.0
    context_length = int(get("context_length", required=True))
    orig_ctx = int(get("rope.scaling.original_context_length", context_length))
    if float(get("rope.scaling.attn_factor", 1.0)) != 1.0:
        raise refuse("rope.scaling.attn_factor", "a rope attention factor is not supported")
    yarn = None
    if scaling == "yarn" and freq_scale != 1.0:
        if float(get("rope.scaling.yarn_log_multiplier", 0.0)) != 0.0:
            raise refuse("rope.scaling.yarn_log_multiplier", "YaRN's mscale_all_dim is not supported")
        # transformers' attention_factor, else llama.cpp's 1 + 0.1 ln(factor) (llama_context)
        mscale = float(get("rope.scaling.yarn_attn_factor", 0.0)) or 1.0 + 0.1 * math.log(1.0 / freq_scale)
        yarn = RopeYarn(ext_factor=float(get("rope.scaling.yarn_ext_factor", 1.0)),
                        beta_fast=float(get("rope.scaling.yarn_beta_fast", 32.0)),
                        beta_slow=float(get("rope.scaling.yarn_beta_slow", 1.0)),
                        original_context=orig_ctx, mscale=mscale)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if float(get(key, 0.0)) != 0.0:
            raise refuse(key, "logit soft-capping is not supported")

    # sliding windows
    window = int(get("attention.sliding_window", 0))
    pattern = get("attention.sliding_window_pattern", arch.default_window_pattern)
    if isinstance(pattern, list):  # one flag per layer: True = sliding
        if len(pattern) != n_layers:
            raise refuse("attention.sliding_window_pattern", f"{len(pattern)} flags for {n_layers} layers")
        windows = tuple(window if flag else 0 for flag in pattern)
    else:
        windows = arch.layer_windows(n_layers, window, int(pattern))
    rope_theta = float(get("rope.freq_base", 10000.0))
    theta_swa = float(get("rope.freq_base_swa", arch.swa_rope_base or rope_theta))

    scale = (arch.attention_scale(n_layers, dim, n_heads, head_dim) if arch.attention_scale
             else head_dim ** -0.5)
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelFormatError(f"{path}: tensor 'token_embd.weight' is missing")
    config = ModelConfig(
        architecture=arch.name,
        n_layers=n_layers,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=int(per_layer("feed_forward_length", required=True)),
        vocab_size=int(get("vocab_size", embd.shape[0])),
        context_length=context_length,
        rope_theta=rope_theta,
        rope_dim=rope_dim,
        rope_style=arch.rope_style,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", required=True)),
        tied_output="output.weight" not in tensors,
        rope_freq_scale=freq_scale,
        rope_freqs=arch.rope_freqs and "rope_freqs.weight" in tensors,
        rope_yarn=yarn,
        layer_windows=windows,
        rope_theta_swa=theta_swa,
        attention_scale=scale,
        embed_scale=math.sqrt(dim) if arch.embed_scale else 1.0,
    )

    unknown = sorted(k for k in metadata if k.startswith(prefix) and k[len(prefix):] not in read | NO_NUMERICS_KEYS)
    if unknown:
        raise UnsupportedModel(f"{path}: metadata key {unknown[0]} = {metadata[unknown[0]]!r} is not understood "
                               f"by this engine and may change the numerics; refusing rather than ignoring it")
    check_tensors(path, arch, config, tensors)
    return config


# --- tensors ---------------------------------------------------------------------------------

def layer_tensors(arch: Architecture, i: int, has: Callable[[str], bool]) -> dict[str, str | None]:
    """Role → tensor name of layer i (None: an optional tensor the file does not hold).

    Roles: attn_norm, attn_qkv (fused) or attn_q/attn_k/attn_v, attn_q_norm, attn_k_norm,
    attn_output, post_attention_norm, ffn_norm, ffn_gate and ffn_up (or ffn_up holding
    [gate | up]), ffn_down, post_ffw_norm, and `<linear>.bias` for each bias."""
    p = f"blk.{i}."
    roles: dict[str, str | None] = {"attn_norm": p + "attn_norm.weight"}
    if arch.fused_qkv or has(p + "attn_qkv.weight"):  # llama.cpp takes a fused qkv for any arch
        roles["attn_qkv"] = p + "attn_qkv.weight"
        roles["attn_qkv.bias"] = p + "attn_qkv.bias" if has(p + "attn_qkv.bias") else None
    else:
        roles.update({r: p + r + ".weight" for r in ("attn_q", "attn_k", "attn_v")})
    if arch.qk_norm:
        roles.update(attn_q_norm=p + "attn_q_norm.weight", attn_k_norm=p + "attn_k_norm.weight")
    roles["attn_output"] = p + "attn_output.weight"
    if arch.post_norms:
        roles["post_attention_norm"] = p + "post_attention_norm.weight"
    roles["ffn_norm"] = p + "ffn_norm.weight"
    if not arch.fused_gate_up:
        roles["ffn_gate"] = p + "ffn_gate.weight"
    roles.update(ffn_up=p + "ffn_up.weight", ffn_down=p + "ffn_down.weight")
    if arch.post_norms:
        roles["post_ffw_norm"] = p + "post_ffw_norm.weight"
    for linear in arch.biases:
        if linear in ("attn_q", "attn_k", "attn_v") and roles.get("attn_qkv.bias"):
            continue  # a fused bias; llama.cpp reads separate ones only without it
        if linear == "ffn_gate" and "ffn_gate" not in roles:
            continue
        name = p + linear + ".bias"
        roles[linear + ".bias"] = name if has(name) else None
    return roles


def global_tensors(arch: Architecture, config: ModelConfig) -> dict[str, str | None]:
    return {"token_embd": "token_embd.weight", "output_norm": "output_norm.weight",
            "output": None if config.tied_output else "output.weight",
            "rope_freqs": "rope_freqs.weight" if config.rope_freqs else None}


def check_tensors(path: object, arch: Architecture, config: ModelConfig, tensors: Mapping[str, Any]) -> None:
    """Every tensor the architecture needs is there, and every tensor there is used."""
    used = {n for n in global_tensors(arch, config).values() if n}
    for i in range(config.n_layers):
        used.update(n for n in layer_tensors(arch, i, tensors.__contains__).values() if n)
    missing = sorted(n for n in used if n not in tensors)
    if missing:
        raise ModelFormatError(f"{path}: tensor {missing[0]!r} is missing")
    unused = sorted(n for n in tensors if n not in used)
    if unused:
        raise UnsupportedModel(f"{path}: tensor {unused[0]!r} is not used by the {arch.name} architecture "
                               f"as this engine runs it; refusing rather than ignoring it"
                               + (f" ({len(unused)} such tensors)" if len(unused) > 1 else ""))
