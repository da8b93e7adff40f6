"""The OpenAI-compatible HTTP API: POST /v1/chat/completions, POST /v1/completions, GET /v1/models.

As thin as the gRPC servicer, and on the same engine: a body is validated into a
`GenerateInput` (protocol.py), `ControlPlane.generate` runs it under the active plan, and its
events become a response object or server-sent events (responses.py). Errors come back in
OpenAI's JSON shape with the matching status (errors.py). Every response names the plan that
ran it, id@version#hash, in the `x-plan-engine-plan` header and in `system_fingerprint`.

The engine's event queues are blocking: each request's events are read on a worker thread
(at most `max_streams` at once), so the event loop never waits on the engine. A client that
goes away, streaming or not, cancels its request at once and its KV blocks are freed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from engine.control.control_plane import ControlPlane, PlanStamp
from engine.control.agents import AgentPolicy
from engine.errors import EngineError
from engine.runtime.generate import TokenEvent
from engine.runtime.worker import Final, RequestHandle
from services.auth import OperatorTokens, parse_bearer
from services.openai_api.errors import ApiError, from_engine, from_validation
from services.openai_api.protocol import ChatCompletionRequest, CompletionRequest
from services.openai_api.responses import ChatFormat, CompletionFormat, Context, Formatter

PLAN_HEADER = "x-plan-engine-plan"


def fingerprint(stamp: PlanStamp) -> str:
    return f"{stamp.id}@{stamp.version}#{stamp.hash}"


def create_app(control: ControlPlane, operators: OperatorTokens | None = None, agents: AgentPolicy | None = None,
               max_streams: int = 64) -> FastAPI:
    """The ASGI app over `control`. `operators`: the bearer tokens the gRPC side accepts (None:
    no authentication); an agent token from `agents` is refused (403): it opens only the agent RPCs."""
    app = FastAPI(title="plan-engine: OpenAI-compatible API", docs_url="/docs", redoc_url=None)
    started = int(time.time())
    limiter: list[anyio.CapacityLimiter] = []  # made on the event loop's thread, at first use

    async def authorize(authorization: str | None = Header(default=None)) -> None:
        token = parse_bearer(authorization)
        if agents is not None and agents.authenticate(token) is not None:
            raise ApiError(403, "an agent token opens only the agent RPCs of the gRPC API, not this API")
        if operators is not None and not operators.accepts(token):
            raise ApiError(401, "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": started, "owned_by": "plan-engine"}

    def served_model(requested: str) -> str:
        plan = control.active_plan
        if requested != plan.model:
            raise ApiError(404, f"The model '{requested}' does not exist on this server: it serves '{plan.model}' "
                                f"(plan {PlanStamp.of(plan)}); GET /v1/models lists it", param="model",
                           code="model_not_found")
        return plan.model

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(control.active_plan.model)]}

    @v1.get("/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        return model_card(served_model(model))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await generate(request, body, ChatFormat, "chatcmpl", body.top_logprobs_wanted(),
                              {"prompt": "messages"})

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await generate(request, body, CompletionFormat, "cmpl", body.logprobs, {"top_logprobs": "logprobs"})

    async def generate(request: Request, body: ChatCompletionRequest | CompletionRequest, fmt: type[Formatter],
                       prefix: str, logprobs: int | None, fields: dict[str, str]):
        """Run one request; `fields` renames the engine's field names in errors to the request's."""
        model = served_model(body.model)
        request_id = f"{prefix}-{uuid.uuid4().hex}"  # also the engine's request id: gRPC Cancel stops it
        try:
            tokenizer = control.runtime.model.tokenizer
            handle, stamp = await run_in_threadpool(control.generate, body.to_input(request_id))
        except EngineError as exc:
            raise from_engine(exc, fields) from None
        ctx = Context(request_id, model, fingerprint(stamp), tokenizer.token_bytes, logprobs,
                      include_usage=bool(body.stream_options and body.stream_options.include_usage), n=body.n or 1,
                      tools=bool(getattr(body, "tools", None)) and getattr(body, "tool_choice", None) != "none")
        headers = {PLAN_HEADER: ctx.fingerprint, "x-request-id": request_id}
        if not limiter:
            limiter.append(anyio.CapacityLimiter(max_streams))
        events = _events(handle, limiter[0])
        if body.stream:
            return EventStream(_sse(fmt(ctx).chunks(events)), events, media_type="text/event-stream",
                               headers={**headers, "cache-control": "no-cache"})
        result = await _unless_disconnected(request, lambda: fmt(ctx).complete(events))
        return JSONResponse(result, headers=headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        """Open to probes, as gRPC health is: 200 while serving, 503 while loading or draining."""
        try:
            plan = control.active_plan
        except EngineError as exc:
            raise from_engine(exc) from None
        return JSONResponse({"status": "serving", "plan": fingerprint(PlanStamp.of(plan))})

    app.include_router(v1)
    _add_error_handlers(app)
    return app


async def _events(handle: RequestHandle, limiter: anyio.CapacityLimiter) -> AsyncIterator[TokenEvent | Final]:
    """The request's events, read off its blocking queue on a worker thread. Leaving early (a
    client gone, the response cancelled) cancels the request."""
    it = handle.events()  # ends after the last choice's Final
    done = False
    try:
        while True:
            # abandon_on_cancel: a cancelled wait returns at once; the thread ends with the Final
            # that cancelling the request below produces
            event = await anyio.to_thread.run_sync(next, it, None, abandon_on_cancel=True, limiter=limiter)
            if event is None:
                done = True
                return
            yield event
    finally:
        if not done:
            handle.cancel()


class EventStream(StreamingResponse):
    """A streaming response that ends as soon as the client disconnects, even while no chunk is
    due (a request still queued), and always closes its body iterator, which cancels the request.
    (Starlette's own, under ASGI 2.4, notices a disconnect only when its next write fails.)
    `events` is closed too: closing an async generator does not close the ones it iterates."""

    def __init__(self, content: AsyncIterator[str], events: AsyncIterator[Any], **kwargs: Any):
        super().__init__(content, **kwargs)
        self._events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass  # the client went away between our writes
                    tg.cancel_scope.cancel()

                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self._events.aclose()  # cancels the request unless it has finished


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`. An error after the
    stream started (its status is already sent) comes as `data: {"error": ...}`, which the
    openai SDKs raise as an APIError."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except ApiError as exc:
        yield f"data: {json.dumps(exc.body(), ensure_ascii=False)}\n\n"
    except EngineError as exc:
        yield f"data: {json.dumps(from_engine(exc).body(), ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """`work()`, cancelled if the client disconnects first (then its request is cancelled too)."""
    outcome: dict[str, Any] = {}

    async with anyio.create_task_group() as tg:
        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        async def run() -> None:
            try:
                outcome["result"] = await work()
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
                outcome["error"] = exc
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        tg.start_soon(run)
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:  # the client is gone; nobody reads this
        raise ApiError(499, "the client closed the request")
    return outcome["result"]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return from_engine(exc).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # a bug: Starlette re-raises it after this answer, and uvicorn logs its traceback
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}").response()
