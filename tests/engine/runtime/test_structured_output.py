"""Structured output (engine/runtime/constraints.py): formats compile or are refused by name, the
mask allows only what the grammar does, and sampled generations on the default model always
match: 100 per JSON schema (validated with `jsonschema`), a regex and a Lark grammar; through a
real server, bad schemas and grammars are INVALID_ARGUMENT, and the `openai` SDK gets valid JSON."""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import grpc
import jsonschema
import numpy as np
import pytest

from engine.errors import InvalidArgument
from engine.runtime.constraints import MAX_FORMAT_BYTES, ResponseFormat, compile_format
from engine.runtime.generate import TokenStream
from engine.runtime.sampling import SamplingParams

# Five schemas: nested objects, arrays, enums, numbers with ranges, optional fields. Strings and
# arrays are bounded so that 100 samples at temperature 1 finish within max_tokens.
SCHEMAS = {
    "nested": {
        "type": "object", "additionalProperties": False, "required": ["name", "address"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 16},
            "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                        "properties": {"city": {"type": "string", "maxLength": 16},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                       "geo": {"type": "object", "additionalProperties": False,
                                               "required": ["lat"],
                                               "properties": {"lat": {"type": "integer", "minimum": -90,
                                                                      "maximum": 90}}}}}}},
    "arrays": {
        "type": "object", "additionalProperties": False, "required": ["tags", "scores"],
        "properties": {
            "tags": {"type": "array", "minItems": 1, "maxItems": 4,
                     "items": {"type": "string", "minLength": 1, "maxLength": 8}},
            "scores": {"type": "array", "maxItems": 3,
                       "items": {"type": "array", "minItems": 1, "maxItems": 2,
                                 "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}},
    "enums": {
        "type": "object", "additionalProperties": False, "required": ["color", "size", "in_stock"],
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M", "L", "XL"]},
                       "in_stock": {"type": "boolean"},
                       "kind": {"const": "shirt"}}},
    "numbers": {
        "type": "object", "additionalProperties": False, "required": ["age", "score", "temperature"],
        "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "score": {"type": "number", "minimum": 0, "maximum": 1},
                       "temperature": {"type": "integer", "minimum": -40, "exclusiveMaximum": 50}}},
    "optional": {
        "type": "object", "additionalProperties": False, "required": ["id"],
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                       "nickname": {"type": "string", "maxLength": 10},
                       "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
                       "verified": {"type": "boolean"}}},
}
REGEX = r"[A-Z][a-z]{1,9} (has|had) [1-9][0-9]? (apples|pears)\."
LARK = r'''
start: greeting " " NAME punct
greeting: "Hello" | "Hi" | "Good " ("morning" | "evening")
NAME: /[A-Z][a-z]{1,10}/
punct: "!" | "."
'''
LARK_AS_REGEX = r"(Hello|Hi|Good (morning|evening)) [A-Z][a-z]{1,10}[!.]"
GBNF = 'root ::= "The answer is " [0-9] [0-9]? "."'


@pytest.fixture(scope="module")
def tokenizer(model_file):
    from engine.model.tokenizer import Tokenizer
    return Tokenizer.from_metadata(model_file.metadata)


# --- compiling: invalid formats are refused, naming the problem and the field ------------------

@pytest.mark.parametrize("fmt, field, words", [
    (ResponseFormat("json_schema", '{"type": "integr"}'), "response_format.json_schema", "integr"),
    (ResponseFormat("json_schema", '{"type": "object", "properties": '), "response_format.json_schema", "JSON"),
    (ResponseFormat("json_schema", "[1, 2]"), "response_format.json_schema", "JSON object"),
    (ResponseFormat("json_schema", '{"$ref": "#/defs/x"}'), "response_format.json_schema", "/defs/x"),
    (ResponseFormat("json_schema", '{"type": "string", "pattern": "(("}'), "response_format.json_schema",
     "unclosed group"),
    (ResponseFormat("regex", "a(b"), "response_format.regex", "unclosed group"),
    (ResponseFormat("regex", ""), "response_format.regex", "empty"),
    (ResponseFormat("lark", "start: foo\n"), "response_format.lark", "unknown name"),
    (ResponseFormat("gbnf", 'root ::= "a" | b'), "response_format.gbnf", "Rule 'b' not found"),
    (ResponseFormat("choice", ()), "response_format.choice", "at least one"),
    (ResponseFormat("choice", ("a", "")), "response_format.choice", "non-empty"),
    (ResponseFormat("xml", "<a/>"), "response_format", "not one of"),
    (ResponseFormat("regex", "a" * (MAX_FORMAT_BYTES + 1)), "response_format.regex", "exceeds the limit"),
])
def test_invalid_formats_are_invalid_argument_naming_the_field(tokenizer, fmt, field, words):
    with pytest.raises(InvalidArgument) as err:
        compile_format(tokenizer, fmt)
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_compiled_formats_are_cached_but_each_request_gets_its_own_state(tokenizer):
    fmt = ResponseFormat("choice", ("yes", "no"))
    a, b = compile_format(tokenizer, fmt), compile_format(tokenizer, fmt)
    yes = tokenizer.encode("yes", add_bos=False)
    for t in yes:
        a.advance(t)
    assert a.is_finished and not b.is_finished
    allowed = np.flatnonzero(b.allowed())
    assert yes[0] in allowed
    assert all(any(c.startswith(tokenizer.token_bytes(t)) for c in (b"yes", b"no")) for t in allowed)


