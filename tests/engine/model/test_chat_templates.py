"""Real chat templates render as llama.cpp renders them (tests/fixtures/chat_llamacpp.json,
made by llama-server's /apply-template: make_chat_references.py), system messages included;
a template without a system role gets it folded into the next message as llama.cpp does."""

from __future__ import annotations

import json

import pytest
from paths import FIXTURES

from engine.model.chat import ChatTemplate, fold_system_message

REF = json.loads((FIXTURES / "chat_llamacpp.json").read_text())
SYSTEM_REFUSED = {"gemma2"}  # raises on a system role: llama.cpp folds it


@pytest.mark.parametrize("name", sorted(REF["templates"]))
def test_renders_as_llama_cpp(name):
    case = REF["templates"][name]
    chat = ChatTemplate(case["source"], REF["bos_token"], REF["eos_token"])
    assert chat.supports_system_role == (name not in SYSTEM_REFUSED)
    for messages, want in zip(REF["conversations"], case["llama_cpp"]):
        assert chat.render(messages, add_generation_prompt=True, **REF["kwargs"]) == want, (name, messages)


def test_smollm2_template_is_the_files():
    """The SmolLM2 case is the default model's own template (its GGUF's tokenizer.chat_template)."""
    from engine.model.gguf_file import ModelFile
    from engine.model.registry import DEFAULT_MODEL, resolve
    try:
        path = resolve(DEFAULT_MODEL, pull_missing=False)
    except Exception:
        pytest.skip("the default model is not in the cache")
    assert ModelFile(path).metadata["tokenizer.chat_template"] == REF["templates"]["smollm2"]["source"]


def test_system_role_probe_and_fold():
    ignores = ChatTemplate("{% for m in messages %}{% if m.role != 'system' %}[{{ m.content }}]{% endif %}{% endfor %}")
    refuses = ChatTemplate("{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}{% endif %}"
                           "{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}")
    keeps = ChatTemplate("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}")
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert not ignores.supports_system_role and not refuses.supports_system_role and keeps.supports_system_role
    assert ignores.render(msgs) == "[S\nU]"
    assert refuses.render(msgs) == "[user:S\nU]"
    assert keeps.render(msgs) == "[system:S][user:U]"
    assert fold_system_message(msgs[:1]) == []  # alone it is dropped, as llama.cpp does
    assert fold_system_message(msgs[1:]) == msgs[1:]


# llama.cpp's built-in templates by name (--no-jinja --chat-template NAME), as llama-server renders them
BUILTINS = json.loads((FIXTURES / "chat_builtins_llamacpp.json").read_text())


def test_every_builtin_has_a_llama_cpp_reference():
    from engine.model.chat_builtins import BUILTIN_TEMPLATES
    assert sorted(BUILTINS["templates"]) == sorted(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("name", sorted(BUILTINS["templates"]))
def test_builtin_renders_as_llama_cpp(name):
    from engine.model.chat import BuiltinChatTemplate
    chat = BuiltinChatTemplate(name)
    for messages, want in zip(BUILTINS["conversations"], BUILTINS["templates"][name], strict=True):
        assert chat.render(messages, add_generation_prompt=True) == want, (name, messages)


def test_declared_builtin_wins_over_the_files_template_and_unknown_is_refused():
    from engine.errors import InvalidArgument
    from engine.model.chat import BuiltinChatTemplate, ChatTemplate, chat_template_for
    meta = {"tokenizer.chat_template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"}
    msgs = [{"role": "user", "content": "Hi"}]
    assert isinstance(chat_template_for(meta), ChatTemplate)
    assert chat_template_for(meta).render(msgs) == "[Hi]"
    assert chat_template_for(meta, "gemma").render(msgs) == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert chat_template_for({}) is None  # no template, none declared: chat is refused (NoChatTemplate)
    assert isinstance(chat_template_for({}, "chatml"), BuiltinChatTemplate)
    with pytest.raises(InvalidArgument, match="unknown chat template 'gemma3' .*built-in names: chatml, gemma"):
        chat_template_for({}, "gemma3")
