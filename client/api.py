"""`swarm api`: an OpenAI-compatible HTTP API over the swarm (FastAPI on uvicorn).

    swarm api --model PATH --initial-peers MADDR... [--host H --port P] [--api-key KEY]

Serves `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (the chat template from
the model's tokenizer), streaming by server-sent events or not. Each choice of each request is a swarm
session of its own (client.engine), so concurrent requests share the peers' batching. Honoured:
`max_tokens`, `temperature` (0 = greedy), `top_p`, `seed`, `stop` (up to 4 strings), `n`, `stream`,
`stream_options.include_usage`; `usage` counts tokens; `finish_reason` is "stop" (EOS or a stop string)
or "length". Not supported, refused with 400: `logprobs`, `echo`, `best_of` > n, `suffix`, tools.

Errors come back in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 bad JSON or
parameters (and `context_length_exceeded`), 401 a missing or wrong API key, 404 an unknown model, 413 a
body above --max-request-bytes, 429 above --rate-limit-rpm, 503 overloaded (no free session within
--queue-timeout-s) or blocks of the model that no peer serves (`missing_blocks`) or will take. An error
after a stream began arrives as a last event {"error": ...}. A client that disconnects mid-request frees
its sessions after the step in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from swarm.errors import ConfigError, MissingBlocksError, PeerError, SessionError, SwarmError
from swarm.swarmkey import SwarmKey, load_optional

logger = logging.getLogger(__name__)

try:  # the optional extra `swarm-llm[api]`
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError as e:  # pragma: no cover - depends on the install
    raise ConfigError(f"swarm api needs the 'api' extra: pip install 'swarm-llm[api]' ({e})") from e

from client.engine import Generation, Piece, Sampling

MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class ApiConfig:
    model_path: str
    initial_peers: tuple[str, ...]
    model_id: str | None = None  # the name served and checked in requests (default: the folder's name)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # required as "Authorization: Bearer KEY" when set
    max_request_bytes: int = 1 << 20
    max_concurrency: int = 32  # swarm sessions at once; peers take 32 sessions per client by default
    queue_timeout_s: float = 10.0  # a request waits this long for free sessions, then gets 503
    rate_limit_rpm: float = 0.0  # requests per minute per API key (or client address); 0 = no limit
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask
    default_chat_max_tokens: int = 512  # max_tokens of a chat request that names none (completions: 16)
    max_n: int = 8
    wait_for_route_s: float = 10.0  # how long a request waits for missing blocks before 503
    swarm_key: SwarmKey | None = None  # a private swarm's key (swarm.swarmkey); None = a public swarm
    min_precision: str = "any"  # ClientConfig's: any, 8bit or full
    prefer_full_precision: bool = False
    transport: str = "auto"  # ClientConfig's: auto, hivemind or lite
    verify_probability: float = 0.05  # ClientConfig's (client.verify)

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_concurrency", "max_tokens_limit", "default_chat_max_tokens", "max_n"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("queue_timeout_s", "rate_limit_rpm", "wait_for_route_s"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(math.ceil(self.retry_after_s))} if self.retry_after_s else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def swarm_failure(error: BaseException) -> ApiError:
    """What a failed generation tells the HTTP client."""
    if isinstance(error, MissingBlocksError):
        return ApiError(503, str(error), "service_unavailable", code="missing_blocks", retry_after_s=10)
    if isinstance(error, SessionError | PeerError):
        return ApiError(503, f"the swarm could not serve this request: {error}", "service_unavailable",
                        code="swarm_unavailable", retry_after_s=5)
    logger.error("generation failed", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}", "server_error")


# ---------------------------------------------------------------- request schemas (strict: no coercion)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the chat API's newer name for max_tokens
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | int | None = None

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or not all(stops):
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} non-empty strings", param="stop")
        return tuple(stops)


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    tools: list | None = None


# ---------------------------------------------------------------- limits


class RateLimiter:
    """A token bucket per caller: `rpm` requests a minute, bursts of up to `rpm`. Clock injected."""

    def __init__(self, rpm: float, clock=time.monotonic):
        self.rpm, self.clock = rpm, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def take(self, caller: str) -> float | None:
        """None if the request may go; else the seconds until it could."""
        if self.rpm <= 0:
            return None
        now = self.clock()
        tokens, at = self._buckets.get(caller, (self.rpm, now))
        tokens = min(self.rpm, tokens + (now - at) * self.rpm / 60)
        if tokens < 1:
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) * 60 / self.rpm
        self._buckets[caller] = (tokens - 1, now)
        if len(self._buckets) > 100_000:  # forget full buckets of callers long gone
            self._buckets = {k: v for k, v in self._buckets.items() if v[0] < self.rpm - 1}
        return None


# ---------------------------------------------------------------- the service


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None


@dataclass
class Gateway:
    """The swarm side of the API: the client model, its tokenizer, the session slots."""

    config: ApiConfig
    model: object = None
    tokenizer: object = None
    model_name: str = ""
    context_tokens: int = 0
    _slots: asyncio.Semaphore | None = None
    _threads: ThreadPoolExecutor | None = None
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))

    def start(self) -> None:
        from transformers import AutoTokenizer

        from client import ClientConfig, DistributedModelForCausalLM
        from client import loop as client_loop

        c = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(c.model_path)
        client_config = ClientConfig(initial_peers=c.initial_peers, model_id=c.model_id,
                                     wait_for_route_s=c.wait_for_route_s, swarm_key=c.swarm_key,
                                     min_precision=c.min_precision, prefer_full_precision=c.prefer_full_precision,
                                     transport=c.transport, verify_probability=c.verify_probability)
        self.model = DistributedModelForCausalLM.from_pretrained(c.model_path, client_config=client_config)
        self.model_name = self.model.model_id
        self.context_tokens = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 20)
        self._threads = ThreadPoolExecutor(max_workers=c.max_concurrency, thread_name_prefix="api-session")
        self.limiter = RateLimiter(c.rate_limit_rpm)
        client_loop.run(self.model.transport(), timeout_s=120)  # join the swarm before saying ready

    def stop(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        if self.model is not None:
            self.model.shutdown()

    # ------------------------------------------------------------ requests

    def sampling(self, request: _Request, prompt_tokens: int, default_max: int) -> Sampling:
        if request.logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if request.model != self.model_name:
            raise ApiError(404, f"the model {request.model!r} does not exist here; this server serves "
                                f"{self.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        if request.n > self.config.max_n:
            raise ApiError(400, f"n: at most {self.config.max_n}", param="n")
        asked = request.max_completion_tokens or request.max_tokens
        room = self.context_tokens - prompt_tokens
        if room < 1 or (asked or 0) > room:
            raise ApiError(400, f"this model's context is {self.context_tokens} tokens; the prompt has "
                                f"{prompt_tokens} and {asked or 1} more were asked", param="messages",
                           code="context_length_exceeded")
        max_tokens = asked or min(default_max, room)
        if max_tokens > self.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens: at most {self.config.max_tokens_limit} here", param="max_tokens")
        return Sampling(max_tokens, request.temperature, request.top_p, request.seed, request.stops())

    async def run(self, prompt_ids: list[int], sampling: Sampling, n: int,
                  stream: bool = True) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) of n generations as they come; the first item comes only once every
        choice has produced its first piece or failed (so a failure to start is a plain HTTP error).
        Not `stream`: each choice comes in one piece, once checked (client.engine.Generation)."""
        slots = self._slots = self._slots or asyncio.Semaphore(self.config.max_concurrency)
        taken = 0
        try:
            for _ in range(n):
                await asyncio.wait_for(slots.acquire(), timeout=self.config.queue_timeout_s)
                taken += 1
        except TimeoutError:
            for _ in range(taken):
                slots.release()
            raise ApiError(503, f"overloaded: all {self.config.max_concurrency} sessions are busy; retry later",
                           "service_unavailable", code="overloaded", retry_after_s=2) from None
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        generations = [Generation(self.model, self.tokenizer, prompt_ids,
                                  _with_seed(sampling, i), stream=stream) for i in range(n)]

        def drive(i: int, generation: Generation) -> None:
            try:
                for piece in generation:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, piece))
                loop.call_soon_threadsafe(queue.put_nowait, (i, None))
            except BaseException as e:  # handed to the request's task, which answers with it
                loop.call_soon_threadsafe(queue.put_nowait, (i, e))
            finally:
                loop.call_soon_threadsafe(slots.release)

        for i, generation in enumerate(generations):
            loop.run_in_executor(self._threads, drive, i, generation)
        return _events(queue, generations)


