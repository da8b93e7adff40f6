"""Tool calling (issue 17, item 3): llama.cpp's generic format, constrained to the tools' schemas;
a two-turn round trip through gRPC with the default model's template."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from engine.errors import InvalidArgument
from engine.runtime.tools import Tool, ToolCall, parse_output, response_schema, tool_chat
from protos.planengine.v1 import plan_pb2
from services.client import PlanEngineClient
from services.server import ServerConfig, create_server

WEATHER = Tool("get_weather", "The current weather in a city.",
               json.dumps({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}))


def test_the_conversation_is_written_in_the_generic_format():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", '{"city": "Paris"}', "c1")]},
                {"role": "tool", "content": "sunny", "name": "get_weather", "tool_call_id": "c1"}]
    out, fmt = tool_chat(messages, [WEATHER])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    assert "get_weather: The current weather" in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert out[3] == {"role": "user", "content": '{"tool_response": {"tool": "get_weather", "content": "sunny"}}'}
    schema = json.loads(fmt.value)
    jsonschema.validate({"tool_call": {"name": "get_weather", "arguments": {"city": "Rome"}}}, schema)
    jsonschema.validate({"response": "It is sunny."}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_call": {"name": "get_weather", "arguments": {}}}, schema)
    required = response_schema([WEATHER], "required")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "no"}, required)
    assert tool_chat(messages[:2], [WEATHER], "none")[1] is None


def test_the_answer_is_parsed_into_calls_or_a_reply():
    content, calls = parse_output('{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}')
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")
    assert parse_output('{"response": "Sunny."}') == ("Sunny.", [])
    assert parse_output('{"tool_call": {"na') == ('{"tool_call": {"na', [])  # cut short: the raw text


@pytest.mark.parametrize("tools,choice,field", [
    ([Tool("bad name!")], "auto", "tools[0].name"), ([WEATHER, WEATHER], "auto", "tools[1].name"),
    ([Tool("f", parameters="{not json")], "auto", "tools[0].parameters"), ([WEATHER], "sometimes", "tool_choice"),
])
def test_bad_tools_are_refused_naming_the_field(tools, choice, field):
    with pytest.raises(InvalidArgument) as err:
        tool_chat([{"role": "user", "content": "hi"}], tools, choice)
    assert err.value.field == field


def tool_pb(tool: Tool) -> dict:
    return {"name": tool.name, "description": tool.description, "parameters": tool.parameters}


def test_tools_need_a_chat_prompt_and_no_response_format(tiny, tmp_path):
    server = create_server(ServerConfig(port=0, store_path=tmp_path / "plans.sqlite3",
                                        initial_plan=plan_pb2.ExecutionPlan(id="tiny", model=str(tiny))))
    try:
        with PlanEngineClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            for kwargs, field in [(dict(text="ab", tools=[tool_pb(WEATHER)]), "tools"),
                                  (dict(messages=[{"role": "user", "content": "a"}], tools=[tool_pb(WEATHER)],
                                        response_format={"regex": "a+"}), "response_format")]:
                with pytest.raises(grpc.RpcError) as err:
                    list(client.generate(max_tokens=2, **kwargs))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    finally:
        server.stop(2)


@pytest.mark.slow
def test_a_two_turn_tool_call_round_trip_through_grpc(model_path, tmp_path):
    server = create_server(ServerConfig(port=0, store_path=tmp_path / "plans.sqlite3"))
    try:
        with PlanEngineClient(f"127.0.0.1:{server.port}", timeout=120) as client:
            messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
            responses = list(client.generate(messages=messages, tools=[tool_pb(WEATHER)], tool_choice="required",
                                             max_tokens=64))
            final = responses[-1].final
            assert final.finish_reason == "stop" and final.content == "", final
            (call,) = final.tool_calls
            assert call.name == "get_weather" and call.id
            jsonschema.validate(json.loads(call.arguments), json.loads(WEATHER.parameters))
            # turn two: the call and its result go back; the model answers (or calls again), in the format
            messages += [{"role": "assistant", "content": "", "tool_calls": [
                             {"id": call.id, "name": call.name, "arguments": call.arguments}]},
                         {"role": "tool", "content": "Sunny, 24 degrees Celsius.", "name": "get_weather",
                          "tool_call_id": call.id}]
            final = list(client.generate(messages=messages, tools=[tool_pb(WEATHER)], max_tokens=96))[-1].final
            assert final.finish_reason == "stop", final
            assert (final.content and not final.tool_calls) or (not final.content and len(final.tool_calls) == 1)
    finally:
        server.stop(5)


@pytest.mark.slow
def test_tools_through_the_openai_sdk(model_path, tmp_path):
    import openai
    server = create_server(ServerConfig(port=0, http_port=0, store_path=tmp_path / "plans.sqlite3"))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0,
                               timeout=120)
        model = client.models.list().data[0].id
        tools = [{"type": "function", "function": {"name": WEATHER.name, "description": WEATHER.description,
                                                   "parameters": json.loads(WEATHER.parameters)}}]
        messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
        out = client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=64,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), json.loads(WEATHER.parameters))
        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees Celsius."}]
        chunks = list(client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=96,
                                                     stream=True))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish in (["stop"], ["tool_calls"])
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        if finish == ["stop"]:
            assert "".join(d.content or "" for d in deltas).strip()
        else:
            assert any(d.tool_calls for d in deltas)
    finally:
        server.stop(5)