def test_end_of_turn_only_where_the_grammar_accepts(tokenizer):
    c = compile_format(tokenizer, ResponseFormat("json_schema", json.dumps(SCHEMAS["optional"])))
    eot = sorted(tokenizer.eot_ids)
    assert not c.allowed()[eot].any()  # nothing generated yet: JSON cannot end here
    special = [i for i in range(tokenizer.vocab_size) if tokenizer.is_special(i) and i not in eot]
    for t in tokenizer.encode('{"id": 12', add_bos=False):
        assert not c.allowed()[special].any()  # control tokens are never text
        c.advance(t)
    assert not c.allowed()[eot].any() and not c.is_finished  # "12" may go on, and "}" is missing
    c.advance(tokenizer.encode("}", add_bos=False)[0])
    assert c.is_finished and c.allowed()[eot].all()


def _stub_model(tokenizer, context_length=4096):
    def logsumexp(x):
        top = x.max(axis=-1)
        return top + np.log(np.exp(x - top[:, None]).sum(axis=-1))
    return SimpleNamespace(tokenizer=tokenizer, context_length=context_length,
                           config=SimpleNamespace(vocab_size=tokenizer.vocab_size),
                           backend=SimpleNamespace(logsumexp=logsumexp), check_context=lambda n: None)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_token_stream_masks_reports_raw_logprobs_and_stops_when_complete(tokenizer, temperature):
    """Random logits (no model): every token obeys the grammar, the logprob is the raw logits'
    log-softmax, and the request ends "stop" as soon as the choice is complete."""
    model = _stub_model(tokenizer)
    rng = np.random.default_rng(7)
    for seed in range(5):
        fmt = ResponseFormat("choice", ("alpha", "beta gamma", "delta"))
        stream = TokenStream(model, [1, 2, 3], SamplingParams(temperature=temperature, seed=seed, max_tokens=50),
                             constraint=compile_format(tokenizer, fmt))
        while stream.finish_reason is None:
            logits = rng.standard_normal(tokenizer.vocab_size).astype(np.float32) * 4
            event = stream.accept(logits)
            if event is not None and event.token_id is not None:
                lp = float(logits[event.token_id]) - math.log(np.exp(logits.astype(np.float64)).sum())
                assert event.logprob == pytest.approx(lp, abs=1e-4)
        assert stream.finish_reason == "stop" and stream.text in fmt.value


def test_with_ignore_eos_the_grammar_still_decides_the_end(tokenizer):
    model = _stub_model(tokenizer)
    stream = TokenStream(model, [1], SamplingParams(max_tokens=20), ignore_eos=True,
                         constraint=compile_format(tokenizer, ResponseFormat("regex", "[0-9]{1,3}")))
    eot = sorted(tokenizer.eot_ids)[0]
    digit = tokenizer.encode("7", add_bos=False)[0]
    first = np.full(tokenizer.vocab_size, -5.0, np.float32)
    first[[digit, eot]] = [1.0, 9.0]  # the model wants to end at once: the grammar needs a digit first
    assert stream.accept(first).token_id == digit
    stream.accept(first)  # now "7" is accepted: end-of-turn is allowed and wins
    assert stream.finish_reason == "stop" and stream.text == "7" and stream.ids == [digit]


# --- sampled generations on the default model ----------------------------------------------------