def _with_seed(sampling: Sampling, i: int) -> Sampling:
    if i == 0 or sampling.seed is None:
        return sampling
    return Sampling(sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed + i, sampling.stop)


async def _events(queue: asyncio.Queue, generations: list[Generation]) -> AsyncIterator[tuple[int, Piece]]:
    """Yield the pieces; on the first error or when the consumer stops, cancel every generation."""
    first: list[tuple[int, Piece]] = []
    open_ = set(range(len(generations)))
    started: set[int] = set()
    try:
        while started != open_ and open_:  # hold the first pieces until all choices started (or one failed)
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise swarm_failure(item)
            started.add(i)
            if item is None:
                open_.discard(i)
            else:
                first.append((i, item))
        for event in first:
            yield event
        while open_:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise swarm_failure(item)
            if item is None:
                open_.discard(i)
            else:
                yield i, item
    finally:
        for generation in generations:
            generation.cancel()


# ---------------------------------------------------------------- HTTP


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="Swarm OpenAI-compatible API", version="1")

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return error.response()

    @app.get("/v1/models")
    async def models(request: Request):
        _admit(gateway, request)
        return {"object": "list", "data": [_model_card(gateway)]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request):
        _admit(gateway, request)
        if name != gateway.model_name:
            raise ApiError(404, f"the model {name!r} does not exist here", param="model", code="model_not_found")
        return _model_card(gateway)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _admit(gateway, request)
        body = await _parse(request, CompletionRequest, gateway.config.max_request_bytes)
        if body.echo or body.suffix is not None or (body.best_of or body.n) > body.n:
            raise ApiError(400, "echo, suffix and best_of > n are not supported by this server")
        prompt_ids = _completion_prompt(gateway, body.prompt)
        sampling = gateway.sampling(body, len(prompt_ids), 16)
        events = await _start(gateway, prompt_ids, sampling, body.n, bool(body.stream))
        return await _answer(request, body, events, "text_completion", "cmpl", gateway, len(prompt_ids))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _admit(gateway, request)
        body = await _parse(request, ChatRequest, gateway.config.max_request_bytes)
        if body.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")
        prompt_ids = chat_prompt(gateway.tokenizer, [m.model_dump() | {"content": m.text()} for m in body.messages])
        sampling = gateway.sampling(body, len(prompt_ids), gateway.config.default_chat_max_tokens)
        events = await _start(gateway, prompt_ids, sampling, body.n, bool(body.stream))
        return await _answer(request, body, events, "chat.completion", "chatcmpl", gateway, len(prompt_ids))

    return app


def chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _model_card(gateway: Gateway) -> dict:
    return {"id": gateway.model_name, "object": "model", "created": 0, "owned_by": "swarm"}


def _admit(gateway: Gateway, request: Request) -> None:
    """The API key, then the caller's rate."""
    key = gateway.config.api_key
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if key is not None and not secrets.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", "authentication_error",
                       code="invalid_api_key")
    caller = given or (request.client.host if request.client else "?")
    wait_s = gateway.limiter.take(caller)
    if wait_s is not None:
        raise ApiError(429, f"rate limit of {gateway.config.rate_limit_rpm:g} requests per minute reached",
                       "rate_limit_error", code="rate_limit_exceeded", retry_after_s=wait_s)


async def _parse(request: Request, schema: type[_Request], limit: int) -> _Request:
    if int(request.headers.get("content-length") or 0) > limit:
        raise ApiError(413, f"request body above {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body above {limit} bytes", code="request_too_large")
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise ApiError(400, f"{where}: {problem['msg']}", param=where) from None


def _completion_prompt(gateway: Gateway, prompt) -> list[int]:
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        vocab = gateway.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt: token ids must lie in [0, {vocab})", param="prompt")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: one prompt per request here (send several requests)", param="prompt")
        prompt = prompt[0]
    ids = gateway.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ApiError(400, "prompt: empty", param="prompt")
    return ids


async def _start(gateway: Gateway, prompt_ids, sampling, n, stream: bool):
    events = await gateway.run(prompt_ids, sampling, n, stream)
    # the first item comes once every choice started: a failure to start is an HTTP error, not a stream
    first = await anext(events, None)
    return _prepend(first, events)


async def _prepend(first, events):
    try:
        if first is not None:
            yield first
        async for event in events:
            yield event
    finally:
        await events.aclose()


