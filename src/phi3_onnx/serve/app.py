"""The FastAPI app: /v1/models, /v1/chat/completions, /v1/completions, /health."""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Optional

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from phi3_onnx.errors import Phi3OnnxError
from phi3_onnx.runtime.options import GenerationOptions
from phi3_onnx.serve.errors import HANDLERS, APIError, error_body, error_response
from phi3_onnx.serve.options import ServeOptions
from phi3_onnx.serve.schemas import ChatCompletionRequest, CompletionRequest, ResponseFormat
from phi3_onnx.serve.service import Finish, Service

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
JSON_OBJECT = {"type": "object"}


def create_app(service: Service, options: ServeOptions) -> FastAPI:
    app = FastAPI(title="phi3-onnx", docs_url=None, redoc_url=None, openapi_url=None)
    for exc, handler in HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)
    auth = Depends(_auth(options.api_key))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.model_id, **service.stats()}

    @app.get("/v1/models", dependencies=[auth])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(service)]}

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat(body: ChatCompletionRequest) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        ids = _prompt_ids(service, messages)
        opts = _options(service, body, len(ids), body.budget(), None, _schema(body.response_format))
        if body.stream:
            return _sse(_chat_chunks(service, ids, opts, body.stream_options is not None and body.stream_options.include_usage))
        return await _chat_response(service, ids, opts)

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest) -> Any:
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", param="echo" if body.echo else "suffix")
        ids = _completion_ids(service, body.prompt)
        opts = _options(service, body, len(ids), body.budget(), COMPLETIONS_DEFAULT_MAX_TOKENS, None)
        if body.stream:
            return _sse(_text_chunks(service, ids, opts, body.stream_options is not None and body.stream_options.include_usage))
        return await _text_response(service, ids, opts)

    return app


# --- requests -> runtime -----------------------------------------------------------------------
def _auth(api_key: Optional[str]):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    return check


def _model_card(service: Service) -> dict[str, Any]:
    m = service.model
    return {"id": service.model_id, "object": "model", "created": 0, "owned_by": "phi3-onnx",
            "context_length": m.max_length, "target": m.manifest.target.name, "provider": m.provider}


def _prompt_ids(service: Service, messages: list[dict[str, str]]) -> list[int]:
    try:
        return service.model.prompt_ids(messages)
    except Phi3OnnxError as exc:
        raise APIError(400, str(exc), param="messages") from None


def _completion_ids(service: Service, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        vocab = service.model.manifest.model.vocab_size
        if any(not 0 <= p < vocab for p in prompt):
            raise APIError(400, f"token ids must be in 0..{vocab - 1}", param="prompt")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "exactly one prompt per request", param="prompt")
        prompt = prompt[0]
    try:
        return service.model.prompt_ids(prompt)
    except Phi3OnnxError as exc:
        raise APIError(400, str(exc), param="prompt") from None


def _schema(fmt: Optional[ResponseFormat]) -> Optional[dict[str, Any]]:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT
    if fmt.json_schema is None:
        raise APIError(400, "response_format json_schema needs a json_schema object", param="response_format")
    return fmt.json_schema.schema_ or {}


def _options(service: Service, body: Any, n_prompt: int, budget: Optional[int], default: Optional[int],
             schema: Optional[dict[str, Any]]) -> GenerationOptions:
    """Checked options; the prompt plus max_tokens must fit the loaded context (max_length)."""
    room = service.model.max_length - n_prompt
    if room < 1:
        raise APIError(400, f"the prompt is {n_prompt} tokens; this server's context is {service.model.max_length}",
                       param="messages", code="context_length_exceeded")
    if budget is not None and budget > room:
        raise APIError(400, f"max_tokens is {budget} but only {room} tokens are left after the {n_prompt}-token prompt "
                            f"(context {service.model.max_length})", param="max_tokens", code="context_length_exceeded")
    tokens = budget or min(default or room, room)
    try:
        return GenerationOptions.build(tokens, body.temperature, body.top_p, body.top_k, body.seed, body.stops(),
                                       json_schema=schema)
    except Phi3OnnxError as exc:
        raise APIError(400, str(exc), param="response_format" if schema is not None else None) from None


# --- responses ---------------------------------------------------------------------------------
def _usage(f: Finish) -> dict[str, int]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}


async def _collect(service: Service, ids: list[int], opts: GenerationOptions) -> tuple[str, Finish]:
    pieces: list[str] = []
    async for item in service.stream(ids, opts):
        if isinstance(item, Finish):
            if item.reason == "error":
                raise APIError(503 if item.message == "busy" else 500, item.message or "generation failed",
                               "server_error")
            return "".join(pieces), item
        pieces.append(item)
    raise APIError(500, "generation ended without a result", "server_error")


def _envelope(kind: str, model: str) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()), "model": model}


async def _chat_response(service: Service, ids: list[int], opts: GenerationOptions) -> dict[str, Any]:
    text, finish = await _collect(service, ids, opts)
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.reason,
              "logprobs": None}
    return {**_envelope("chat.completion", service.model_id), "choices": [choice], "usage": _usage(finish)}


async def _text_response(service: Service, ids: list[int], opts: GenerationOptions) -> dict[str, Any]:
    text, finish = await _collect(service, ids, opts)
    choice = {"index": 0, "text": text, "finish_reason": finish.reason, "logprobs": None}
    return {**_envelope("text_completion", service.model_id), "choices": [choice], "usage": _usage(finish)}


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_chunks(service: Service, ids: list[int], opts: GenerationOptions,
                       usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = _envelope("chat.completion.chunk", service.model_id)

    def chunk(delta: dict[str, Any], reason: Optional[str] = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

    yield chunk({"role": "assistant", "content": ""})
    async for item in service.stream(ids, opts):
        if isinstance(item, Finish):
            if item.reason == "error":
                yield error_body(item.message or "generation failed", "server_error")
                return
            yield chunk({}, item.reason)
            if usage:
                yield {**head, "choices": [], "usage": _usage(item)}
            return
        yield chunk({"content": item})


async def _text_chunks(service: Service, ids: list[int], opts: GenerationOptions,
                       usage: bool) -> AsyncIterator[dict[str, Any]]:
    head = _envelope("text_completion", service.model_id)
    async for item in service.stream(ids, opts):
        if isinstance(item, Finish):
            if item.reason == "error":
                yield error_body(item.message or "generation failed", "server_error")
                return
            yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": item.reason, "logprobs": None}]}
            if usage:
                yield {**head, "choices": [], "usage": _usage(item)}
            return
        yield {**head, "choices": [{"index": 0, "text": item, "finish_reason": None, "logprobs": None}]}


# --- request body limit --------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a body over `limit` bytes gets a 413 (by Content-Length, or while it streams in)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"request body is over {self.limit} bytes", code="body_too_large")
            return message

        await self.app(scope, counted, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        response = error_response(413, f"request body is over {self.limit} bytes", code="body_too_large")
        await response(scope, receive, send)


__all__ = ["create_app", "JSONResponse"]
