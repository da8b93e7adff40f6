"""Text <-> token ids for GGUF models, matching llama.cpp's tokenizer (src/llama-vocab.cpp).

A :class:`Tokenizer` is built once per model, from the ``tokenizer.ggml.*`` metadata, by
:meth:`Tokenizer.from_metadata`. The merge loops run in Hugging Face ``tokenizers`` (Rust);
this module adds what llama.cpp does around them:

* ``gpt2`` (byte-level BPE): the vocabulary and ``tokenizer.ggml.merges``, preceded by the
  regex pre-tokenizer that llama.cpp picks from ``tokenizer.ggml.pre`` (table
  :data:`PRE_TOKENIZERS`, regexes copied from ``llm_tokenizer_bpe``), then the GPT-2
  byte-to-unicode mapping.
* ``llama`` (SentencePiece): llama.cpp's ``llm_tokenizer_spm`` repeatedly merges the adjacent
  pair whose concatenation is the highest-scoring vocabulary piece, and spells out pieces it
  cannot form as ``<0xXX>`` byte tokens. That is a BPE whose merge ranks are the pieces' scores,
  so we derive the merges from ``tokenizer.ggml.scores`` (as HF's SentencePiece converter does)
  and turn on byte fallback. Spaces become U+2581, with one prepended to every text fragment
  that starts the input or follows a special token (``add_space_prefix``).
* Special tokens (``tokenizer_st_partition``): control (type 3) and unknown (2) tokens are cut
  out of the text as single ids only when ``parse_special`` is set; user-defined tokens (type 4)
  always are, as in llama.cpp and HF ``tokenizers`` ("added tokens"). Longer strings first.
* Decoding works on bytes (:meth:`Tokenizer.token_bytes`), because one byte-level token can hold
  half of a UTF-8 character; :class:`StreamDecoder` turns a stream of ids into text without ever
  emitting a partial character.

Not implemented (llama.cpp has them): WordPiece / Unigram / RWKV vocabularies, per-model
LSTRIP/RSTRIP attributes on special tokens (phi-3), ``clean_up_tokenization_spaces`` on decode,
``add_eos_token`` / ``add_sep_token``.
"""

from __future__ import annotations

import codecs
import logging
import operator
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from engine.errors import InvalidArgument, ModelFormatError, UnsupportedModel

log = logging.getLogger(__name__)

# encode_batch (see Tokenizer.encode) runs serially in the calling thread, GIL released; a user who
# wants tokenizers' own thread pool can still set the variable before starting the server.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# tokenizer.ggml.token_type values (llama.h, enum llama_token_type).
TOKEN_UNDEFINED = 0
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SPACE_MARK = "\u2581"  # SentencePiece's "▁", standing for a space

# Tokens llama.cpp treats as end-of-generation when present in the vocabulary
# (llama_vocab::impl::load, "special_eog_ids"), besides eos / eot / eom ids.
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
)


