"""The plan's `model_options` section: the chat template as a declared decision (llama.cpp's
`--chat-template NAME`). Schema evolution keeps stored hashes; a registry entry's declared
template is written into new plans; an unknown name is refused naming the field; a model
without a template and none declared still refuses chat; a new version's template applies live."""

from __future__ import annotations

import pytest

from engine.control.control_plane import ControlPlane, GenerateInput
from engine.control.plan_store import SqlitePlanStore
from engine.control.plans import (
    LATER_FIELDS,
    LATER_SECTIONS,
    InvalidPlan,
    ModelInfo,
    PlanEnvironment,
    canonical_json,
    normalize,
    plan_hash,
    prepare,
)
from engine.model.chat import NoChatTemplate
from engine.model.registry import DEFAULT_MODEL, REGISTRY
from protos.planengine.v1 import plan_pb2

INFO = ModelInfo(context_length=8192, n_layers=30, n_kv_heads=3, head_dim=64)


@pytest.fixture
def env() -> PlanEnvironment:
    return PlanEnvironment.with_models({DEFAULT_MODEL: INFO, "gemma3-270m": INFO, "/models/x.gguf": INFO})


def test_model_options_fields_are_later_fields_introduced_empty():
    fields = plan_pb2.ModelOptions.DESCRIPTOR.fields
    assert {f.name for f in fields} == {p.split(".")[1] for p in LATER_FIELDS if p.startswith("model_options.")}
    assert all(f.has_presence for f in fields) and "model_options" in LATER_SECTIONS
    assert LATER_FIELDS["model_options.chat_template"] == ""


def test_the_chat_template_is_content_and_empty_is_the_files_own(env):
    base = normalize(plan_pb2.ExecutionPlan(id="p"), env)
    assert not base.model_options.HasField("chat_template")  # the default model declares none
    assert b"model_options" not in canonical_json(base)
    empty = plan_pb2.ExecutionPlan()
    empty.CopyFrom(base)
    empty.model_options.chat_template = ""  # the introduction value, said out loud
    assert plan_hash(empty) == plan_hash(base)
    named = plan_pb2.ExecutionPlan()
    named.CopyFrom(base)
    named.model_options.chat_template = "chatml"
    assert b'"model_options":{"chat_template":"chatml"}' in canonical_json(named)
    assert plan_hash(named) != plan_hash(base)


def test_normalize_writes_the_registry_entrys_declared_template(env):
    assert REGISTRY["gemma3-270m"].chat_template == "gemma" and "base" in REGISTRY["gemma3-270m"].description
    gemma = normalize(plan_pb2.ExecutionPlan(id="p", model="gemma3-270m"), env)
    assert gemma.model_options.chat_template == "gemma"
    # declared in the plan, it is declared: another name, or "" (the file's own: refused), is kept
    other = normalize(plan_pb2.ExecutionPlan(id="p", model="gemma3-270m",
                                             model_options=plan_pb2.ModelOptions(chat_template="chatml")), env)
    assert other.model_options.chat_template == "chatml"
    own = normalize(plan_pb2.ExecutionPlan(id="p", model="gemma3-270m",
                                           model_options=plan_pb2.ModelOptions(chat_template="")), env)
    assert own.model_options.HasField("chat_template") and own.model_options.chat_template == ""
    # a path names a file, not a registry entry: nothing is declared for it
    path = normalize(plan_pb2.ExecutionPlan(id="p", model="/models/x.gguf"), env)
    assert not path.model_options.HasField("chat_template")


def test_an_unknown_template_name_is_refused_naming_the_field(env):
    plan = plan_pb2.ExecutionPlan(id="p", model_options=plan_pb2.ModelOptions(chat_template="gemma3"))
    with pytest.raises(InvalidPlan) as err:
        prepare(plan, env)
    (violation,) = err.value.violations
    assert violation.field == "model_options.chat_template"
    assert "unknown chat template 'gemma3'" in violation.description and "gemma, " in violation.description


def test_chat_is_refused_until_a_template_is_declared_then_applies_live(tmp_path):
    """A tiny model whose file has no template: chat is refused as before; a new plan version
    declaring llama.cpp's chatml makes chat render with it, without reloading the model."""
    from tiny_gguf import write_tiny_gguf
    tiny = write_tiny_gguf(tmp_path / "bare.gguf", chat_template=None)
    control = ControlPlane(SqlitePlanStore(tmp_path / "plans.db"), PlanEnvironment())
    chat = GenerateInput(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    try:
        first = control.start(plan_pb2.ExecutionPlan(id="default", model=str(tiny)))
        assert not first.model_options.HasField("chat_template")
        with pytest.raises(NoChatTemplate, match=r"has no chat template .*model_options.chat_template"):
            control.generate(chat)
        runtime = control.runtime
        patch = plan_pb2.ExecutionPlan()
        patch.CopyFrom(first)
        for name in ("version", "hash", "created_at"):
            patch.ClearField(name)
        patch.model_options.chat_template = "chatml"
        second, _ = control.submit_plan(patch, activate=True, actor="op")
        assert control.runtime is runtime and second.hash != first.hash  # applied live
        template = runtime.model.chat_template
        assert template is not None and template.source == "built-in chatml"
        assert template.render(chat.messages) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        handle, _ = control.generate(chat)  # accepted now
    finally:
        control.close(1)
