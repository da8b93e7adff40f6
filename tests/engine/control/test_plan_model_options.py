"""The plan's `model_options` section: the chat template as a declared decision (llama.cpp's
`--chat-template NAME`). Schema evolution keeps stored hashes; nothing writes a template the
plan does not declare (not even for the base Gemma 3 270M, whose file has none); an unknown name
is refused naming the field; a model without a template and none declared still refuses chat;
a new version's template applies live; a model change drops the old model's template."""

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
    apply_patch,
    canonical_json,
    normalize,
    plan_hash,
    prepare,
)
from engine.model.chat import NoChatTemplate
from engine.model.registry import DEFAULT_MODEL
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


def test_normalize_declares_no_template_the_plan_does_not(env):
    """The base Gemma 3 270M's file has no template: its plan refuses chat (a base model sent
    Gemma's turns answers nonsense) until the operator declares one, which is then kept."""
    for model in ("gemma3-270m", "/models/x.gguf", DEFAULT_MODEL):
        plan = normalize(plan_pb2.ExecutionPlan(id="p", model=model), env)
        assert not plan.model_options.HasField("chat_template"), model
    gemma = normalize(plan_pb2.ExecutionPlan(id="p", model="gemma3-270m",
                                             model_options=plan_pb2.ModelOptions(chat_template="gemma")), env)
    assert gemma.model_options.chat_template == "gemma"


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


def _stored_before_model_options(env: PlanEnvironment, model: str) -> plan_pb2.ExecutionPlan:
    """A plan for `model` as it was stored before field 18: normalized, no model_options."""
    plan = normalize(plan_pb2.ExecutionPlan(id="p", model=model), env)
    plan.ClearField("model_options")
    return plan


def test_a_patch_does_not_write_a_template_into_a_plan_stored_before_the_field(env):
    """A gemma3-270m plan stored before model_options refuses chat (the file has no template).
    A version patched from it (an operator's patch, an agent's suggestion) changes what the
    patch names and nothing else: no template appears, and the hash is the one the patch alone gives."""
    stored = _stored_before_model_options(env, "gemma3-270m")
    derived = prepare(apply_patch(stored, plan_pb2.ExecutionPlan(sampling={"top_p": 0.5}), ["sampling.top_p"]), env)
    assert derived.model_options.chat_template == ""
    expected = plan_pb2.ExecutionPlan()
    expected.CopyFrom(stored)
    expected.sampling.top_p = 0.5
    assert plan_hash(derived) == plan_hash(expected)
    same = prepare(apply_patch(stored, stored, ["sampling.top_p"]), env)
    assert plan_hash(same) == plan_hash(stored)  # no change is no change (the reviewer's no_change)


def test_the_template_follows_a_model_change_unless_the_patch_names_it(env):
    gemma = normalize(plan_pb2.ExecutionPlan(id="p", model="gemma3-270m",
                                             model_options=plan_pb2.ModelOptions(chat_template="gemma")), env)
    # gemma's turns are not the default model's: its own file's template applies, not "gemma"
    to_default = prepare(apply_patch(gemma, plan_pb2.ExecutionPlan(model=DEFAULT_MODEL), ["model"]), env)
    assert not to_default.model_options.HasField("chat_template")
    to_gemma = prepare(apply_patch(to_default, plan_pb2.ExecutionPlan(model="gemma3-270m"), ["model"]), env)
    assert not to_gemma.model_options.HasField("chat_template")  # declared again, or refused
    named = plan_pb2.ExecutionPlan(model=DEFAULT_MODEL, model_options=plan_pb2.ModelOptions(chat_template="chatml"))
    both = prepare(apply_patch(gemma, named, ["model", "model_options.chat_template"]), env)
    assert both.model_options.chat_template == "chatml"
    kept = prepare(apply_patch(gemma, plan_pb2.ExecutionPlan(sampling={"top_p": 0.5}), ["sampling.top_p"]), env)
    assert kept.model_options.chat_template == "gemma"


def test_an_unknown_template_name_is_shown_cut():
    plan = plan_pb2.ExecutionPlan(id="p", model_options=plan_pb2.ModelOptions(chat_template="x" * 100_000))
    with pytest.raises(InvalidPlan) as err:
        prepare(plan, PlanEnvironment.with_models({DEFAULT_MODEL: INFO}))
    (violation,) = err.value.violations
    assert "(100000 characters)" in violation.description and len(violation.description) < 500


def test_an_agent_without_authority_over_the_template_does_not_change_it(tmp_path, tiny):
    """The WeOS path: an agent that may change only `sampling`, on a gemma3-270m plan stored
    before model_options. Its no-op suggestion is no change, and its real one leaves the template."""
    from engine.control.agents import AgentPolicy, SuggestionLog, SuggestionReviewer
    from engine.control.plans import GgufModelReader
    from protos.planengine.v1 import suggestion_pb2 as sg

    class TinyAsGemma(PlanEnvironment):
        def resolve_model(self, name: str, pull_missing: bool = True):
            return tiny

    env = TinyAsGemma.with_models({"gemma3-270m": GgufModelReader()(str(tiny))})
    store = SqlitePlanStore(tmp_path / "plans.db")
    old = _stored_before_model_options(env, "gemma3-270m")
    old.id = "default"
    store.submit(old, actor="before field 18", activate=True)
    control = ControlPlane(store, env)
    try:
        base = control.start()
        policy = AgentPolicy.from_dict({"agents": {"tuner": {"token": "t", "mode": "auto", "fields": {"sampling": {}}}}})
        reviewer = SuggestionReviewer(control, policy, SuggestionLog(store.db))

        def suggest(top_p: float):
            s = sg.Suggestion(suggestion_id=f"{top_p}", agent_id="tuner", plan_id="default",
                              base_version=control.store.active().version, rationale="r")
            s.update_mask.paths.append("sampling.top_p")
            s.patch.sampling.top_p = top_p
            return reviewer.review(reviewer.authenticate("t"), s)

        assert suggest(base.sampling.top_p).rejection == "no_change"
        assert suggest(0.5).decision == "accepted"
        assert control.store.active().model_options.chat_template == ""
    finally:
        control.close(0)
        store.close()
