"""The `plan-engine` command line.

Every failure the user can cause (a missing file, a corrupt model, a prompt too
long, a failed download) is an `EngineError`: printed as one line on stderr with
a non-zero exit, never a traceback. Set PLAN_ENGINE_DEBUG=1 to see tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from engine.errors import EngineError, InvalidArgument

EXIT_ERROR = 1
EXIT_USAGE = 2


def _add_model_arg(p: argparse.ArgumentParser, positional: bool = False) -> None:
    help_ = "a registry name (see `models list`) or a path to a GGUF file; default: the embedded default"
    if positional:
        p.add_argument("model", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--model", "-m", default=None, help=help_)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    _add_model_arg(p)
    p.add_argument("--backend", default="cpu", help="numeric backend (default: cpu)")
    p.add_argument("--weights", default="f32",
                   help="f32 (default) | native (the file's blocks, int8 AVX2 kernels) | q8_0")
    p.add_argument("--ctx", type=int, default=None, help="context length (default: the model's)")


def _add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None, help="prompt text")
    p.add_argument("--ids", default=None, help="prompt as comma-separated token ids instead of text")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", "-s", default=os.environ.get("PLAN_ENGINE_SERVER", "localhost:50051"),
                   help="server address (default: $PLAN_ENGINE_SERVER or localhost:50051)")
    p.add_argument("--token", default=os.environ.get("PLAN_ENGINE_TOKEN"), help="bearer token ($PLAN_ENGINE_TOKEN)")
    p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to connect with TLS")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")


def _client(args: argparse.Namespace):
    from pathlib import Path
    from services.client import PlanEngineClient
    return PlanEngineClient(args.server, token=args.token, tls_ca=Path(args.tls_ca) if args.tls_ca else None,
                            timeout=args.timeout)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InvalidArgument(f"--ids must be comma-separated integers, got {text!r}", field="ids") from None


def _add_token_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit before sampling (repeatable)")
    p.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                   help="also stop at this token id (repeatable)")
    p.add_argument("--min-tokens", type=int, default=0, help="no end-of-turn or stop token before this many tokens")


def _logit_bias(items: Sequence[str]) -> dict[int, float]:
    out = {}
    for item in items:
        tid, sep, bias = item.partition("=")
        try:
            out[int(tid)] = float(bias)
        except ValueError:
            raise InvalidArgument(f"--logit-bias takes ID=BIAS, got {item!r}", field="logit_bias") from None
        if not sep:
            raise InvalidArgument(f"--logit-bias takes ID=BIAS, got {item!r}", field="logit_bias")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plan-engine", description="Run GGUF language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate a completion, streamed to stdout")
    _add_prompt_args(p)
    _add_runtime_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--chat-template", default=None, metavar="NAME",
                   help="with --chat: one of llama.cpp's built-in templates (chatml, gemma, llama3, ...) in place "
                        "of the file's own; default: the file's own (none: chat is refused)")
    p.add_argument("--max-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_token_control_args(p)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-turn tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object with ids and text at the end")
    _add_format_args(p)

    p = sub.add_parser("score", help="top-k logits at every position of a prompt")
    _add_prompt_args(p)
    _add_runtime_args(p)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tokenize", help="token ids of a text")
    p.add_argument("text")
    _add_model_arg(p)
    p.add_argument("--parse-special", action="store_true", help="map special-token strings to their ids")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("inspect", help="architecture, hyperparameters, tokenizer and tensors of a model")
    _add_model_arg(p, positional=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("models", help="the model cache")
    msub = p.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="download, verify and cache a registry model")
    pull.add_argument("name", nargs="?", default=None)
    lst = msub.add_parser("list", help="registry models and cached files")
    lst.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="run the gRPC control-plane server")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 for all interfaces)")
    # from the environment too, so that a container's HEALTHCHECK (deploy/healthcheck.py) checks the port served
    p.add_argument("--port", type=int, default=int(os.environ.get("PLAN_ENGINE_PORT", "50051")),
                   help="port (0 picks a free one; default: $PLAN_ENGINE_PORT or 50051)")
    p.add_argument("--store", default=os.environ.get("PLAN_ENGINE_STORE"),
                   help="plan store: a SQLite file, or postgresql://USER@HOST/DB shared by replicas "
                        "($PLAN_ENGINE_STORE; default: a SQLite file next to the model cache)")
    p.add_argument("--plan", default=None, help="a plan JSON file to store and activate at start")
    p.add_argument("--default-plan", default=None,
                   help="a plan JSON file to store and activate only when no plan is active (for a fleet)")
    _add_model_arg(p)
    p.add_argument("--chat-template", default=None, metavar="NAME",
                   help="with --model: the plan's model_options.chat_template, one of llama.cpp's built-in templates "
                        "(chatml, gemma, llama3, ...); default: the file's own (none: chat is refused)")
    p.add_argument("--token", action="append", default=[], help="accepted bearer token (repeatable; "
                   "or PLAN_ENGINE_TOKENS, comma-separated); none = no authentication")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", default=None)
    p.add_argument("--agent-policy", default=None, help="WeOS agent policy (JSON): agent tokens, the plan fields "
                   "each may change, bounds, rate and mode; none = no agent may suggest")
    p.add_argument("--insecure-operator", action="store_true",
                   help="with --agent-policy and no --token: let every caller without an agent token act as an "
                        "operator (refused otherwise; logs a warning)")
    p.add_argument("--model-dir", action="append", default=None,
                   help="a directory (or file) plans' model paths may name (repeatable; default: the model cache "
                        "and the --plan/--default-plan model); registry names are always allowed")
    p.add_argument("--max-message-mb", type=int, default=16)
    p.add_argument("--grace", type=float, default=30.0, help="seconds a drain waits for in-flight requests")
    p.add_argument("--max-workers", type=int, default=64,
                   help="RPC threads; open Generate/WatchMetrics/Suggest streams take all but --reserved-threads")
    p.add_argument("--reserved-threads", type=int, default=8, help="threads kept for unary RPCs and health checks")
    p.add_argument("--max-idle-streams-per-client", type=int, default=8,
                   help="WatchMetrics + Suggest streams one client (token or address) may hold open")
    p.add_argument("--suggest-idle", type=float, default=300.0, help="seconds before an idle Suggest stream is closed")
    p.add_argument("--max-prompt-bytes", type=int, default=4 << 20,
                   help="UTF-8 bytes of a prompt or a Tokenize text (the model's context may allow fewer)")
    p.add_argument("--max-request-id-bytes", type=int, default=128)
    p.add_argument("--max-stop-strings", type=int, default=16)
    p.add_argument("--max-stop-bytes", type=int, default=256, help="bytes of each stop string")
    p.add_argument("--max-chat-messages", type=int, default=1024)
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API (/v1/chat/completions, ...) on this port")
    p.add_argument("--trace-exporter", choices=("auto", "none", "console", "otlp"), default="auto",
                   help="OpenTelemetry spans: auto = OTLP when an endpoint is set, else none (default: auto)")
    p.add_argument("--otlp-endpoint", default=None,
                   help="OTLP/gRPC collector, e.g. http://localhost:4317 (default: $OTEL_EXPORTER_OTLP_ENDPOINT)")
    p.add_argument("--untraced-services", default=None, metavar="NAMES",
                   help="comma-separated gRPC services that make no span ('' traces every call; default: "
                        "grpc.health.v1.Health and both reflection services)")

    p = sub.add_parser("generate", help="stream a completion from a running server")
    p.add_argument("prompt")
    _add_server_args(p)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--max-tokens", "-n", type=int, default=0)
    p.add_argument("--temperature", "-t", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    _add_token_control_args(p)
    p.add_argument("--n", type=int, default=1, help="completions of the prompt (1..16), each with seed + index")
    p.add_argument("--prompt-logprobs", type=int, default=None, metavar="K",
                   help="also return each prompt token's logprob and K alternatives (in the final message)")
    p.add_argument("--plan", default=None, help="run under plan ID[@VERSION] (must be active)")
    p.add_argument("--json", action="store_true", help="print every response message as JSON")
    _add_format_args(p)

    p = sub.add_parser("plan", help="manage Execution Plans on a running server")
    psub = p.add_subparsers(dest="plan_command", required=True)
    q = psub.add_parser("submit", help="validate and store a plan from a JSON file ('-' for stdin)")
    q.add_argument("file")
    q.add_argument("--activate", action="store_true")
    _add_server_args(q)
    q = psub.add_parser("show", help="a plan version (default: the active plan)")
    q.add_argument("id", nargs="?", default=None)
    q.add_argument("--version", type=int, default=0)
    _add_server_args(q)
    q = psub.add_parser("list", help="the newest version of every plan")
    _add_server_args(q)
    q = psub.add_parser("activate", help="make a plan version active")
    q.add_argument("id")
    q.add_argument("--version", type=int, default=0)
    _add_server_args(q)
    q = psub.add_parser("rollback", help="return to the previously active version (or --version)")
    q.add_argument("id", nargs="?", default="")
    q.add_argument("--version", type=int, default=0)
    _add_server_args(q)
    q = psub.add_parser("history", help="submissions, activations and rollbacks, newest first")
    q.add_argument("id", nargs="?", default="")
    q.add_argument("--limit", type=int, default=20)
    _add_server_args(q)

    p = sub.add_parser("agent", help="the reference WeOS agent: watch metrics, suggest plan changes")
    _add_server_args(p)
    p.add_argument("--agent-id", default=os.environ.get("PLAN_ENGINE_AGENT_ID", "weos-agent"),
                   help="this agent's id in the server's agent policy ($PLAN_ENGINE_AGENT_ID; default weos-agent)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between metric snapshots (default 1)")
    p.add_argument("--busy-waiting", type=int, default=4, help="waiting requests that mean busy (default 4)")
    p.add_argument("--max-batch", type=int, default=64, help="largest max_batch_size it proposes (default 64)")
    p.add_argument("--power-target", type=float, default=0.0,
                   help="watts: above it, propose limits.max_watts (default 0 = leave power alone)")
    p.add_argument("--cooldown", type=float, default=10.0, help="quiet seconds after each verdict (default 10)")
    p.add_argument("--tuner", action="store_true",
                   help="run the tuning agent instead: one change at a time, each judged as a trial by the plan's "
                        "objective (docs/05_weos_integration.md, section 13)")
    p.add_argument("--max-trials", type=int, default=16, help="with --tuner: trials before it stops (default 16)")
    p.add_argument("--json", action="store_true", help="print each suggestion and verdict as JSON")

    p = sub.add_parser("suggestions", help="the WeOS suggestion audit log; approve or reject pending ones")
    ssub = p.add_subparsers(dest="suggestions_command", required=True)
    q = ssub.add_parser("list", help="suggestions with their latest verdicts, newest first")
    q.add_argument("--agent", default="", help="only this agent's")
    q.add_argument("--decision", choices=_decision_choices(), default=None,
                   help="only with this verdict (pending: pending_review)")
    q.add_argument("--plan", default="", help="only for this plan id")
    q.add_argument("--limit", type=int, default=20)
    q.add_argument("--json", action="store_true")
    _add_server_args(q)
    for name, what in (("approve", "validate a pending suggestion again and apply it"),
                       ("reject", "reject a pending suggestion")):
        q = ssub.add_parser(name, help=what)
        q.add_argument("id", type=int, help="the suggestion's id (from `suggestions list`)")
        q.add_argument("--note", default="", help="why, for the audit log")
        _add_server_args(q)

    p = sub.add_parser("bench", help="prefill/decode throughput, load time, peak memory, per-op profile")
    _add_runtime_args(p)
    p.add_argument("--pp", type=int, default=512, help="prompt tokens for the prefill test (default 512)")
    p.add_argument("--tg", type=int, default=128, help="tokens for the decode test (default 128)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also print the per-op profile")
    p.add_argument("--concurrency", default=None,
                   help="comma-separated levels, e.g. 1,4,16,32: continuous-batching load instead of pp/tg")
    p.add_argument("--grpc", action="store_true", help="with --concurrency: through a real server and channels")
    p.add_argument("--prompt-len", type=int, default=32, help="with --concurrency: prompt tokens per request")
    p.add_argument("--gen-len", type=int, default=64, help="with --concurrency: tokens generated per request")
    p.add_argument("--batch-invariant", action="store_true",
                   help="numerics that do not depend on batch mates (the plan's determinism.batch_invariant)")
    p.add_argument("--structured", action="store_true",
                   help="per-step cost of structured-output masks at --concurrency levels (default 1,32)")
    p.add_argument("--prefix-cache", type=int, default=None, metavar="PREFIX_LEN",
                   help="time to first token of two requests sharing a PREFIX_LEN-token prefix, cache on and off")
    p.add_argument("--trace", default=None, metavar="FILE",
                   help="replay a load trace (deploy/traces/*.jsonl) against --server: arrival times, prompt and "
                        "output lengths, priorities")
    p.add_argument("--speed", type=float, default=1.0, help="with --trace: replay this many times faster")
    _add_server_args(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("tune", help="start a server, replay a trace, let the tuning agent improve the plan by "
                                    "trials, then compare the final plan with the default on interleaved replays")
    p.add_argument("--trace", required=True, metavar="FILE", help="a load trace (deploy/traces/*.jsonl)")
    _add_model_arg(p)
    p.add_argument("--goal", choices=("max_tokens_per_s", "min_joules_per_token"), default="max_tokens_per_s")
    p.add_argument("--max-ttft", type=float, default=None, help="constraint: p99 time to first token, seconds")
    p.add_argument("--max-itl", type=float, default=None, help="constraint: p99 inter-token latency, seconds")
    p.add_argument("--max-watts", type=float, default=None, help="constraint: average power while busy, watts")
    p.add_argument("--trial-requests", type=int, default=8, help="trial window in requests (default 8)")
    p.add_argument("--trial-seconds", type=float, default=120.0, help="trial window in seconds (default 120)")
    p.add_argument("--tolerance", type=float, default=0.05, help="a trial may score this much worse (default 0.05)")
    p.add_argument("--min-requests", type=int, default=4, help="requests needed to judge a trial (default 4)")
    p.add_argument("--max-trials", type=int, default=8, help="trials the agent may run (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved default/final replays at the end (default 2)")
    p.add_argument("--bad-trial", action="store_true",
                   help="first send a deliberately bad suggestion (max_batch_size 1) and show its rollback")
    p.add_argument("--speed", type=float, default=1.0, help="replay the trace this many times faster")
    p.add_argument("--json", action="store_true", help="print the report as JSON at the end")

    p = sub.add_parser("trace", help="load traces for `bench --trace` and `tune`")
    tsub = p.add_subparsers(dest="trace_command", required=True)
    q = tsub.add_parser("generate", help="write a synthetic trace (the shipped ones: `make traces`)")
    q.add_argument("--kind", required=True, choices=("steady_chat", "bursty_batch"))
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (default 60)")
    q.add_argument("--rate", type=float, default=0.5, help="steady_chat: requests per second (default 0.5)")
    q.add_argument("--burst", type=int, default=8, help="bursty_batch: requests per burst (default 8)")
    q.add_argument("--period", type=float, default=15.0, help="bursty_batch: seconds between bursts (default 15)")
    q.add_argument("--output", "-o", default="-", help="file to write ('-': stdout)")
    q = tsub.add_parser("show", help="check a trace file and summarise it")
    q.add_argument("file")
    return parser


def _add_format_args(p: argparse.ArgumentParser) -> None:
    """Structured output (docs/12_structured_output.md): at most one of these."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", default=None, help="output is JSON valid under this schema file")
    g.add_argument("--json-object", action="store_true", help="output is a JSON object")
    g.add_argument("--regex", metavar="R", default=None, help="output matches this regular expression")
    g.add_argument("--grammar", metavar="FILE", default=None,
                   help="output matches this grammar: GBNF if the file ends in .gbnf or uses '::=', else Lark")
    g.add_argument("--choice", metavar="A,B,...", default=None, help="output is exactly one of these strings")