# --- pre-tokenizers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text into words before byte-level BPE (``llm_tokenizer_bpe``).

    ``regexes`` are applied in turn, each splitting the pieces the previous one produced; the
    matches and the text between them both become pieces. ``ignore_merges``: a word that is
    itself a vocabulary token is taken whole. ``add_bos``: default of ``add_bos_token`` when the
    metadata does not say.
    """

    regexes: tuple[str, ...]
    ignore_merges: bool = False
    add_bos: bool = False


_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp rewrites these two with lookaheads because std::regex lacks \p{Lu}; Oniguruma
# (inside `tokenizers`) has the categories, so we use the originals from tokenizer.json.
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2_PRE = PreTokenizer((_GPT2,))
# StarCoder / SmolLM: every digit on its own, then the GPT-2 regex.
_STARCODER = PreTokenizer((r"\p{N}", _GPT2))
_LLAMA3_PRE = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_QWEN2_PRE = PreTokenizer((_QWEN2,))

#: ``tokenizer.ggml.pre`` -> pre-tokenizer, as in llama_vocab::impl::load (names) and
#: llm_tokenizer_bpe (regexes).
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(
        ["gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
         "a.x-4.0", "mellum", "modern-bert", "exaone4", "mpt", "olmo", "jais", "trillion",
         "granite-docling"], _GPT2_PRE),
    **dict.fromkeys(
        ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
         "mellum2"], _STARCODER),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2"], _LLAMA3_PRE),
    **dict.fromkeys(["dbrx", "smaug-bpe"], PreTokenizer((_LLAMA3,))),
    **dict.fromkeys(
        ["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
         "solar-open"], _QWEN2_PRE),
    "qwen35": PreTokenizer((_QWEN35,)),
    **dict.fromkeys(["glm4", "chatglm-bpe"], PreTokenizer((_LLAMA3,))),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    "deepseek-coder": PreTokenizer(
        ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}")),
    **dict.fromkeys(
        ["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
        PreTokenizer((r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+", _DEEPSEEK3))),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"],
                    PreTokenizer((_GPT4O,))),
    "tekken": PreTokenizer((_TEKKEN,), ignore_merges=True, add_bos=True),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"],
                    PreTokenizer((r" ?[^(\s|.,!?…。，、।۔،)]+",))),
}

SUPPORTED_MODELS = ("gpt2", "llama")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the "Ġ" for a space)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def _byte_token_value(text: str) -> int | None:
    """The byte a ``<0xXX>`` piece stands for, or None."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return int(text[3:5], 16)
        except ValueError:
            return None
    return None


# --- the tokenizer ----------------------------------------------------------------------------