@pytest.fixture(scope="module")
def worker(model_path):
    """The default model on its own blocks (the fast kernels), batching 32 streams; the shared
    prompt of each case is computed once (prefix caching)."""
    from engine.memory.paged import BlockArena
    from engine.runtime.generate import LoadedModel
    from engine.runtime.worker import EngineWorker, WorkerLimits
    from engine.scheduler.base import create_policy

    model = LoadedModel(model_path, weights="native")
    c = model.config
    w = EngineWorker(model, create_policy("throughput"),
                     WorkerLimits(max_batch_size=32, max_batched_tokens=1024, max_queue=1024,
                                  max_tokens_per_request=256),
                     arena=BlockArena(c.n_layers, c.n_kv_heads, c.head_dim, 32 * 16 + 64, 16),
                     prefix_caching=True, cache_salt=b"test")
    yield w
    w.close()
    model.close()


def generate_many(worker, prompt: str, fmt: ResponseFormat, n: int, max_tokens: int) -> list:
    from engine.runtime.worker import RequestSpec
    ids = worker.model.encode_prompt(messages=[{"role": "user", "content": prompt}])
    handles = [worker.submit(RequestSpec("", ids, SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens),
                                         response_format=fmt)) for seed in range(n)]
    return [list(h.events())[-1] for h in handles]


@pytest.mark.slow
def test_100_sampled_generations_per_schema_all_validate(worker):
    prompts = {"nested": "Give a person's name and address as JSON.",
               "arrays": "List a few tags and small score lists as JSON.",
               "enums": "Describe a shirt in stock as JSON.",
               "numbers": "Give an age, a score and a temperature as JSON.",
               "optional": "Describe a user account as JSON."}
    for name, schema in SCHEMAS.items():
        finals = generate_many(worker, prompts[name], ResponseFormat("json_schema", json.dumps(schema)), 100, 160)
        for f in finals:
            assert f.finish_reason == "stop", (name, f.finish_reason, f.error, f.text)
            jsonschema.validate(json.loads(f.text), schema)  # raises on the first invalid one
        assert len({f.text for f in finals}) > 10, name  # sampled, not one greedy answer


@pytest.mark.slow
def test_100_sampled_generations_match_a_regex_and_a_lark_grammar(worker):
    for fmt, pattern, prompt in ((ResponseFormat("regex", REGEX), REGEX, "Who has how much fruit?"),
                                 (ResponseFormat("lark", LARK), LARK_AS_REGEX, "Greet someone.")):
        finals = generate_many(worker, prompt, fmt, 100, 48)
        for f in finals:
            assert f.finish_reason == "stop" and re.fullmatch(pattern, f.text), (fmt.kind, f.finish_reason, f.text)
        assert len({f.text for f in finals}) > 10
    finals = generate_many(worker, "What is 6 times 7?", ResponseFormat("gbnf", GBNF), 10, 16)
    assert all(f.finish_reason == "stop" and re.fullmatch(r"The answer is [0-9]{1,2}\.", f.text) for f in finals)


# --- through a real server: gRPC and the OpenAI SDK ------------------------------------------

@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    from services.client import PlanEngineClient
    from services.server import ServerConfig, create_server
    server = create_server(ServerConfig(port=0, http_port=0, store_path=tmp_path_factory.mktemp("so") / "p.sqlite3"))
    client = PlanEngineClient(f"127.0.0.1:{server.port}")
    yield server, client
    client.close()
    server.stop(5)


def _violations(err: grpc.RpcError) -> list[str]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    status = rpc_status.from_call(err)
    out = []
    for detail in status.details if status else []:
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            out += [v.field for v in br.field_violations]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt, field, words", [
    ({"json_schema": '{"type": "object", "properties": {"a": {"type": "integr"}}}'}, "response_format.json_schema",
     "Invalid type: integr"),
    ({"json_schema": "{not json"}, "response_format.json_schema", "not valid JSON"),
    ({"lark": 'start: "a" item\n'}, "response_format.lark", "unknown name"),
    ({"gbnf": "root ::= ("}, "response_format.gbnf", "not a valid grammar"),
    ({"regex": "[a-"}, "response_format.regex", "regex"),
])
def test_invalid_schema_or_grammar_is_invalid_argument_before_queueing(served, fmt, field, words):
    server, client = served
    with pytest.raises(grpc.RpcError) as err:
        list(client.generate(text="hi", max_tokens=4, response_format=fmt))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details() and field in _violations(err.value)
    assert server.control.runtime.worker.stats()["waiting"] == 0