def _format_fields(args: argparse.Namespace) -> tuple[str, Any] | None:
    """(kind, value) of the structured-output flag given, or None."""
    def read(path: str, flag: str) -> str:
        try:
            return Path(path).read_text()
        except OSError as exc:
            raise InvalidArgument(f"{flag} {path}: {exc.strerror or exc}", field=flag.lstrip("-")) from None
    if args.json_schema is not None:
        return "json_schema", read(args.json_schema, "--json-schema")
    if args.json_object:
        return "json_object", True
    if args.regex is not None:
        return "regex", args.regex
    if args.grammar is not None:
        text = read(args.grammar, "--grammar")
        gbnf = args.grammar.endswith(".gbnf") or (not args.grammar.endswith(".lark") and "::=" in text)
        return ("gbnf" if gbnf else "lark"), text
    if args.choice is not None:
        return "choice", [c for c in args.choice.split(",") if c]
    return None


def _load(args: argparse.Namespace):
    from engine.model.registry import resolve
    from engine.runtime.generate import LoadedModel
    return LoadedModel(resolve(args.model), backend=args.backend, weights=args.weights, context_length=args.ctx,
                       batch_invariant=getattr(args, "batch_invariant", False),
                       chat_template=getattr(args, "chat_template", None) or "")


def _prompt_ids(model, args: argparse.Namespace, chat: bool = False) -> list[int]:
    if (args.prompt is None) == (args.ids is None):
        raise InvalidArgument("give a prompt as text or with --ids (not both)", field="prompt")
    if args.ids is not None:
        return model.encode_prompt(ids=_parse_ids(args.ids))
    if chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        return model.encode_prompt(messages=messages + [{"role": "user", "content": args.prompt}])
    return model.encode_prompt(text=args.prompt)


