"""The built-in demo upstream: an OpenAI-compatible stand-in used when no EDGE_UPSTREAM_URL is
set, so `make run` answers offline. It is a demo and says so in every answer.

It serves `GET /v1/models`, `POST /v1/chat/completions` (plain and `stream: true`, with the
usage chunk when `stream_options.include_usage` asks for it), `POST /v1/completions`,
`POST /v1/embeddings` and `POST /v1/responses` (plain and streamed), each reporting its `usage`
as OpenAI does (tokens counted as words), on a loopback port of its own; edge proxies to it
exactly as it would to a real provider.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

log = logging.getLogger("edge.demo")

MODEL = "edge-demo"
NOTICE = (
    "[edge demo upstream] This answer comes from edge's built-in demo, not from a language "
    "model. Set EDGE_UPSTREAM_URL and EDGE_UPSTREAM_API_KEY to proxy to a real provider."
)
DEMO_HEADERS = {"x-edge-demo": "true"}


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=DEMO_HEADERS,
    )


def _error(message: str, status: int, code: str, param: str | None = None) -> web.Response:
    err = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return _json({"error": err}, status)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI's many optional fields are ignored
    model: StrictStr = MODEL


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: StrictStr | list[Any] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool = False


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None


class ResponsesRequest(_Request):
    input: StrictStr | list[Any]
    stream: StrictBool = False


class CompletionRequest(_Request):
    prompt: StrictStr | list[Any] = ""


class EmbeddingRequest(_Request):
    input: StrictStr | list[Any]


Body = TypeVar("Body", bound=_Request)


class BadBody(Exception):
    def __init__(self, response: web.Response) -> None:
        self.response = response


async def _body(request: web.Request, model: type[Body]) -> Body:
    """The request body as `model`, or BadBody carrying OpenAI's 400 for it."""
    try:
        data = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise BadBody(_error("The request body is not valid JSON.", 400, "invalid_json")) from None
    if not isinstance(data, dict):
        raise BadBody(_error("The request body must be a JSON object.", 400, "invalid_json"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        param = _param(first["loc"], data, first["type"] == "missing")
        message = f"Invalid value for '{param}': {first['msg']}." if param else first["msg"]
        raise BadBody(_error(message, 400, "invalid_value", param)) from None


def _param(loc: tuple[int | str, ...], data: Any, missing: bool) -> str | None:
    """The JSON path of a validation error, without pydantic's union-member tags."""
    path: list[str] = []
    for part in loc:
        if isinstance(data, dict) and isinstance(part, str) and (part in data or missing):
            path.append(part)
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int):
            path.append(str(part))
            data = data[part] if part < len(data) else None
        else:
            break  # a union member's tag, not a place in the body
    return ".".join(path) or None


def _reply_text(body: ChatRequest) -> str:
    last = body.messages[-1].content
    if isinstance(last, str) and last:
        return f"{NOTICE} You said: {last[:200]}"
    return NOTICE


def _words(value: Any) -> int:
    """The demo's token count: words, at least one."""
    return max(1, len(orjson.dumps(value).decode().split()))


def chat_usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def models(_: web.Request) -> web.Response:
    model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "edge-demo"}
    return _json({"object": "list", "data": [model]})


async def chat(request: web.Request) -> web.StreamResponse:
    body = await _body(request, ChatRequest)
    text = _reply_text(body)
    ident, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), body.model
    prompt, words = _words([m.content for m in body.messages]), len(text.split())
    if body.stream:
        usage = (
            chat_usage(prompt, words)
            if body.stream_options and body.stream_options.include_usage
            else None
        )
        return await _stream(request, ident, created, model, text, usage)
    return _json(
        {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": chat_usage(prompt, words),
        }
    )


