"""Chat templates (engine/model/chat.py): the model's own template in the Jinja sandbox, hostile
templates, message validation. tests/engine/model/test_chat_templates.py compares renderings with
llama.cpp's."""

import json

import pytest
from paths import FIXTURES

from engine.errors import InvalidArgument
from engine.model.chat import ChatTemplate, validate_messages
from engine.model.tokenizer import Tokenizer

GENERATION_CASES = json.loads((FIXTURES / "generation.json").read_text())["cases"]


@pytest.fixture(scope="session")
def tok(model_file):
    return Tokenizer.from_metadata(model_file.metadata)


@pytest.fixture(scope="session")
def chat(model_file):
    return ChatTemplate.from_metadata(model_file.metadata)


SMOLLM_SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                 "trained by Hugging Face<|im_end|>\n")
USER_2P2 = [{"role": "user", "content": "What is 2+2?"}]


def test_model_template_injects_default_system_prompt(tok, chat):
    reference = GENERATION_CASES[2]
    assert reference["prompt"] == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    text = chat.render(USER_2P2)
    # SmolLM2's template adds its default system turn; the reference prompt has none.
    assert text == SMOLLM_SYSTEM + reference["prompt"]
    ids = tok.encode(text, parse_special=True)
    assert ids == tok.encode(SMOLLM_SYSTEM, parse_special=True) + reference["prompt_ids"]
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|>, <|im_end|>


def test_model_template_keeps_given_system_prompt(chat):
    msgs = [{"role": "system", "content": "Be brief."}, *USER_2P2]
    assert chat.render(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


def test_a_file_without_a_template_has_none(model_file):
    meta = {k: v for k, v in model_file.metadata.items() if k != "tokenizer.chat_template"}
    assert ChatTemplate.from_metadata(meta) is None
    assert ChatTemplate.from_metadata(model_file.metadata) is not None


def test_template_helpers():
    t = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
        "{{ strftime_now('%Y') | length }}{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    out = t.render([{"role": "user", "content": "café"}, {"role": "user", "content": "x"}])
    assert out == '<s>{"role": "user", "content": "café"}4</s>'


def test_raise_exception_becomes_invalid_argument():
    t = ChatTemplate("{% if messages[0]['role'] != 'system' %}"
                     "{{ raise_exception('Conversation must start with a system message') }}{% endif %}")
    with pytest.raises(InvalidArgument, match="must start with a system message"):
        t.render(USER_2P2)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('PWNED', 'w') }}",
    "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ messages.append({'role': 'x'}) }}",  # immutable sandbox: no mutation either
    "{{ messages[0].update({'role': 'x'}) }}",
])
def test_hostile_template_is_refused(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgument):
        ChatTemplate(source).render(USER_2P2)
    assert not (tmp_path / "PWNED").exists()


def test_template_syntax_error_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="does not compile: line 1"):
        ChatTemplate("{% for m in messages %}{{ m }")


def test_template_runtime_error_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").render(USER_2P2)


@pytest.mark.parametrize("messages", [
    [], "hello", [["user", "hi"]], [{"role": "", "content": "hi"}], [{"content": "hi"}],
    [{"role": 3, "content": "hi"}], [{"role": "user", "content": None}], [{"role": "user"}],
])
def test_bad_messages_are_invalid_argument(chat, messages):
    with pytest.raises(InvalidArgument):
        chat.render(messages)


def test_validate_messages_copies():
    msgs = [{"role": "user", "content": "hi", "name": "bob"}]
    out = validate_messages(msgs)
    assert out == msgs and out[0] is not msgs[0]
