"""Chat templates: a list of messages -> the prompt text the model was trained on.

GGUF files carry the Hugging Face Jinja template in ``tokenizer.chat_template``. We render it
the way ``transformers``' ``apply_chat_template`` does: a sandboxed Jinja environment with
``trim_blocks`` / ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}``
block that just renders its body, a ``tojson`` filter that keeps non-ASCII text, and the
``raise_exception`` / ``strftime_now`` globals. The template is untrusted input (it comes with
a downloaded file): the immutable sandbox refuses attribute access such as ``__class__`` and
mutation of the arguments, and every failure becomes :class:`InvalidArgument`.

Two things follow llama.cpp's chat path (common/chat.cpp, its jinja route):

- a template that does not support a system role (it ignores the message, or refuses it) gets a
  leading system message folded into the next message: ``system + "\\n" + content``
  (``workaround::system_message_not_supported``; the role is probed as its caps.cpp does);
- a model without ``tokenizer.chat_template`` is not given a stand-in: llama.cpp falls back to
  ChatML, which a model not trained on it answers with plausible nonsense, so chat messages
  are refused with :class:`NoChatTemplate` and a text prompt still works.

What llama.cpp's ``--chat-template NAME`` does is a declared decision here: the plan's
``model_options.chat_template`` names one of llama.cpp's built-in templates (chat_builtins.py),
which then renders the model's chat messages in place of the file's own (``chat_template_for``);
empty, the file's own template is used or chat is refused as above.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from jinja2 import nodes

from engine.errors import FailedPrecondition, InvalidArgument, shown
from engine.model.chat_builtins import BUILTIN_TEMPLATES

# The system-role probe's message content (llama.cpp's caps.cpp renders "System message").
_SYSTEM_PROBE = "System message \x1f probe"


class TemplateError(InvalidArgument):
    """A chat template failed to compile or render."""


class NoChatTemplate(FailedPrecondition):
    """Chat messages for a model whose file has no chat template."""


class _TemplateRaised(Exception):
    """Raised by the template's own ``raise_exception(message)``."""


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # HF's override: Jinja's own tojson escapes HTML characters, which templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template. Thread-safe; compile once per model.

    ``bos_token`` / ``eos_token`` are the strings of the model's BOS / EOS tokens, passed to
    the template as HF does (many templates start with ``{{ bos_token }}``).
    """

    def __init__(self, template: str, bos_token: str = "", eos_token: str = ""):
        if not isinstance(template, str) or not template:
            raise TemplateError("chat template must be a non-empty string")
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"chat template does not compile: line {e.lineno}: {e.message}") from e
        self.supports_system_role = self._probe_system_role()

    def _probe_system_role(self) -> bool:
        """llama.cpp's capability check: render [system, user] and see whether the system
        message's content is used. A template that ignores it, or raises, does not support it."""
        probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "User message"}]
        try:
            return _SYSTEM_PROBE in self._template.render(messages=probe, bos_token="", eos_token="",
                                                          add_generation_prompt=True)
        except Exception:
            return False

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ChatTemplate | None:
        """The model's ``tokenizer.chat_template``; None when the file has none."""
        tokens = meta.get("tokenizer.ggml.tokens") or []

        def piece(key: str) -> str:
            i = meta.get(key)
            return str(tokens[i]) if isinstance(i, int) and 0 <= i < len(tokens) else ""

        template = meta.get("tokenizer.chat_template")
        if not template:
            return None
        return cls(template, piece("tokenizer.ggml.bos_token_id"), piece("tokenizer.ggml.eos_token_id"))

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **context: Any) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}, ...]``).

        ``add_generation_prompt`` appends the header of the assistant's turn. Extra keyword
        arguments (``tools``, ``documents``, ...) are passed to the template as variables.
        Raises :class:`InvalidArgument` for malformed messages or a template that fails.
        """
        checked = validate_messages(messages)
        if not self.supports_system_role:
            checked = fold_system_message(checked)
        variables = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            **context,
            "messages": checked,
            "add_generation_prompt": bool(add_generation_prompt),
        }
        try:
            return self._template.render(**variables)
        except _TemplateRaised as e:
            raise TemplateError(f"chat template rejected the conversation: {e}", field="messages") from e
        except jinja2.sandbox.SecurityError as e:
            raise TemplateError(f"chat template attempted an unsafe operation: {e}") from e
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        except Exception as e:  # a template can raise anything (TypeError, ZeroDivision...)
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


class BuiltinChatTemplate:
    """One of llama.cpp's named templates (chat_builtins.py), declared for a model. It keeps
    system messages its own way and takes no template variables, as llama.cpp's."""

    def __init__(self, name: str):
        if name not in BUILTIN_TEMPLATES:
            raise InvalidArgument(unknown_builtin(name), field="chat_template")
        self.name = name
        self.source = f"built-in {name}"
        self._render = BUILTIN_TEMPLATES[name]

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               **context: Any) -> str:
        return self._render(validate_messages(messages), bool(add_generation_prompt))


def unknown_builtin(name: str) -> str:
    return f"unknown chat template {shown(name)} (llama.cpp's built-in names: {', '.join(BUILTIN_TEMPLATES)})"


def chat_template_for(meta: Mapping[str, Any], declared: str = "") -> ChatTemplate | BuiltinChatTemplate | None:
    """What a model's chat messages render with: the built-in template `declared` names (as
    llama.cpp's ``--chat-template NAME``, it wins over the file's own); without one, the file's
    ``tokenizer.chat_template``; None when there is neither (chat is refused)."""
    if declared:
        return BuiltinChatTemplate(declared)
    return ChatTemplate.from_metadata(meta)


def fold_system_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A leading system message merged into the next message, as llama.cpp does for a
    template without a system role (``system + "\\n" + content``); alone, it is dropped."""
    if not messages or messages[0]["role"] != "system":
        return messages
    if len(messages) == 1:
        return []
    merged = {**messages[1], "content": messages[0]["content"] + "\n" + messages[1]["content"]}
    return [merged, *messages[2:]]


def no_chat_template(model: str) -> NoChatTemplate:
    return NoChatTemplate(f"{model} has no chat template (GGUF key tokenizer.chat_template), so chat messages "
                          f"cannot be rendered as the model was trained; send a text prompt instead, or declare "
                          f"one of llama.cpp's built-in templates (the plan's model_options.chat_template, the "
                          f"CLI's --chat-template: {', '.join(BUILTIN_TEMPLATES)})")


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check ``messages`` and return plain-dict copies (the template sees no caller objects)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidArgument("messages must be a list of {role, content} objects", field="messages")
    if not messages:
        raise InvalidArgument("messages must not be empty", field="messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgument(f"messages[{k}] must be an object with role and content, "
                                  f"not {type(m).__name__}", field="messages")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidArgument(f"messages[{k}].role must be a non-empty string", field="messages")
        if not isinstance(content, str):
            raise InvalidArgument(f"messages[{k}].content must be a string", field="messages")
        out.append(dict(m))
    return out