def cmd_run(args: argparse.Namespace) -> int:
    from engine.runtime.generate import Generation
    from engine.runtime.sampling import InvalidSamplingParams, SamplingParams
    try:
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                                frequency_penalty=args.frequency_penalty, seed=args.seed,
                                max_tokens=args.max_tokens, stop=tuple(args.stop),
                                logit_bias=tuple(sorted(_logit_bias(args.logit_bias).items())),
                                stop_token_ids=tuple(args.stop_token_id), min_tokens=args.min_tokens)
    except InvalidSamplingParams as exc:
        raise InvalidArgument(str(exc), field=exc.field) from None
    fmt = _format_fields(args)
    model = _load(args)
    try:
        constraint = None
        if fmt is not None:
            from engine.runtime.constraints import ResponseFormat, compile_format
            kind, value = fmt
            constraint = compile_format(model.tokenizer, ResponseFormat(kind, "" if kind == "json_object" else value))
        gen = Generation(model, _prompt_ids(model, args, chat=args.chat), params, ignore_eos=args.ignore_eos,
                         constraint=constraint)
        for event in gen:
            if not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        c = gen.completion
        if args.json:
            _print_json({"ids": c.ids, "text": c.text, "finish_reason": c.finish_reason, "seed": c.seed,
                         "usage": {"prompt_tokens": len(c.prompt_ids), "completion_tokens": len(c.ids)},
                         "timings": {k: round(v, 4) for k, v in c.timings.items()}})
        else:
            sys.stdout.write("\n")
            decode_s = c.timings.get("decode_s", 0.0)
            rate = f", {(len(c.ids) - 1) / decode_s:.1f} tok/s decode" if len(c.ids) > 1 and decode_s > 0 else ""
            print(f"[{len(c.prompt_ids)} prompt tokens in {c.timings['prefill_s']:.2f} s, {len(c.ids)} generated"
                  f"{rate}, finish: {c.finish_reason}]", file=sys.stderr)
    finally:
        model.close()
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np
    from engine.runtime.generate import score
    if args.top_k < 1:
        raise InvalidArgument(f"--top-k must be at least 1, got {args.top_k}", field="top_k")
    model = _load(args)
    try:
        ids = _prompt_ids(model, args)
        logits = score(model, ids)
    finally:
        model.close()
    k = min(args.top_k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    positions = [{"top_ids": row.tolist(), "top_logits": [round(float(x), 5) for x in logits[i, row]]}
                 for i, row in enumerate(top)]
    if args.json:
        _print_json({"ids": ids, "positions": positions})
    else:
        for i, pos in enumerate(positions):
            print(f"{i:4d} {ids[i]:6d} -> " + " ".join(f"{t}:{v:.3f}" for t, v in
                                                      zip(pos["top_ids"][:5], pos["top_logits"][:5])))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from engine.model.gguf_file import ModelFile
    from engine.model.registry import resolve
    from engine.model.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_metadata(ModelFile(resolve(args.model)).metadata)
    ids = tokenizer.encode(args.text, parse_special=args.parse_special)
    if args.json:
        _print_json({"ids": ids})
    else:
        for i in ids:
            print(f"{i:6d} {tokenizer.id_to_piece(i)!r}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from gguf import GGMLQuantizationType
    from engine.model.gguf_file import ModelFile
    from engine.model.registry import resolve
    from backends.cpu.quantized import native_form
    info = ModelFile(resolve(args.model)).describe()
    info["native_weights"] = {t: native_form(GGMLQuantizationType[t]) for t in info["tensor_types"]}
    if args.json:
        _print_json(info)
        return 0
    print(f"{info['path']}  ({info['file_size'] / 1e6:.1f} MB)")
    print(f"name: {info['name']}   architecture: {info['architecture']}   supported: {info['supported']}")
    print(f"parameters: {info['parameters']:,}   tensor types: {info['tensor_types']}")
    if isinstance(info["config"], dict):
        print("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in info["config"].items() if k != "architecture"))
    else:
        print(f"hyperparameters: {info['config']}")
    tok = {k: v for k, v in info["tokenizer"].items() if k != "chat_template"}
    print("tokenizer: " + ", ".join(f"{k}={v}" for k, v in tok.items()))
    print(f"chat template: {'yes' if 'chat_template' in info['tokenizer'] else 'no'}")
    print("with --weights native (CPU): " + ", ".join(f"{t}: {form}" for t, form in info["native_weights"].items()))
    print(f"\n{'tensor':<28} {'type':<6} {'shape':<16} {'bytes':>12}")
    for t in info["tensors"]:
        print(f"{t['name']:<28} {t['type']:<6} {'x'.join(map(str, t['shape'])):<16} {t['bytes']:>12,}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from engine.model import registry
    if args.models_command == "pull":
        name = args.name or registry.DEFAULT_MODEL
        if name not in registry.REGISTRY:
            raise InvalidArgument(f"unknown model {name!r} (known: {', '.join(registry.REGISTRY)})", field="model")
        print(registry.pull(registry.REGISTRY[name]))
        return 0
    rows = registry.list_models()
    if args.json:
        _print_json({"cache_dir": str(registry.cache_dir()), "models": rows})
    else:
        print(f"cache: {registry.cache_dir()}")
        for r in rows:
            size = f"{r['size'] / 1e6:.1f} MB" if r["size"] else "-"
            print(f"{'*' if r['cached'] else ' '} {r['name']:<30} {size:>10}  {r['source']}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.runtime.bench import bench, bench_prefix_cache
    if args.trace:
        return _bench_trace(args)
    if args.structured:
        return _bench_structured(args)
    if args.concurrency:
        return _bench_concurrency(args)
    model = _load(args)
    try:
        if args.prefix_cache is not None:
            if not 0 < args.prefix_cache < model.context_length - 18:
                raise InvalidArgument(f"--prefix-cache must be in 1..{model.context_length - 19}", field="prefix_cache")
            result = bench_prefix_cache(model, prefix_len=args.prefix_cache, rounds=args.repeats)
            if args.json:
                _print_json(result)
            else:
                for k, v in result.items():
                    print(f"{k:32s} {v}")
            return 0
        if not (0 < args.pp < model.context_length and 0 < args.tg < model.context_length):
            raise InvalidArgument(f"--pp and --tg must be in 1..{model.context_length - 1}", field="pp")
        result = bench(model, pp=args.pp, tg=args.tg, repeats=args.repeats, profile=args.profile or args.json)
    finally:
        model.close()
    if args.json:
        _print_json(result)
        return 0
    for k, v in result.items():
        if k != "profile":
            print(f"{k:<14} {v}")
    for phase, prof in result.get("profile", {}).items():
        print(f"\n{phase} profile ({prof['wall_s']:.3f} s):")
        for r in prof["ops"]:
            print(f"  {r['op']:<38} {r['count']:>7} {r['seconds']:>9.4f} s {100 * r['share']:6.1f} %")
    return 0


def _untraced(names: str | None) -> dict[str, tuple[str, ...]]:
    if names is None:
        return {}  # the server's default
    return {"untraced_services": tuple(n.strip() for n in names.split(",") if n.strip())}


def cmd_serve(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path
    from engine.telemetry.tracing import configure_tracing
    from services.client import plan_from_json
    from services.server import ServerConfig, serve
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    initial, if_none = None, False
    if args.chat_template is not None and (args.plan or args.default_plan or not args.model):
        raise InvalidArgument("--chat-template goes with --model (a plan file declares model_options.chat_template)",
                              field="chat_template")
    if args.plan:
        initial = _read_plan(args.plan)
    elif args.default_plan:
        initial, if_none = _read_plan(args.default_plan), True
    elif args.model:
        options = {} if args.chat_template is None else {"model_options": {"chat_template": args.chat_template}}
        initial = plan_from_json(json.dumps({"id": "default", "model": args.model, **options}))
    tokens = args.token + [t for t in os.environ.get("PLAN_ENGINE_TOKENS", "").split(",") if t]
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InvalidArgument("--tls-cert and --tls-key go together", field="tls")
    tracer_provider = configure_tracing(args.trace_exporter, args.otlp_endpoint)
    try:
        serve(ServerConfig(host=args.host, port=args.port, store_path=_store_target(args.store), initial_plan_if_none=if_none,
                           initial_plan=initial, auth_tokens=tokens, max_message_bytes=args.max_message_mb << 20,
                           tls_cert=Path(args.tls_cert) if args.tls_cert else None,
                           agent_policy=Path(args.agent_policy) if args.agent_policy else None,
                           tls_key=Path(args.tls_key) if args.tls_key else None, grace_s=args.grace,
                           metrics_port=args.metrics_port, http_port=args.http_port,
                           tracer_provider=tracer_provider,
                           max_workers=args.max_workers, reserved_threads=args.reserved_threads,
                           max_idle_streams_per_client=args.max_idle_streams_per_client,
                           suggest_idle_s=args.suggest_idle, request_limits=_request_limits(args),
                           insecure_operator=args.insecure_operator,
                           model_dirs=[Path(d) for d in args.model_dir] if args.model_dir is not None else None,
                           **_untraced(args.untraced_services)))
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()  # exports the spans still batched
    return 0


def _request_limits(args):
    from engine.control.limits import RequestLimits
    try:
        return RequestLimits(max_prompt_bytes=args.max_prompt_bytes, max_request_id_bytes=args.max_request_id_bytes,
                             max_stop_strings=args.max_stop_strings, max_stop_bytes=args.max_stop_bytes,
                             max_chat_messages=args.max_chat_messages)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _decision_choices() -> list[str]:
    """The verdict decisions, as suggestion.proto names them (lower case), and "pending" for short."""
    from protos.planengine.v1 import suggestion_pb2 as sg
    names = [name.removeprefix("DECISION_").lower() for name in sg.SuggestionVerdict.Decision.keys()]
    return [name for name in names if name != "unspecified"] + ["pending"]


def _store_target(store: str | None):
    """A postgresql:// URL stays a string (a Path would fold its '//'); anything else is a SQLite file."""
    from pathlib import Path

    from engine.control.database import is_postgres_url
    return store if is_postgres_url(store) else (Path(store) if store else None)


def _read_plan(path: str):
    from google.protobuf.json_format import ParseError
    from services.client import plan_from_json
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        return plan_from_json(text)
    except ParseError as exc:
        raise InvalidArgument(f"{path}: not a valid plan: {exc}", field="plan") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    fields: dict[str, Any] = {"max_tokens": args.max_tokens, "stop": args.stop,
                              "logit_bias": _logit_bias(args.logit_bias), "stop_token_ids": args.stop_token_id,
                              "min_tokens": args.min_tokens}
    if args.prompt_logprobs is not None:
        fields["prompt_logprobs"] = args.prompt_logprobs
    if args.n != 1:
        fields["n"] = args.n
    if args.seed is not None:
        fields["seed"] = args.seed
    if args.temperature is not None:
        fields["sampling"] = {"temperature": args.temperature}
    if args.plan:
        plan_id, _, version = args.plan.partition("@")
        fields["plan"] = {"id": plan_id, "version": int(version or 0)}
    fmt = _format_fields(args)
    if fmt is not None:
        fields["response_format"] = dict([fmt])
    with _client(args) as client:
        prompt = ({"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"text": args.prompt})
        texts: dict[int, str] = {}  # with --n > 1: each choice's text, printed as it finishes
        for response in client.generate(**prompt, **fields):
            if args.json:
                _print_json(json_format.MessageToDict(response, preserving_proto_field_name=True))
            elif response.HasField("delta") and args.n > 1:
                texts[response.index] = texts.get(response.index, "") + response.delta.text
            elif response.HasField("delta"):
                sys.stdout.write(response.delta.text)
                sys.stdout.flush()
            else:
                f = response.final
                if args.n > 1:
                    sys.stdout.write(f"[{response.index}] {texts.get(response.index, '')}")
                print(f"\n[{f.usage.completion_tokens} tokens, finish: {f.finish_reason}, ttft "
                      f"{f.timings.time_to_first_token_s:.2f} s, plan {f.plan.id}@{f.plan.version}#{f.plan.hash[:12]}]",
                      file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from services.client import plan_to_json
    with _client(args) as client:
        c = args.plan_command
        if c == "submit":
            response = client.submit_plan(_read_plan(args.file), activate=args.activate)
            print(plan_to_json(response.plan))
        elif c == "show":
            print(plan_to_json(client.get_plan(args.id, args.version) if args.id else client.active_plan()))
        elif c == "list":
            listing = client.list_plans()
            for p in listing.plans:
                mark = "*" if (p.id, p.version) == (listing.active_id, listing.active_version) else " "
                print(f"{mark} {p.id}@{p.version}  {p.hash[:12]}  {p.model}")
            if listing.active_id:
                print(f"active: {listing.active_id}@{listing.active_version}")
        elif c in ("activate", "rollback"):
            call = client.activate if c == "activate" else client.rollback
            response = call(args.id, args.version)
            print(f"active: {response.plan.id}@{response.plan.version} ({response.plan.hash[:12]})"
                  + (f", was {response.previous.id}@{response.previous.version}" if response.previous.id else ""))
        else:
            for e in client.history(args.id, args.limit).events:
                print(f"{e.seq:5d} {e.at.ToJsonString()} {e.action:<9} {e.plan_id}@{e.version} {e.hash[:12]} {e.actor}")
    return 0


def _bench_trace(args: argparse.Namespace) -> int:
    from services import load_trace
    from services.trace_replay import replay
    trace = load_trace.load(args.trace)  # a bad file is refused before anything is sent
    if not (args.speed > 0 and args.speed <= 1000):
        raise InvalidArgument(f"--speed {args.speed} must be in (0, 1000]", field="speed")
    result = replay(lambda: _client(args), trace, speed=args.speed)
    s = result.summary()
    if args.json:
        _print_json(s)
    else:
        print(f"trace {s['trace']}: {s['requests']} requests, {s['failed']} failed, {s['tokens']} tokens in "
              f"{s['wall_s']} s (busy {s['busy_s']:.1f} s)")
        print(f"  {s['tokens_per_s']:.1f} tok/s (per busy second), {s['joules_per_token']:.4g} J/token, "
              f"ttft p50/p99 {s['ttft_p50_s']:.3f}/{s['ttft_p99_s']:.3f} s, itl p99 {s['itl_p99_s']:.4f} s")
        print(f"  plans: {', '.join(f'{k} ({v})' for k, v in s['plans'].items())}")
        for e in s["errors"]:
            print(f"  error: {e}")
    return 1 if s["failed"] else 0


def cmd_tune(args: argparse.Namespace) -> int:
    import logging
    from engine.control.objectives import Objective
    from services import load_trace
    from services.tune import TuneConfig, tune
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    trace = load_trace.load(args.trace)
    for name, value, low, high in (("--max-trials", args.max_trials, 1, 100), ("--rounds", args.rounds, 1, 20)):
        if not low <= value <= high:
            raise InvalidArgument(f"{name} {value} must be in {low}..{high}")
    if not 0 < args.speed <= 1000:
        raise InvalidArgument(f"--speed {args.speed} must be in (0, 1000]", field="speed")
    objective = Objective(args.goal, args.max_ttft, args.max_itl, args.max_watts, args.trial_requests,
                          args.trial_seconds, args.tolerance, args.min_requests)
    report = tune(trace, TuneConfig(objective, args.model, args.max_trials, args.rounds, args.bad_trial, args.speed),
                  say=lambda line: print(line, flush=True))
    c = report["comparison"]
    if "ratio_median" in c:
        print(f"objective ({report['objective']}): final / default = {c['ratios_per_round']} per round, median "
              f"x{c['ratio_median']}; final plan constraints broken: {c['final_constraints_broken'] or 'none'}; "
              f"failed requests during tuning: {report['failed_during_tuning']}; load average "
              f"{report['load_average_start']} -> {report['load_average_end']} (shared machine)")
    if args.json:
        _print_json(report)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from services import load_trace
    if args.trace_command == "show":
        trace = load_trace.load(args.file)
        _print_json({**trace.summary(), "seed": trace.seed, "description": trace.description,
                     "generator": trace.generator})
        return 0
    trace = load_trace.generate(args.kind, args.seed, args.duration, rate=args.rate, burst=args.burst,
                                period_s=args.period)
    if args.output == "-":
        sys.stdout.write(trace.dumps())
    else:
        Path(args.output).write_text(trace.dumps(), encoding="utf-8")
        print(f"wrote {args.output}: {trace.summary()}", file=sys.stderr)
    return 0


def _bench_structured(args: argparse.Namespace) -> int:
    from engine.runtime.bench import bench_structured
    try:
        levels = [int(x) for x in (args.concurrency or "1,32").split(",") if x]
    except ValueError:
        raise InvalidArgument(f"--concurrency takes integers like 1,32, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1 or max(levels) > 256:
        raise InvalidArgument(f"--concurrency levels must be in 1..256, got {args.concurrency!r}")
    model = _load(args)
    try:
        rows = bench_structured(model, levels, gen_len=args.gen_len, repeats=args.repeats)
    finally:
        model.close()
    if args.json:
        _print_json({"weights": args.weights, "gen_len": args.gen_len, "repeats": args.repeats, "levels": rows})
        return 0
    print(f"weights={args.weights} gen_len={args.gen_len} repeats={args.repeats} (medians)")
    print(f"{'conc':>4} {'mask ms/step':>12} {'us/stream':>10} {'step ms (schema)':>16} {'step ms (free)':>14} "
          f"{'mask share':>10}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['mask_ms_per_step']:>12} {r['mask_us_per_stream']:>10} "
              f"{r['step_ms_structured']:>16} {r['step_ms_free']:>14} {r['mask_share_of_step']:>10.2%}")
    return 0


def _bench_concurrency(args: argparse.Namespace) -> int:
    try:
        levels = [int(x) for x in args.concurrency.split(",") if x]
    except ValueError:
        raise InvalidArgument(f"--concurrency takes integers like 1,4,16, got {args.concurrency!r}") from None
    if not levels or min(levels) < 1 or max(levels) > 256:
        raise InvalidArgument(f"--concurrency levels must be in 1..256, got {args.concurrency!r}")
    if args.grpc:
        from engine.model.registry import resolve
        from services.bench_grpc import bench_grpc
        rows = bench_grpc(str(resolve(args.model)), levels, args.prompt_len, args.gen_len, weights=args.weights,
                          batch_invariant=args.batch_invariant)
    else:
        from engine.runtime.bench import bench_concurrency
        model = _load(args)
        try:
            rows = bench_concurrency(model, levels, args.prompt_len, args.gen_len)
        finally:
            model.close()
    setup = {"weights": args.weights, "batch_invariant": args.batch_invariant, "prompt_len": args.prompt_len,
             "gen_len": args.gen_len}
    if args.json:
        _print_json({"mode": "grpc" if args.grpc else "in-process", **setup, "levels": rows})
        return 0
    print(" ".join(f"{k}={v}" for k, v in setup.items()))
    print(f"{'mode':<11} {'conc':>4} {'agg tok/s':>10} {'x level1':>8} {'ttft p50':>9} {'ttft p99':>9} "
          f"{'itl p50':>8} {'itl p99':>8}")
    for r in rows:
        print(f"{'grpc' if args.grpc else 'in-process':<11} {r['concurrency']:>4} {r['aggregate_tok_s']:>10} "
              f"{r['vs_first_level']:>8} {r['ttft_p50_s']:>9} {r['ttft_p99_s']:>9} {r['itl_p50_s']:>8} "
              f"{r['itl_p99_s']:>8}")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    if args.tuner:
        return _tuner(args)
    from google.protobuf import json_format
    from services.agent import AgentConfig, describe, run_agent
    config = AgentConfig(agent_id=args.agent_id, busy_waiting=args.busy_waiting, max_batch_size=args.max_batch,
                         power_target_w=args.power_target, cooldown_s=args.cooldown)

    def report(exchange) -> None:
        if args.json:
            _print_json({"suggestion": json_format.MessageToDict(exchange.suggestion, preserving_proto_field_name=True),
                         "verdict": json_format.MessageToDict(exchange.verdict, preserving_proto_field_name=True)})
        else:
            print(describe(exchange), flush=True)

    with _client(args) as client:
        print(f"agent {args.agent_id} watching {args.server} (Ctrl-C stops)", file=sys.stderr, flush=True)
        run_agent(client, config, args.interval, report=report)
    return 0


def _tuner(args: argparse.Namespace) -> int:
    from services.tuning_agent import TunerConfig, describe, run_tuner
    if not 1 <= args.max_trials <= 1000:
        raise InvalidArgument(f"--max-trials {args.max_trials} must be in 1..1000", field="max_trials")

    def report(step) -> None:
        if args.json:
            _print_json({"move": step.move.label(), "base_version": step.base_version, "result": step.outcome.result,
                         "gain": step.outcome.gain, "reason": step.outcome.reason})
        else:
            print(describe(step), flush=True)

    with _client(args) as client:
        print(f"tuner {args.agent_id} on {args.server} (Ctrl-C stops)", file=sys.stderr, flush=True)
        steps = run_tuner(client, TunerConfig(agent_id=args.agent_id, max_trials=args.max_trials), report=report)
    print(f"done after {len(steps)} trials", file=sys.stderr)
    return 0


def cmd_suggestions(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from protos.planengine.v1 import suggestion_pb2 as sg
    with _client(args) as client:
        if args.suggestions_command == "list":
            decision = {"pending": "pending_review"}.get(args.decision, args.decision) or ""
            records = client.list_suggestions(args.agent, args.plan, decision, args.limit)
        else:
            records = [client.decide_suggestion(args.id, args.suggestions_command == "approve", args.note)]
    for r in records:
        if getattr(args, "json", False):
            _print_json(json_format.MessageToDict(r, preserving_proto_field_name=True))
            continue
        s, v = r.suggestion, r.verdict
        decision = sg.SuggestionVerdict.Decision.Name(v.decision).removeprefix("DECISION_") if r.HasField(
            "verdict") else "UNDECIDED"
        result = f" -> {s.plan_id}@{v.resulting_version}" if v.resulting_version else ""
        print(f"{r.id:5d} {r.received_at.ToJsonString()} {r.agent_id} ({r.mode}) {s.plan_id}@{s.base_version} "
              f"{decision}{result} {r.patch_json}")
        print(f"      {v.reason or '(no verdict: the server stopped before deciding)'}"
              + (f" [by {r.decided_by}]" if r.decided_by not in ("", "policy") else ""))
        if s.rationale:
            print(f"      rationale: {s.rationale}" + (f"; expects: {s.expected_effect}" if s.expected_effect else ""))
        if r.HasField("trial"):
            t = r.trial
            state = sg.TrialOutcome.State.Name(t.state).removeprefix("STATE_")
            gain = f" x{t.gain:.2f}" if t.HasField("gain") else ""
            print(f"      trial v{t.base_version} -> v{t.version}: {state}{gain}: {t.reason}")
    return 0


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, ensure_ascii=False))


COMMANDS = {"run": cmd_run, "score": cmd_score, "tokenize": cmd_tokenize, "inspect": cmd_inspect,
            "models": cmd_models, "bench": cmd_bench, "serve": cmd_serve, "generate": cmd_generate,
            "plan": cmd_plan, "agent": cmd_agent, "suggestions": cmd_suggestions, "trace": cmd_trace,
            "tune": cmd_tune}


def _rpc_error() -> type[Exception]:
    try:
        import grpc
        return grpc.RpcError
    except ImportError:  # pragma: no cover
        return EngineError


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except EngineError as exc:
        print(f"plan-engine: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except _rpc_error() as exc:
        print(f"plan-engine: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("plan-engine: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as exc:
        print(f"plan-engine: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: say so in one line unless debugging
        if os.environ.get("PLAN_ENGINE_DEBUG"):
            raise
        print(f"plan-engine: internal error: {type(exc).__name__}: {exc} (set PLAN_ENGINE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
