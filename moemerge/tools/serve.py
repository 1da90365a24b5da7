"""`moemerge serve`: an OpenAI-compatible HTTP server around the generation engine (tools/engine.py).

A thin adapter: request bodies (validated in tools/openai_api.py) become the engine's calls, and its events
into OpenAI's JSON or server-sent events; the engine's RequestRefused becomes OpenAI's 400 error. FastAPI and
uvicorn (the `serve` extra) are imported only when the server is built, so `moemerge chat` and the merge
itself do not need them. The `routing` object of every reply is described in tools/engine.py.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations at runtime, and
# `Request` is imported inside create_app so that this module does not need FastAPI.

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from moemerge.errors import MoemergeError, OptionError
from moemerge.tools.engine import Delta, Engine, Finished, RequestRefused, SamplingParams
from moemerge.tools.openai_api import (
    ChatRequest,
    CompletionRequest,
    RequestBody,
    RequestError,
    error_body,
    plain_messages,
)
from moemerge.tools.request_routing import RequestRouting, RoutingPlan, decision_text

log = logging.getLogger("moemerge.serve")


class Server:
    """The FastAPI side: one Engine, one generation at a time.

    Requests are serialised by an asyncio.Lock held for a whole generation (a streamed reply keeps its slot
    until its last token); waiting requests queue in FIFO order. Every model call runs on one dedicated worker
    thread, so the event loop stays free for /health, errors and disconnect checks, and all torch work happens
    on a single thread. Batching several requests would need padding and per-request caches; on the models
    moemerge builds a server like vLLM does that far better (see the README)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name
        self.lock = asyncio.Lock()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moemerge-generate")
        self.waiting = 0
        self.stopping = False  # set on SIGINT/SIGTERM: generations end at their next token
        self.created = int(time.time())

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise RequestError(
                f"The model `{model}` does not exist; this server serves `{self.model_name}`",
                "model",
                "model_not_found",
                404,
            )

    async def events(
        self, request, ids: list[int], params: SamplingParams, routing: RoutingPlan | None = None
    ) -> AsyncIterator[Delta | Finished]:
        """Waits for the slot, then runs the generation on the worker thread, one token per step.

        Between steps it checks whether the client is gone; if so (or if this task is cancelled) the slot is
        freed at once and the generator is closed on the worker thread after the step in flight."""
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            await self.lock.acquire()
        finally:
            self.waiting -= 1
        steps = self.engine.generate(ids, params, routing)
        produced = 0
        finished = False
        try:
            while True:
                if self.stopping:
                    raise RequestError("the server is shutting down", status=503, type_="server_error")
                if await request.is_disconnected():
                    return
                event = await loop.run_in_executor(self.executor, next, steps, None)
                if event is None:
                    return
                finished = isinstance(event, Finished)
                produced += isinstance(event, Delta)
                yield event
        finally:
            self.executor.submit(steps.close)
            self.lock.release()
            if not finished:
                log.info("slot freed: generation stopped after %d text pieces (client gone or shutdown)", produced)

    async def off_loop(self, work: Callable[..., Any], *args: Any) -> Any:
        """`work(*args)` on the model's worker thread: tokenizing a long prompt takes seconds, which on the event
        loop would stall every client, /health included."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)

    def routing_plan(self, body: "RequestBody", text: str) -> RoutingPlan:
        given = body.routing.model_dump() if body.routing is not None else None
        return RoutingPlan(self.engine.request_routing(given), text)

    def prepare_chat(self, body: ChatRequest) -> tuple[list[int], SamplingParams]:
        self.check_model(body.model)
        params = body.sampling(self.engine)
        if body.max_completion_tokens is not None and body.max_tokens is None:
            params.max_tokens = body.max_completion_tokens
        ids = self.engine.chat_ids(plain_messages(body.messages))
        self.engine.check(ids, params, "messages")
        return ids, params

    def prepare_completion(self, body: CompletionRequest) -> tuple[list[int], SamplingParams]:
        self.check_model(body.model)
        params = body.sampling(self.engine)
        ids = self.engine.text_ids(body.prompt)
        self.engine.check(ids, params, "prompt")
        return ids, params


# A request body may take this many bytes per prompt character the engine tokenizes (Engine.max_prompt_chars), so
# the longest prompt fits in any JSON spelling (a \uXXXX escape is 6 bytes, a surrogate pair 12) with room to spare.
BODY_BYTES_PER_CHAR = 16


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets OpenAI's error JSON with status 413, naming the
    limit, before more than the limit is read (by its Content-Length, else counted as it arrives).

    Ours, not FastAPI's `max_body_size`: that exists only in releases far newer than the fastapi>=0.110 we support."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    def message(self) -> str:
        return f"The request body is larger than this server's limit of {self.limit} bytes; shorten the prompt."

    async def __call__(self, scope, receive, send) -> None:
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            body = error_body(self.message(), "invalid_request_error", None, "request_too_large")
            await JSONResponse(body, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # FastAPI passes an HTTPException raised while reading the body on as it is
                raise HTTPException(413, self.message())
            return message

        await self.app(scope, counted, send)


def _reply_fields(final: Finished) -> dict[str, Any]:
    return {"usage": final.usage, "routing": final.routing, "expert": final.expert}


def create_app(engine: Engine, model_name: str):
    """The FastAPI application serving `engine` as `model_name`."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    server = Server(engine, model_name)
    app = FastAPI(title="moemerge serve", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit=BODY_BYTES_PER_CHAR * engine.max_prompt_chars)
    app.state.server = server

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestRefused)
    async def _refused(request, exc: RequestRefused):
        return await _request_error(request, RequestError.refused(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type:  # the body was not read as JSON at all (curl -d sends a form)
            message = (
                f"The body must be JSON sent with Content-Type: application/json; this request's Content-Type is "
                f"{content_type or 'missing'}"
            )
            return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_content_type"), 400)
        first = exc.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            message = f"We could not parse the JSON body of your request: {first.get('msg')}"
            return JSONResponse(error_body(message, "invalid_request_error", None, "invalid_json"), status_code=400)
        param = ".".join(loc) or None
        message = f"{param or 'body'}: {first.get('msg')}"
        return JSONResponse(error_body(message, "invalid_request_error", param, first.get("type")), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        log.exception("internal error")
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "busy": server.lock.locked(), "waiting": server.waiting}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "moemerge",
            "max_model_len": engine.context_length,
            "experts": engine.names,
            "experts_per_token": engine.top_k,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        ids, params = await server.off_loop(server.prepare_chat, body)
        routing = server.routing_plan(body, decision_text(plain_messages(body.messages)))
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "created": created, "model": model_name, "system_fingerprint": None}
        if body.stream:

            def delta(text: str | None, finish: str | None) -> dict[str, Any]:
                content = {} if text is None else {"content": text}
                return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}

            chunk_head = {**head, "object": "chat.completion.chunk"}
            opening = {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            events = server.events(request, ids, params, routing)
            return _sse_response(StreamingResponse, _event_stream(events, chunk_head, delta, body, opening))
        final = await _collect(server.events(request, ids, params, routing))
        message = {"role": "assistant", "content": final.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": final.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], **_reply_fields(final)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        ids, params = await server.off_loop(server.prepare_completion, body)
        routing = server.routing_plan(body, body.prompt)
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "object": "text_completion", "created": created, "model": model_name}
        if body.stream:

            def piece(text: str | None, finish: str | None) -> dict[str, Any]:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

            events = server.events(request, ids, params, routing)
            return _sse_response(StreamingResponse, _event_stream(events, head, piece, body))
        final = await _collect(server.events(request, ids, params, routing))
        choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": final.finish_reason}
        return {**head, "choices": [choice], **_reply_fields(final)}

    return app


async def _event_stream(
    events: AsyncIterator[Delta | Finished],
    head: dict[str, Any],
    choice: Callable[[str | None, str | None], dict[str, Any]],
    body: "RequestBody",
    opening: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """Both streaming endpoints: an optional opening choice (chat's role), one chunk per text piece, a closing
    chunk with the finish reason, usage and routing, and with stream_options.include_usage a last chunk
    without choices. `choice(text, finish)` shapes one choice (text None: the closing one)."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if opening is not None:
        yield _sse({**head, "choices": [opening]})
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Delta):
                yield _sse({**head, "choices": [choice(event.text, None)]})
                continue
            yield _sse({**head, "choices": [choice(None, event.finish_reason)], **_reply_fields(event)})
            if include_usage:
                yield _sse({**head, "choices": [], **_reply_fields(event)})


async def _collect(events: AsyncIterator[Delta | Finished]) -> Finished:
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Finished):
                return event
    raise RequestError("the client disconnected", status=499)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse_response(response_class, body: AsyncIterator[str]):
    """Server-sent events ending with `data: [DONE]`; a failure mid-stream becomes an error event first."""

    async def framed():
        async with contextlib.aclosing(body):
            try:
                async for piece in body:
                    yield piece
            except (RequestError, RequestRefused) as exc:  # headers are sent: report in-band, as OpenAI does
                error = RequestError.refused(exc) if isinstance(exc, RequestRefused) else exc
                yield _sse(error_body(error.message, error.type, error.param, error.code))
            except Exception as exc:
                log.exception("generation failed mid-stream")
                yield _sse(error_body(f"{type(exc).__name__}: {exc}", "server_error"))
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return response_class(framed(), media_type="text/event-stream", headers=headers)


def _uvicorn_server(config, server: Server):
    import uvicorn

    class QuietExitServer(uvicorn.Server):
        """On SIGINT/SIGTERM: running generations stop at their next token (their clients get a 503 error), uvicorn
        shuts down gracefully, and the process exits with 0. (uvicorn itself re-raises the signal after shutting
        down, which would end the process with KeyboardInterrupt, 130, or SIGTERM, 143.)"""

        def handle_exit(self, sig, frame) -> None:
            server.stopping = True
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    return QuietExitServer(config)


def _check_can_listen(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise OptionError("{port} {number}: a TCP port is a number from 1 to 65535", number=port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise OptionError("{host} {address}: {reason}", address=host, reason=reason) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            probe.bind(address)
        except OSError as exc:
            raise OptionError(
                "cannot listen on {address}:{number}: {reason}; choose another {port}",
                address=host,
                number=port,
                reason=exc.strerror,
            ) from None


def serve(
    out: Path,
    host: str,
    port: int,
    device: torch.device,
    model_name: str | None,
    routing: RequestRouting | None = None,
) -> None:
    """Load OUT and serve it until SIGINT/SIGTERM; returns normally after a graceful shutdown (exit code 0)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise MoemergeError("moemerge serve needs FastAPI and uvicorn: pip install 'moemerge[serve]'") from None
    log.setLevel(logging.INFO)  # disconnects and shutdowns are worth a line beside uvicorn's access log
    _check_can_listen(host, port)  # before loading the model, which may take minutes
    engine = Engine.load(out, device, routing)
    name = model_name or out.resolve().name
    app = create_app(engine, name)
    template = "its chat template" if engine.has_chat_template else "a plain 'role: content' chat template"
    log.info(
        "serving %s as %r on http://%s:%d/v1 (%s; experts %s; top-%d; %s routing; context %d tokens; %s)",
        out,
        name,
        host,
        port,
        device,
        ", ".join(engine.names),
        engine.top_k,
        engine.routing.mode if engine.routing.mode == "token" else f"request top-{engine.routing.top_k}",
        engine.context_length,
        template,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    server = _uvicorn_server(config, app.state.server)
    hangup = signal.signal(signal.SIGHUP, server.handle_exit)  # a closed terminal: as SIGTERM (uvicorn's are those two)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down gracefully
        pass
    finally:
        signal.signal(signal.SIGHUP, hangup)
        app.state.server.executor.shutdown(wait=True, cancel_futures=True)