class Tokenizer:
    """A model's tokenizer. Build it with :meth:`from_metadata`; immutable and thread-safe."""

    def __init__(
        self,
        *,
        model: str,
        pre: str | None,
        tokens: list[str],
        token_types: list[int],
        backend: HFTokenizer,
        bos_id: int | None,
        eos_id: int | None,
        eot_ids: frozenset[int],
        add_bos: bool,
        add_space_prefix: bool,
    ):
        self.model = model
        self.pre = pre
        self._tokens = tokens
        self._types = token_types
        self._backend = backend
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._eot_ids = eot_ids
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        self._piece_to_id = {t: i for i, t in enumerate(tokens)}

        # Special strings cut out of the text before BPE, longest first
        # (llama.cpp's cache_special_tokens). (id, text, only_when_parse_special)
        specials = [i for i, t in enumerate(token_types)
                    if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN) and tokens[i]]
        specials.sort(key=lambda i: (-len(tokens[i]), i))
        self._specials = [(i, tokens[i], token_types[i] != TOKEN_USER_DEFINED) for i in specials]

        # What each id decodes to, as bytes (llama.cpp's token_to_piece cache).
        self._bytes = [self._piece_bytes(i) for i in range(len(tokens))]
        # Ids rendered as nothing when skip_special (llama.cpp: CONTROL | UNKNOWN attributes).
        self._skipped = frozenset(i for i, t in enumerate(token_types)
                                  if t in (TOKEN_CONTROL, TOKEN_UNKNOWN))
        self._max_token_bytes: int | None = None

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

        Raises :class:`UnsupportedModel` for a tokenizer model or pre-tokenizer we do not
        implement (naming the supported ones) and :class:`ModelFormatError` for inconsistent
        metadata (missing vocabulary, duplicate tokens, malformed merges).
        """
        model = meta.get("tokenizer.ggml.model")
        if model not in SUPPORTED_MODELS:
            raise UnsupportedModel(
                f"tokenizer model {model!r} is not supported (supported: {', '.join(SUPPORTED_MODELS)})")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelFormatError("metadata has no tokenizer.ggml.tokens")
        tokens = [str(t) for t in tokens]
        n = len(tokens)
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * n)
        if len(types) < n:
            raise ModelFormatError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
        types = [int(t) for t in types[:n]]
        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if not t:
                # llama.cpp renames empty pieces so that they cannot be matched.
                t = tokens[i] = f"[EMPTY_{i}]"
            if vocab.setdefault(t, i) != i:
                raise ModelFormatError(f"duplicate token in vocabulary: {t!r} has ids {vocab[t]} and {i}")

        def token_id(key: str, default: int | None) -> int | None:
            value = meta.get(key)
            if value is None:
                return default if default is not None and 0 <= default < n else None
            value = int(value)
            if not 0 <= value < n:
                log.warning("%s = %d is outside the vocabulary (%d tokens); ignored", key, value, n)
                return default if default is not None and 0 <= default < n else None
            return value

        pre_name: str | None = None
        if model == "gpt2":
            pre_name = str(meta.get("tokenizer.ggml.pre") or "")
            if not pre_name:
                log.warning("tokenizer.ggml.pre is missing: using the 'default' pre-tokenizer; "
                            "tokenization may differ from the model's training")
                pre_name = "default"
            pre = PRE_TOKENIZERS.get(pre_name)
            if pre is None:
                raise UnsupportedModel(
                    f"pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; supported: "
                    + ", ".join(sorted(PRE_TOKENIZERS)))
            backend = _build_bpe(vocab, meta.get("tokenizer.ggml.merges"), pre)
            add_bos_default, add_space_prefix_default = pre.add_bos, False
            bos_default = eos_default = None  # only what the metadata names
        else:  # llama: SentencePiece
            scores = meta.get("tokenizer.ggml.scores")
            scores = [float(s) for s in scores] if scores is not None else [0.0] * n
            if len(scores) < n:
                raise ModelFormatError(f"tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
            unk = token_id("tokenizer.ggml.unknown_token_id", 0)
            backend = _build_spm(tokens, scores, types, None if unk is None else tokens[unk])
            add_bos_default, add_space_prefix_default = True, True
            bos_default, eos_default = 1, 2  # llama.cpp's SPM defaults

        bos_id = token_id("tokenizer.ggml.bos_token_id", bos_default)
        eos_id = token_id("tokenizer.ggml.eos_token_id", eos_default)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default))
        if add_bos and bos_id is None:
            raise ModelFormatError("tokenizer.ggml.add_bos_token is true, but there is no BOS token id")
        add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", add_space_prefix_default))

        # End of generation, as llama.cpp collects special_eog_ids: eos, eot, eom and the
        # well-known end-of-turn strings; those are forced to control type like llama.cpp does.
        eot = {i for i in (eos_id, token_id("tokenizer.ggml.eot_token_id", None),
                           token_id("tokenizer.ggml.eom_token_id", None)) if i is not None}
        for text in EOG_TEXTS:
            i = vocab.get(text)
            if i is not None:
                eot.add(i)
                if types[i] not in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
                    types[i] = TOKEN_CONTROL

        return cls(model=model, pre=pre_name, tokens=tokens, token_types=types, backend=backend,
                   bos_id=bos_id, eos_id=eos_id, eot_ids=frozenset(eot), add_bos=add_bos,
                   add_space_prefix=add_space_prefix)

    # --- properties -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary (ids are ``0 .. vocab_size - 1``)."""
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the model has none."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence id, or None if the model has none."""
        return self._eos_id

    @property
    def eot_ids(self) -> frozenset[int]:
        """Ids that end the model's turn: generation stops on any of them."""
        return self._eot_ids

    @property
    def max_token_bytes(self) -> int:
        """The most text bytes one token stands for (a special token's string included): a text of
        n bytes never encodes to fewer than n / max_token_bytes tokens."""
        if self._max_token_bytes is None:
            self._max_token_bytes = max(max(map(len, self._bytes)),
                                        max((len(piece.encode()) for _, piece, _ in self._specials), default=1))
        return self._max_token_bytes

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry for ``token_id`` as stored (e.g. ``"Ġworld"``, ``"▁the"``,
        ``"<|im_start|>"``). For the text it stands for use :meth:`decode`."""
        return self._tokens[self._check_id(token_id)]

    def piece_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self._piece_to_id.get(piece)

    def token_type(self, token_id: int) -> int:
        """``tokenizer.ggml.token_type`` of an id (``TOKEN_*`` constants)."""
        return self._types[self._check_id(token_id)]

    def is_special(self, token_id: int) -> bool:
        """True for control, user-defined and unknown tokens."""
        return self.token_type(token_id) in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)

    # --- encode -----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Token ids for ``text``, as llama.cpp's ``llama_tokenize``.

        ``add_bos``: prepend the BOS id; None follows ``tokenizer.ggml.add_bos_token``.
        ``parse_special``: control-token strings in the text (``"<|im_start|>"``) become their
        single ids; otherwise they are tokenized as ordinary text. User-defined tokens are
        always matched, as llama.cpp does.
        """
        if not isinstance(text, str):
            raise InvalidArgument(f"text to tokenize must be a string, not {type(text).__name__}")
        ids: list[int] = []
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos:
            if self._bos_id is None:
                raise InvalidArgument("this model has no BOS token")
            ids.append(self._bos_id)
        if not text:
            return ids
        fragments = self._partition(text, parse_special)
        if self.model == "llama":
            # llama.cpp (tokenize, LLAMA_VOCAB_TYPE_SPM): a space is prepended to the first
            # fragment and to any fragment right after a special token.
            prev_special = True
            raw: list[str | int] = []
            for f in fragments:
                if isinstance(f, str):
                    if self.add_space_prefix and prev_special:
                        f = " " + f
                    raw.append(f.replace(" ", SPACE_MARK))
                    prev_special = False
                else:
                    raw.append(f)
                    prev_special = True
            fragments = raw
        # One fragment at a time, through encode_batch: unlike encode, it releases the GIL, so a
        # long prompt does not stall the engine thread or other clients' streams. With
        # TOKENIZERS_PARALLELISM=false (set at import) it stays serial: tokenizers' rayon pool
        # would compete with the compute threads, and warns (then goes serial) after a fork.
        backend = self._backend
        for f in fragments:
            if isinstance(f, str):
                ids.extend(backend.encode_batch([f], add_special_tokens=False)[0].ids)
            else:
                ids.append(f)
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split ``text`` into raw strings and special-token ids (``tokenizer_st_partition``):
        for each special string, longest first, every occurrence in the remaining raw
        fragments is cut out, left to right."""
        fragments: list[str | int] = [text]
        for tid, piece, needs_parse in self._specials:
            if needs_parse and not parse_special:
                continue
            if piece not in text:  # cheap filter on the whole text
                continue
            out: list[str | int] = []
            for f in fragments:
                if isinstance(f, int) or piece not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(piece)):
                    if k:
                        out.append(tid)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    # --- decode -----------------------------------------------------------------------------

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes ``token_id`` stands for (possibly part of a UTF-8 character)."""
        token_id = self._check_id(token_id)
        if skip_special and token_id in self._skipped:
            return b""
        return self._bytes[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text for a sequence of ids (llama.cpp's ``llama_detokenize``).

        ``skip_special`` drops control and unknown tokens (BOS, ``<|im_end|>``...). Bytes that
        are not valid UTF-8 become U+FFFD. For SentencePiece models with ``add_space_prefix``,
        the space that encoding prepended is removed from the first token (after a leading BOS
        when ``skip_special``), so ``decode(encode(text)) == text``.
        """
        ids = [self._check_id(i) for i in ids]
        strip = self.add_space_prefix
        if skip_special:
            if ids and ids[0] == self._bos_id:
                ids = ids[1:]
            parts = [self._bytes[i] for i in ids if i not in self._skipped]
        else:
            parts = [self._bytes[i] for i in ids]
        if strip and parts and ids and self._types[ids[0]] in (TOKEN_NORMAL, TOKEN_BYTE) \
                and parts[0].startswith(b" "):
            parts[0] = parts[0][1:]
        return b"".join(parts).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` for one generated sequence."""
        return StreamDecoder(self, skip_special=skip_special)

    def _piece_bytes(self, i: int) -> bytes:
        """What id ``i`` renders to with special tokens shown (llama.cpp ``token_to_piece``)."""
        text, kind = self._tokens[i], self._types[i]
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN):
            return text.encode("utf-8")
        if kind == TOKEN_BYTE:
            value = _byte_token_value(text)
            return bytes([value]) if value is not None else text.encode("utf-8")
        if kind != TOKEN_NORMAL:
            return b""  # unused / undefined tokens render as nothing, as in llama.cpp
        if self.model == "llama":
            return text.replace(SPACE_MARK, " ").encode("utf-8")
        # Byte-level BPE: each character stands for one byte. A character outside the map
        # (not expected in a byte-level vocabulary) is kept as its UTF-8.
        dec = BYTE_DECODER
        if all(c in dec for c in text):
            return bytes(dec[c] for c in text)
        return b"".join(bytes([dec[c]]) if c in dec else c.encode("utf-8") for c in text)

    def _check_id(self, token_id: Any) -> int:
        """``token_id`` as an int (numpy integers accepted), or InvalidArgument."""
        try:
            value = operator.index(token_id)
        except TypeError:
            value = None
        if value is None or isinstance(token_id, bool) or not 0 <= value < len(self._tokens):
            raise InvalidArgument(
                f"token id {token_id!r} is out of range: the vocabulary has {len(self._tokens)} "
                f"tokens (ids 0..{len(self._tokens) - 1})", field="token_ids")
        return value

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self._bos_id}, eos_id={self._eos_id}, eot_ids={sorted(self._eot_ids)})")


