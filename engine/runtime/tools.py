"""Tool calling in llama.cpp's generic format, for any chat template.

A request may carry tool definitions (name, description, JSON-schema parameters). The model
is then asked (a system message, as llama.cpp's `common_chat_params_init_generic` writes it) to
answer in JSON, either calling a tool or replying to the user, and its output is constrained to
exactly that (structured output, engine/runtime/constraints.py):

    {"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    {"response": "It is sunny in Paris."}

The conversation's earlier tool calls and tool results are written back in the same shapes
(llama.cpp's polyfills for templates without tool support): an assistant message with tool calls
becomes that JSON, a tool result a user message `{"tool_response": {"tool": NAME, "content": ...}}`.
`parse_output` turns the generated JSON into tool calls or reply text.

This works with every template, the default model's included. Templates with their own tool
syntax (Hermes' <tool_call>, Llama 3.1's, Gemma's) are not used for it yet: the generic format
is what llama.cpp falls back to for them too when it does not know the template.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InvalidArgument
from engine.runtime.constraints import ResponseFormat

TOOL_CHOICES = ("auto", "required", "none")
MAX_TOOLS = 64
MAX_TOOL_SCHEMA_BYTES = 64 * 1024


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = '{"type": "object"}'  # JSON schema of the arguments, as JSON text


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def _schema(tool: Tool, i: int) -> dict[str, Any]:
    try:
        params = json.loads(tool.parameters or '{"type": "object"}')
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"tools[{i}].parameters is not JSON: {exc}", field=f"tools[{i}].parameters") from None
    if not isinstance(params, dict):
        raise InvalidArgument(f"tools[{i}].parameters must be a JSON schema object", field=f"tools[{i}].parameters")
    return params


def check_tools(tools: Sequence[Tool], tool_choice: str) -> None:
    if tool_choice not in TOOL_CHOICES:
        raise InvalidArgument(f"tool_choice {tool_choice[:40]!r} must be one of {', '.join(TOOL_CHOICES)}",
                              field="tool_choice")
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"{len(tools)} tools exceed the limit of {MAX_TOOLS}", field="tools")
    names = set()
    for i, t in enumerate(tools):
        if not t.name or len(t.name) > 64 or not all(c.isalnum() or c in "_-" for c in t.name):
            raise InvalidArgument(f"tools[{i}].name must be 1-64 letters, digits, '_' or '-'", field=f"tools[{i}].name")
        if t.name in names:
            raise InvalidArgument(f"tools[{i}].name {t.name!r} is defined twice", field=f"tools[{i}].name")
        names.add(t.name)
        if len(t.parameters.encode()) + len(t.description.encode()) > MAX_TOOL_SCHEMA_BYTES:
            raise InvalidArgument(f"tools[{i}] is over {MAX_TOOL_SCHEMA_BYTES} bytes", field=f"tools[{i}]")
        _schema(t, i)


def response_schema(tools: Sequence[Tool], tool_choice: str) -> dict[str, Any]:
    """What the model may answer: a call of one of `tools` (with its arguments' schema), or
    (unless tool_choice is "required") a reply."""
    calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": _schema(t, i)},
              "required": ["name", "arguments"], "additionalProperties": False} for i, t in enumerate(tools)]
    call = {"type": "object", "properties": {"tool_call": calls[0] if len(calls) == 1 else {"anyOf": calls}},
            "required": ["tool_call"], "additionalProperties": False}
    if tool_choice == "required":
        return call
    reply = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
             "additionalProperties": False}
    return {"anyOf": [call, reply]}


def _instructions(schema: dict[str, Any], tools: Sequence[Tool]) -> str:
    described = "\n".join(f"- {t.name}: {t.description}" if t.description else f"- {t.name}" for t in tools)
    return ("You can call these tools:\n" + described + "\n\n"
            "Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` reply "
            "to the user's request, following this schema:\n" + json.dumps(schema, ensure_ascii=False))


def tool_chat(messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool],
              tool_choice: str = "auto") -> tuple[list[dict[str, Any]], ResponseFormat | None]:
    """The messages to render (tool calls and results written in the generic JSON, the tool
    instructions in the system message) and the format the answer must follow; (messages, None)
    without tools or with tool_choice "none"."""
    check_tools(tools, tool_choice)
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content", "")
        calls = m.get("tool_calls") or ()
        if role == "assistant" and calls:
            call = calls[0]  # the generic format carries one call per turn
            try:
                arguments = json.loads(call.arguments or "{}")
            except json.JSONDecodeError:
                raise InvalidArgument("an assistant message's tool call has arguments that are not JSON",
                                      field="chat.messages.tool_calls") from None
            out.append({"role": "assistant",
                        "content": json.dumps({"tool_call": {"name": call.name, "arguments": arguments}},
                                              ensure_ascii=False)})
        elif role == "tool":
            out.append({"role": "user", "content": json.dumps(
                {"tool_response": {"tool": m.get("name") or "", "content": content}}, ensure_ascii=False)})
        else:
            out.append({"role": role, "content": content})
    if not tools or tool_choice == "none":
        return out, None
    schema = response_schema(tools, tool_choice)
    note = _instructions(schema, tools)
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + note}
    else:
        out.insert(0, {"role": "system", "content": note})
    return out, ResponseFormat("json_schema", json.dumps(schema, ensure_ascii=False))


def parse_output(text: str) -> tuple[str, list[ToolCall]]:
    """(reply text, tool calls) from a generated answer in the generic format. Text that is not
    the format (cut short by max_tokens, say) comes back as the reply, with no calls."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    if isinstance(answer, dict) and isinstance(answer.get("tool_call"), dict):
        call = answer["tool_call"]
        return "", [ToolCall(str(call.get("name", "")), json.dumps(call.get("arguments", {}), ensure_ascii=False))]
    if isinstance(answer, dict) and isinstance(answer.get("response"), str):
        return answer["response"], []
    return text, []