def sse_chunk(
    ident: str,
    created: int,
    model: Any,
    delta: dict[str, str],
    finish_reason: str | None = None,
    **extra: Any,
) -> bytes:
    """One `chat.completion.chunk` as an SSE event (`extra` fields go before `choices`): the
    demo's stream, and the fakes of the tests and the benchmark."""
    chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
    chunk.update(extra)
    chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def _stream(
    request: web.Request,
    ident: str,
    created: int,
    model: Any,
    text: str,
    usage: dict[str, Any] | None,
) -> web.StreamResponse:
    """OpenAI's chunks; with `usage` (include_usage), every chunk says `"usage": null` and a
    last one, with no choices, carries it."""
    resp = await _event_stream(request)
    pieces = [{"role": "assistant", "content": ""}] + [
        {"content": word + " "} for word in text.split()
    ]
    extra = {} if usage is None else {"usage": None}
    for i, delta in enumerate([*pieces, {}]):
        finish = "stop" if i == len(pieces) else None
        await resp.write(sse_chunk(ident, created, model, delta, finish, **extra))
    if usage is not None:
        last = {"id": ident, "object": "chat.completion.chunk", "created": created}
        last.update({"model": model, "choices": [], "usage": usage})
        await resp.write(b"data: " + orjson.dumps(last) + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _event_stream(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"content-type": "text/event-stream", "cache-control": "no-cache", **DEMO_HEADERS}
    )
    await resp.prepare(request)
    return resp


async def responses(request: web.Request) -> web.StreamResponse:
    """The Responses API: a `response` object, or its events ending in `response.completed`."""
    body = await _body(request, ResponsesRequest)
    said = body.input if isinstance(body.input, str) else ""
    text = f"{NOTICE} You said: {said[:200]}" if said else NOTICE
    usage = {
        "input_tokens": _words(body.input),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": len(text.split()),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": _words(body.input) + len(text.split()),
    }
    ident, message = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
    content = {"type": "output_text", "text": text, "annotations": []}
    output = {"type": "message", "id": message, "status": "completed", "role": "assistant"}
    done: dict[str, Any] = {"id": ident, "object": "response", "created_at": int(time.time())}
    done.update(
        {"status": "completed", "model": body.model, "output": [{**output, "content": [content]}]}
    )
    done["usage"] = usage
    if not body.stream:
        return _json(done)
    resp = await _event_stream(request)
    started = {**done, "status": "in_progress", "output": [], "usage": None}
    events: list[tuple[str, dict[str, Any]]] = [("response.created", {"response": started})]
    for word in text.split():
        delta = {"item_id": message, "output_index": 0, "content_index": 0, "delta": word + " "}
        events.append(("response.output_text.delta", delta))
    events.append(("response.completed", {"response": done}))
    for number, (kind, data) in enumerate(events):
        payload = orjson.dumps({"type": kind, "sequence_number": number, **data})
        await resp.write(b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n")
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.Response:
    body = await _body(request, CompletionRequest)
    return _json(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [{"index": 0, "text": NOTICE, "finish_reason": "stop", "logprobs": None}],
            "usage": chat_usage(_words(body.prompt), len(NOTICE.split())),
        }
    )


def _vector(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255 * 2 - 1, 4) for b in digest[:dims]]


async def embeddings(request: web.Request) -> web.Response:
    body = await _body(request, EmbeddingRequest)
    inputs = body.input if isinstance(body.input, list) else [body.input]
    data = [
        {"object": "embedding", "index": i, "embedding": _vector(str(item))}
        for i, item in enumerate(inputs)
    ]
    return _json(
        {
            "object": "list",
            "data": data,
            "model": body.model,
            "usage": {"prompt_tokens": _words(inputs), "total_tokens": _words(inputs)},
        }
    )


async def not_found(request: web.Request) -> web.Response:
    return _error(f"The demo upstream has no {request.method} {request.path}.", 404, "not_found")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer of the demo is OpenAI-style JSON, its own mistakes included."""
    try:
        return await handler(request)
    except BadBody as bad:
        return bad.response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.reason, exc.status, "http_error")
    except Exception:
        log.exception("demo upstream failed on %s %s", request.method, request.path)
        err = {"message": "The demo upstream failed.", "type": "server_error", "param": None}
        return _json({"error": {**err, "code": "internal_error"}}, 500)


def demo_app() -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=32 * 1024 * 1024)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


@contextlib.asynccontextmanager
async def start_demo_upstream() -> AsyncIterator[str]:
    """Serve the demo on a free loopback port; yields its OpenAI base URL."""
    runner = web.AppRunner(demo_app(), access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    log.warning(
        "DEMO UPSTREAM in use: no EDGE_UPSTREAM_URL is set, so answers are canned by edge "
        "itself (http://127.0.0.1:%d/v1), not produced by a model",
        port,
    )
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
        sock.close()