class StreamDecoder:
    """Incremental detokenizer for streaming: text out as soon as it is complete UTF-8.

    A byte-level token may end in the middle of a multi-byte character (an emoji is often two
    or three tokens); those bytes are held back until the character is complete. Invalid
    sequences become U+FFFD as soon as they are known to be invalid. Unlike
    :meth:`Tokenizer.decode`, a SentencePiece token's leading space is kept (llama.cpp's
    ``token_to_piece``): a stream continues a prompt, so that space is real.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly "")."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id, self._skip_special))

    def flush(self) -> str:
        """End of stream: return whatever is held back (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# --- backends ---------------------------------------------------------------------------------

def _build_bpe(vocab: dict[str, int], merges_meta: Sequence[str] | None, pre: PreTokenizer) -> HFTokenizer:
    """Byte-level BPE: llama.cpp's regex splits, GPT-2 byte mapping, then the ranked merges."""
    if not merges_meta:
        raise ModelFormatError("a gpt2 tokenizer needs tokenizer.ggml.merges")
    merges = []
    for rank, m in enumerate(merges_meta):
        # As llama.cpp: split at the first space after the first character.
        pos = m.find(" ", 1)
        if pos < 0:
            raise ModelFormatError(f"tokenizer.ggml.merges[{rank}] = {m!r} is not two tokens")
        merges.append((m[:pos], m[pos + 1:]))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.ignore_merges, fuse_unk=False)
    except Exception as e:  # tokenizers raises plain Exception for bad merges
        raise ModelFormatError(f"inconsistent BPE vocabulary / merges: {e}") from e
    tok = HFTokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in pre.regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


def _build_spm(tokens: list[str], scores: list[float], types: list[int], unk: str | None) -> HFTokenizer:
    """llama.cpp's SPM tokenizer as a BPE whose merge ranks come from the piece scores.

    llm_tokenizer_spm_session merges, at each step, the adjacent pair whose concatenation is
    the highest-scoring vocabulary piece (ties: leftmost). A merge list holding every split
    ``a + b`` of every piece, ordered by the piece's score, makes HF's BPE pick the same pair;
    characters missing from the vocabulary come out as ``<0xXX>`` tokens (byte fallback), like
    llama.cpp's resegment.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for i, t in enumerate(tokens):
        if len(t) < 2 or types[i] == TOKEN_BYTE:
            continue
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                candidates.append((-scores[i], i, k, a, b))
    candidates.sort()
    merges = [(a, b) for _, _, _, a, b in candidates]
    has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=has_bytes, fuse_unk=False)
    return HFTokenizer(bpe)