@pytest.mark.slow
def test_grpc_generate_with_a_schema_and_a_choice(served):
    server, client = served
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20}},
              "required": ["city", "country"], "additionalProperties": False}
    responses = list(client.generate(messages=[{"role": "user", "content": "Where is the Eiffel tower?"}],
                                     max_tokens=48, include_text=True, response_format={"json_schema": schema}))
    final = responses[-1].final
    assert final.finish_reason == "stop"
    jsonschema.validate(json.loads(final.text), schema)
    assert "".join(r.delta.text for r in responses[:-1]) == final.text
    responses = list(client.generate(messages=[{"role": "user", "content": "Is Paris in France?"}], max_tokens=8,
                                     include_text=True, response_format={"choice": ["yes", "no"]}))
    assert responses[-1].final.text in ("yes", "no") and responses[-1].final.finish_reason == "stop"


@pytest.mark.slow
def test_openai_sdk_response_format_json_schema_returns_valid_json(served):
    import openai
    server, _ = served
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0,
                        timeout=120)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    out = sdk.chat.completions.create(
        model=server.control.runtime.plan.model, max_tokens=64, temperature=1.0, seed=3,
        messages=[{"role": "user", "content": "Make up a person with a name and an age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)
    out = sdk.chat.completions.create(model=server.control.runtime.plan.model, max_tokens=64,
                                      messages=[{"role": "user", "content": "Any JSON object, please."}],
                                      response_format={"type": "json_object"})
    content = out.choices[0].message.content  # any object: its length is unbounded, so it may run out
    assert content.startswith("{") and (out.choices[0].finish_reason == "length" or isinstance(json.loads(content), dict))
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model=server.control.runtime.plan.model, max_tokens=4,
                                    messages=[{"role": "user", "content": "x"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "integr"}}})
    assert err.value.body["param"] == "response_format.json_schema" and "integr" in err.value.body["message"]


# --- the CLI: run with each flag, generate through a server, the bench ------------------------

@pytest.mark.slow
def test_cli_run_with_a_schema_a_grammar_and_a_choice(tmp_path):
    from cli_runner import assert_clean_error, cli
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "additionalProperties": False, "required": ["city"],
                                  "properties": {"city": {"type": "string", "maxLength": 20}}}))
    r = cli("run", "Where is the Eiffel tower?", "--chat", "--weights", "native", "-n", "32", "--json",
            "--json-schema", str(schema))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and set(json.loads(out["text"])) == {"city"}
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text(GBNF)
    r = cli("run", "What is 6 times 7?", "--chat", "--weights", "native", "-n", "16", "--json", "--grammar", str(grammar))
    assert r.returncode == 0 and re.fullmatch(r"The answer is [0-9]{1,2}\.", json.loads(r.stdout)["text"]), r.stderr
    r = cli("run", "Is Paris in France?", "--chat", "--weights", "native", "-n", "4", "--json", "--choice", "yes,no")
    assert r.returncode == 0 and json.loads(r.stdout)["text"] in ("yes", "no"), r.stderr
    assert_clean_error(cli("run", "x", "--weights", "native", "--regex", "a(b"), "response_format.regex",
                       "unclosed group")
    assert_clean_error(cli("run", "x", "--json-schema", str(tmp_path / "missing.json")), "--json-schema")


@pytest.mark.slow
def test_cli_generate_through_a_server(served):
    from cli_runner import cli
    server, _ = served
    r = cli("generate", "Give a three digit number.", "--chat", "--server", f"127.0.0.1:{server.port}",
            "-n", "8", "--regex", "[1-9][0-9]{2}")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[1-9][0-9]{2}", r.stdout.strip()), r.stdout


@pytest.mark.slow
def test_structured_bench_reports_mask_cost_per_level(model_path):
    from cli_runner import cli
    r = cli("bench", "--structured", "--weights", "native", "--concurrency", "1,3", "--gen-len", "6",
            "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    levels = json.loads(r.stdout)["levels"]
    assert [x["concurrency"] for x in levels] == [1, 3]
    for x in levels:
        assert x["mask_ms_per_step"] > 0 and x["step_ms_structured"] > 0 and x["step_ms_free"] > 0
        assert 0 < x["mask_share_of_step"] < 1
