"""llama.cpp's built-in chat templates, by the names its ``--chat-template NAME`` takes.

An operator names one for a file without its own template (a base model, a converted file that
lost it) in the plan's ``model_options.chat_template``; see chat.py for where each applies.
Each function renders a conversation exactly as ``llm_chat_apply_template`` in llama.cpp's
src/llama-chat.cpp does for that name (the path llama-server takes with ``--no-jinja
--chat-template NAME``; with ``--jinja``, its default, a name other than ``chatml`` is taken
as the Jinja source itself). Checked character for character against llama-server's
``/apply-template`` (tests/fixtures/chat_builtins_llamacpp.json, make_chat_references.py).

None of them inserts a BOS token (the tokenizer adds it, as llama.cpp's does), and each keeps
system messages its own way (none is dropped): the ``system_message_not_supported`` folding of
chat.py does not apply. Messages arrive checked (``chat.validate_messages``); any role string is
written as given, as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Messages = Sequence[dict[str, Any]]

# C's isspace in the "C" locale: llama-chat.cpp's trim() strips these bytes and no others.
_C_SPACE = " \t\n\v\f\r"


def _trim(text: str) -> str:
    return text.strip(_C_SPACE)


def chatml(messages: Messages, add_generation_prompt: bool) -> str:
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def gemma(messages: Messages, add_generation_prompt: bool) -> str:
    """google/gemma-7b-it's turns, "assistant" written "model". Gemma has no system role:
    system messages (trimmed, concatenated) open the next non-model turn, then a blank line."""
    out, system = [], ""
    for m in messages:
        if m["role"] == "system":
            system += _trim(m["content"])
            continue
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"<start_of_turn>{role}\n")
        if system and role != "model":
            out.append(system + "\n\n")
            system = ""
        out.append(_trim(m["content"]) + "<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


def llama3(messages: Messages, add_generation_prompt: bool) -> str:
    out = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_trim(m['content'])}<|eot_id|>"
                  for m in messages)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def _llama2(system_role: bool, bos_inside: bool = False, strip: bool = False) -> Callable[[Messages, bool], str]:
    """Llama 2's [INST] turns; the variants differ in system support, a "<s>" before each later
    turn, and trimming. No generation prompt: a turn ends open after " [/INST]"."""
    def render(messages: Messages, add_generation_prompt: bool) -> str:
        out, inside = ["[INST] "], True  # the first turn's BOS is the tokenizer's
        for m in messages:
            content = _trim(m["content"]) if strip else m["content"]
            if not inside:
                inside = True
                out.append("<s>[INST] " if bos_inside else "[INST] ")
            if m["role"] == "system":
                out.append(f"<<SYS>>\n{content}\n<</SYS>>\n\n" if system_role else content + "\n")
            elif m["role"] == "user":
                out.append(content + " [/INST]")
            else:
                out.append(content + "</s>")
                inside = False
        return "".join(out)
    return render


def _mistral(leading: str, trailing: str, trim_assistant: bool) -> Callable[[Messages, bool], str]:
    """Mistral's v1 / v3 / v3-tekken [INST] turns (mistralai's cookbook, templates.md); a system
    message opens the turn, followed by a blank line. No generation prompt."""
    def render(messages: Messages, add_generation_prompt: bool) -> str:
        out, inside = [], False
        for m in messages:
            if not inside:
                out.append(f"{leading}[INST]{trailing}")
                inside = True
            if m["role"] == "system":
                out.append(m["content"] + "\n\n")
            elif m["role"] == "user":
                out.append(m["content"] + leading + "[/INST]")
            else:
                content = _trim(m["content"]) if trim_assistant else m["content"]
                out.append(trailing + content + "</s>")
                inside = False
        return "".join(out)
    return render


def _mistral_v7(space: str) -> Callable[[Messages, bool], str]:
    """Mistral's v7 ([SYSTEM_PROMPT] blocks); v7-tekken drops the spaces. No generation prompt."""
    def render(messages: Messages, add_generation_prompt: bool) -> str:
        out = []
        for m in messages:
            if m["role"] == "system":
                out.append(f"[SYSTEM_PROMPT]{space}{m['content']}[/SYSTEM_PROMPT]")
            elif m["role"] == "user":
                out.append(f"[INST]{space}{m['content']}[/INST]")
            else:
                out.append(f"{space}{m['content']}</s>")
        return "".join(out)
    return render


def phi3(messages: Messages, add_generation_prompt: bool) -> str:
    out = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return out + ("<|assistant|>\n" if add_generation_prompt else "")


def zephyr(messages: Messages, add_generation_prompt: bool) -> str:
    out = "".join(f"<|{m['role']}|>\n{m['content']}<|endoftext|>\n" for m in messages)
    return out + ("<|assistant|>\n" if add_generation_prompt else "")


# llama.cpp's name -> renderer: those of the model families this engine runs.
BUILTIN_TEMPLATES: dict[str, Callable[[Messages, bool], str]] = {
    "chatml": chatml,
    "gemma": gemma,
    "llama2": _llama2(system_role=False),
    "llama2-sys": _llama2(system_role=True),
    "llama2-sys-bos": _llama2(system_role=True, bos_inside=True),
    "llama2-sys-strip": _llama2(system_role=True, strip=True),
    "llama3": llama3,
    "mistral-v1": _mistral(" ", " ", trim_assistant=False),
    "mistral-v3": _mistral("", " ", trim_assistant=True),
    "mistral-v3-tekken": _mistral("", "", trim_assistant=False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "phi3": phi3,
    "zephyr": zephyr,
}