async def _answer(request: Request, body: _Request, events, kind: str, prefix: str, gateway: Gateway,
                  prompt_tokens: int):
    ident, created = f"{prefix}-{secrets.token_hex(12)}", int(time.time())
    chat = kind == "chat.completion"
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_sse(events, ident, created, gateway.model_name, chat, body.n, prompt_tokens, usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    choices = [_Choice() for _ in range(body.n)]
    async for i, piece in _until_disconnected(request, events):
        choices[i].text += piece.text
        choices[i].tokens, choices[i].finish_reason = piece.tokens, piece.finish_reason or choices[i].finish_reason
    completion = sum(c.tokens for c in choices)
    return {
        "id": ident, "object": kind, "created": created, "model": gateway.model_name,
        "choices": [_final_choice(i, c, chat) for i, c in enumerate(choices)],
        "usage": _usage(prompt_tokens, completion),
    }


async def _until_disconnected(request: Request, events):
    """The events, stopping (and so cancelling the generations) if the HTTP client goes away."""
    pending = asyncio.ensure_future(anext(events, None))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=0.5)
            if not done:
                if await request.is_disconnected():
                    return
                continue
            item = pending.result()
            if item is None:
                return
            yield item
            pending = asyncio.ensure_future(anext(events, None))
    finally:
        pending.cancel()
        await events.aclose()


def _final_choice(i: int, c: _Choice, chat: bool) -> dict:
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
                "logprobs": None}
    return {"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(events, ident, created, model, chat: bool, n: int, prompt_tokens: int, usage: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, **extra) -> str:
        payload = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    tokens = [0] * n
    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                         for i in range(n)])
        async for i, piece in events:
            tokens[i] = piece.tokens
            if piece.text or piece.finish_reason:
                body = ({"delta": {"content": piece.text} if piece.text else {}} if chat
                        else {"text": piece.text, "logprobs": None})
                yield chunk([{"index": i, **body, "finish_reason": piece.finish_reason}])
        if usage:
            yield chunk([], usage=_usage(prompt_tokens, sum(tokens)))
        yield "data: [DONE]\n\n"
    except ApiError as e:  # after the stream began: a last event names the failure
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        await events.aclose()


# ---------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    d = ApiConfig("", ())
    p = argparse.ArgumentParser(prog="swarm api", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder (config, embeddings/head tensors, tokenizer)")
    p.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of a bootstrap node or any peer")
    p.add_argument("--model-id", help="the model id peers announce, and the name served (default: the folder's)")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port, help="HTTP port (0 = any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    p.add_argument("--swarm-key", metavar="FILE", help="a private swarm's key file (from its owner); without it a private swarm refuses you")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes)
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency, help="swarm sessions at once")
    p.add_argument("--queue-timeout-s", type=float, default=d.queue_timeout_s)
    p.add_argument("--rate-limit-rpm", type=float, default=d.rate_limit_rpm, help="per API key or address; 0 = off")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit)
    p.add_argument("--wait-for-route-s", type=float, default=d.wait_for_route_s)
    p.add_argument("--min-precision", choices=["any", "8bit", "full"], default=d.min_precision,
                   help="spans a route may use: any (quantized peers too), 8bit (no 4-bit peers) or full")
    p.add_argument("--prefer-full-precision", action="store_true",
                   help="route through quantized peers only for blocks no full-precision peer serves")
    p.add_argument("--transport", choices=["auto", "hivemind", "lite"], default=d.transport,
                   help="network backend (auto: hivemind where installed, else lite)")
    p.add_argument("--verify-probability", type=float, default=d.verify_probability,
                   help="share of steps a second peer checks (client.verify); 0 = no checks")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    try:
        config = ApiConfig(
            args.model, tuple(args.initial_peers), args.model_id, args.host, args.port, args.api_key,
            args.max_request_bytes, args.max_concurrency, args.queue_timeout_s, args.rate_limit_rpm,
            args.max_tokens_limit, wait_for_route_s=args.wait_for_route_s,
            swarm_key=load_optional(args.swarm_key), min_precision=args.min_precision,
            prefer_full_precision=args.prefer_full_precision, transport=args.transport,
            verify_probability=args.verify_probability,
        )
        sock = socket.create_server((config.host, config.port))
    except (SwarmError, OSError) as e:
        print(f"swarm api: {e}", file=sys.stderr)
        return 1
    gateway = Gateway(config)
    try:
        gateway.start()
        server = uvicorn.Server(uvicorn.Config(create_app(gateway), log_level="warning"))
        host, port = sock.getsockname()[:2]
        print(f"api at http://{host}:{port}/v1 model={gateway.model_name}", flush=True)
        server.run(sockets=[sock])
    except SwarmError as e:
        print(f"swarm api: {e}", file=sys.stderr)
        return 1
    finally:
        gateway.stop()
        sock.close()
    return 0
