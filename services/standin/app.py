"""The stand-in as a bare ASGI application.

It is the upstream in latency benchmarks, so it avoids a framework: one dict lookup routes a
request, orjson writes the bodies, and nothing is computed that the response does not need.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions`` (also
``stream: true``), ``POST /v1/embeddings``, ``POST /v1/images/generations``; and for tests
``GET /_standin/stats``, ``POST /_standin/reset``, ``GET /_standin/images/{name}.png``,
``GET /healthz``. Failure and latency knobs: see :mod:`services.standin.knobs`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from . import content
from .config import StandinConfig
from .knobs import NO_OVERRIDES, KnobError, Knobs, Overrides, parse_headers, parse_model, resolve

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODELS = (
    ("gpt-4o-mini", 1721172741, "system"),
    ("gpt-4o", 1715367049, "system"),
    ("gpt-4.1-mini", 1744318173, "system"),
    ("text-embedding-3-small", 1705948997, "system"),
    ("text-embedding-3-large", 1705953180, "system"),
    ("dall-e-3", 1698785189, "system"),
    ("gpt-image-1", 1745517030, "system"),
)
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_BODY_BYTES = 32 * 1024 * 1024

_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream; charset=utf-8")
_DONE = b"data: [DONE]\n\n"
_FAILURES: dict[int, tuple[str, str, str | None]] = {
    400: ("The stand-in was asked to reject this request.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to sample from this model.", "invalid_request_error", None),
    404: (
        "The model does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    ),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}
_SERVER_ERROR = (
    "The server had an error while processing your request. Sorry about that!",
    "server_error",
    None,
)
_CLIENT_ERROR = ("The stand-in was asked to fail this request.", "invalid_request_error", None)


class DroppedConnection(Exception):
    """Raised mid-response so the server closes the socket without finishing the body."""


class _HideDrops(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        return not (exc and exc[0] is not None and issubclass(exc[0], DroppedConnection))


_drop_filter_installed = False


def _install_drop_filter() -> None:
    # A deliberate drop is not an application error; keep it out of uvicorn's error log.
    global _drop_filter_installed
    if not _drop_filter_installed:
        logging.getLogger("uvicorn.error").addFilter(_HideDrops())
        _drop_filter_installed = True


class ClientGone(Exception):
    pass


class RequestError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def _missing(param: str) -> RequestError:
    return RequestError(
        400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _invalid(param: str, message: str) -> RequestError:
    return RequestError(400, message, param=param, code="invalid_value")


def _optional_int(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _invalid(name, f"Invalid '{name}': expected an integer {bound}.")
    return value


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.streams: Counter[str] = Counter()
        # Non-streamed requests whose client left before the answer (during latency or a hang).
        self.cancelled = 0
        self.recent: deque[dict[str, Any]] = deque(maxlen=50)

    def snapshot(self) -> dict[str, Any]:
        return {
            "total": sum(self.requests.values()),
            "requests": dict(self.requests),
            "by_model": dict(self.by_model),
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "streams": {
                k: self.streams[k] for k in ("started", "completed", "dropped", "stalled", "disconnected")
            },
            "cancelled": self.cancelled,
            "recent": list(self.recent),
        }


class StandinApp:
    def __init__(self, config: StandinConfig) -> None:
        self.config = config
        self.stats = Stats()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = asyncio.Event()
        self._id_prefix = os.urandom(4).hex()
        created = {m: c for m, c, _ in MODELS}
        self._models = {
            m: {"id": m, "object": "model", "created": created[m], "owned_by": owner}
            for m, _, owner in MODELS
        }
        self._models_body = orjson.dumps({"object": "list", "data": list(self._models.values())})
        self._routes: dict[tuple[str, str], tuple[str, Callable[..., Awaitable[None]]]] = {
            ("GET", "/v1/models"): ("models", self._list_models),
            ("POST", "/v1/chat/completions"): ("chat.completions", self._chat),
            ("POST", "/v1/embeddings"): ("embeddings", self._embeddings),
            ("POST", "/v1/images/generations"): ("images.generations", self._images),
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._loop = asyncio.get_running_loop()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # --- plumbing -------------------------------------------------------------------------------

    def release_held(self) -> None:
        """Let held ("timeout"/"stall") requests end now; callable from any thread.

        A stopping server waits for in-flight requests, and a held one would otherwise only end
        when the server gives up and cancels it.
        """
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._closing.set)

    async def _hold(self, disconnected: asyncio.Future[None]) -> bool:
        """Wait until the client leaves (True), or the hang time ends or the server stops (False)."""
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            done, _ = await asyncio.wait(
                (disconnected, closing), timeout=self.config.hang_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            return disconnected in done
        finally:
            closing.cancel()
            disconnected.cancel()

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    async def _respond(
        self, send: Send, status: int, body: bytes, content_type: tuple[bytes, bytes] = _JSON
    ) -> None:
        self.stats.by_status[status] += 1
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    content_type,
                    (b"content-length", b"%d" % len(body)),
                    (b"x-request-id", f"req_{self._next_id()}".encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        route = self._routes.get((method, path))
        try:
            if route is None:
                await self._other(scope, receive, send, method, path)
                return
            endpoint, handler = route
            self.stats.requests[endpoint] += 1
            authorization = b""
            knob_headers: dict[bytes, bytes] = {}
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value
                elif name.startswith(b"x-standin-"):
                    knob_headers[name] = value
            api_key = self._authenticate(authorization)
            header_overrides = parse_headers(knob_headers) if knob_headers else NO_OVERRIDES
            body = await self._read_json(receive) if method == "POST" else {}
            await handler(scope, receive, send, body, header_overrides, api_key, endpoint)
        except RequestError as exc:
            await self._respond(send, exc.status, exc.body)
        except KnobError as exc:
            await self._respond(send, 400, RequestError(400, str(exc)).body)
        except ClientGone:
            return

    def _authenticate(self, authorization: bytes) -> str | None:
        scheme, _, key = authorization.decode("latin-1").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            if not self.config.require_auth:
                return None
            raise RequestError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        if self.config.api_key is not None and key != self.config.api_key:
            raise RequestError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    async def _read_json(self, receive: Receive) -> dict[str, Any]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise RequestError(413, "Request body too large.")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            body = orjson.loads(b"".join(chunks) if len(chunks) != 1 else chunks[0])
        except orjson.JSONDecodeError:
            raise RequestError(
                400,
                "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
                "your HTTP library correctly.)",
            ) from None
        if not isinstance(body, dict):
            raise RequestError(400, "The request body must be a JSON object.")
        return body

    async def _other(self, scope: Scope, receive: Receive, send: Send, method: str, path: str) -> None:
        if method == "GET" and path.startswith("/v1/models/"):
            self.stats.requests["models.retrieve"] += 1
            self._authenticate(dict(scope["headers"]).get(b"authorization", b""))
            model_id = path[len("/v1/models/") :]
            model = self._models.get(model_id) or {
                "id": model_id,
                "object": "model",
                "created": 1700000000,
                "owned_by": "standin",
            }
            await self._respond(send, 200, orjson.dumps(model))
        elif method == "GET" and path == "/_standin/stats":
            await send_plain(send, 200, orjson.dumps(self.stats.snapshot()))
        elif method == "POST" and path == "/_standin/reset":
            self.stats.reset()
            await send_plain(send, 200, b'{"reset":true}')
        elif method == "GET" and path.startswith("/_standin/images/") and path.endswith(".png"):
            await send_plain(send, 200, content.PNG_BYTES, (b"content-type", b"image/png"))
        elif method == "GET" and path == "/healthz":
            await send_plain(send, 200, b'{"status":"ok"}')
        else:
            known_paths = {p for _, p in self._routes}
            status = 405 if path in known_paths else 404
            await self._respond(send, status, RequestError(status, f"Invalid URL ({method} {path})").body)

    def _record(self, endpoint: str, model: str | None, stream: bool, api_key: str | None, body: Any) -> None:
        if model is not None:
            self.stats.by_model[model] += 1
        self.stats.recent.append(
            {"endpoint": endpoint, "model": model, "stream": stream, "api_key": api_key, "body": body}
        )

    async def _before_response(self, receive: Receive, send: Send, knobs: Knobs) -> bool:
        """Apply latency, hang and injected failures; False when the response has been handled."""
        if knobs.latency_s > 0:
            # Watched, so a test can see that a gateway cancelled the call when its client left.
            watcher = asyncio.ensure_future(_disconnected(receive))
            done, _ = await asyncio.wait((watcher,), timeout=knobs.latency_s)
            watcher.cancel()
            if done:
                self.stats.cancelled += 1
                raise ClientGone
        if knobs.timeout:
            if await self._hold(asyncio.ensure_future(_disconnected(receive))):
                self.stats.cancelled += 1
            else:
                body = RequestError(
                    504,
                    "The stand-in held this request until its hang time ran out or it shut down.",
                    "server_error",
                )
                await self._respond(send, 504, body.body)
            return False
        if knobs.fail_status is not None:
            status = knobs.fail_status
            message, type_, code = _FAILURES.get(status) or (
                _SERVER_ERROR if status >= 500 else _CLIENT_ERROR
            )
            await self._respond(send, status, RequestError(status, message, type_, None, code).body)
            return False
        return True

    def _knobs(self, model: str, header_overrides: Overrides) -> Knobs:
        return resolve(self.config, parse_model(model), header_overrides)

    async def _send_maybe_dropped(self, send: Send, body: bytes, knobs: Knobs) -> None:
        if knobs.drop_after is None:
            await self._respond(send, 200, body)
            return
        # Announce the full length, then stop halfway: the client must see a truncated body.
        self.stats.by_status[200] += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [_JSON, (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        _install_drop_filter()
        raise DroppedConnection

    # --- endpoints ------------------------------------------------------------------------------

    async def _list_models(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: dict[str, Any],
        header_overrides: Overrides,
        api_key: str | None,
        endpoint: str,
    ) -> None:
        self._record(endpoint, None, False, api_key, None)
        knobs = resolve(self.config, NO_OVERRIDES, header_overrides)
        if await self._before_response(receive, send, knobs):
            await self._send_maybe_dropped(send, self._models_body, knobs)

    async def _chat(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: dict[str, Any],
        header_overrides: Overrides,
        api_key: str | None,
        endpoint: str,
    ) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _missing("model")
        messages = body.get("messages")
        if messages is None:
            raise _missing("messages")
        if not isinstance(messages, list) or not messages:
            raise _invalid("messages", "Invalid 'messages': expected a non-empty array of message objects.")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
                raise _invalid(
                    f"messages[{i}]", f"Invalid 'messages[{i}]': expected an object with a valid 'role'."
                )
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise _invalid("stream", "Invalid 'stream': expected a boolean.")
        stream_options = body.get("stream_options")
        if stream_options is not None:
            if not stream:
                raise _invalid(
                    "stream_options",
                    "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                )
            if not isinstance(stream_options, dict):
                raise _invalid("stream_options", "Invalid 'stream_options': expected an object.")
        max_tokens = _optional_int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _optional_int(body, "max_tokens", 1)
        n = _optional_int(body, "n", 1, 128) or 1

        knobs = self._knobs(model, header_overrides)
        self._record(endpoint, model, bool(stream), api_key, body)
        if not await self._before_response(receive, send, knobs):
            return

        words = content.reply_words(messages, knobs.reply_words)
        finish_reason = "stop"
        if max_tokens is not None and len(words) > max_tokens:
            words = words[:max_tokens]
            finish_reason = "length"
        prompt_tokens = content.prompt_tokens(messages, body) + knobs.bill_tokens
        usage = _usage(prompt_tokens, len(words) * n)
        completion_id = f"chatcmpl-{self._next_id()}"
        created = int(time.time())
        if stream:
            include_usage = bool(stream_options and stream_options.get("include_usage"))
            await self._stream_chat(
                receive,
                send,
                knobs,
                completion_id,
                created,
                model,
                words,
                n,
                finish_reason,
                usage if include_usage else None,
            )
            return
        text = " ".join(words)
        response = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
                for i in range(n)
            ],
            "usage": usage,
            "service_tier": "default",
            "system_fingerprint": "fp_standin",
        }
        await self._send_maybe_dropped(send, orjson.dumps(response), knobs)

    async def _stream_chat(
        self,
        receive: Receive,
        send: Send,
        knobs: Knobs,
        completion_id: str,
        created: int,
        model: str,
        words: list[str],
        n: int,
        finish_reason: str,
        usage: dict[str, Any] | None,
    ) -> None:
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_standin",
        }
        if usage is not None:
            head["usage"] = None

        def event(index: int, delta: dict[str, Any], finish: str | None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

        def events() -> list[bytes]:
            out: list[bytes] = []
            for i in range(n):
                out.append(event(i, {"role": "assistant", "content": "", "refusal": None}, None))
                out.extend(event(i, {"content": w if j == 0 else " " + w}, None) for j, w in enumerate(words))
                out.append(event(i, {}, finish_reason))
            if usage is not None:
                out.append(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
            return out

        stats = self.stats.streams
        stats["started"] += 1
        self.stats.by_status[200] += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    _SSE,
                    (b"cache-control", b"no-cache"),
                    (b"x-request-id", f"req_{self._next_id()}".encode()),
                ],
            }
        )
        cut_at = knobs.drop_after if knobs.drop_after is not None else knobs.stall_after
        delay = knobs.chunk_delay_s
        # Watching for a disconnect costs a task, so only slow streams do it.
        watcher = asyncio.ensure_future(_disconnected(receive)) if delay > 0 else None
        try:
            for sent, chunk in enumerate(events()):
                if sent == cut_at:
                    break
                if sent and delay > 0:
                    await asyncio.sleep(delay)
                if watcher is not None and watcher.done():
                    stats["disconnected"] += 1
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if knobs.drop_after is not None:
                stats["dropped"] += 1
                _install_drop_filter()
                raise DroppedConnection
            if knobs.stall_after is not None:
                stats["stalled"] += 1
                await self._hold(watcher or asyncio.ensure_future(_disconnected(receive)))
                # Whether the client left or the hang ran out, the stream ends unfinished.
                _install_drop_filter()
                raise DroppedConnection
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
            stats["completed"] += 1
        finally:
            if watcher is not None and not watcher.done():
                watcher.cancel()

    async def _embeddings(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: dict[str, Any],
        header_overrides: Overrides,
        api_key: str | None,
        endpoint: str,
    ) -> None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _missing("model")
        if "input" not in body:
            raise _missing("input")
        inputs = content.embedding_inputs(body["input"])
        if inputs is None:
            raise _invalid(
                "input",
                "Invalid 'input': expected a non-empty string, array of strings, or array of token arrays.",
            )
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _invalid("encoding_format", "Invalid 'encoding_format': expected 'float' or 'base64'.")
        dimensions = content.embedding_dimensions(
            model, _optional_int(body, "dimensions", 1, 3072), self.config.embedding_dimensions
        )
        knobs = self._knobs(model, header_overrides)
        self._record(endpoint, model, False, api_key, body)
        if not await self._before_response(receive, send, knobs):
            return
        data = []
        for index, (text, _) in enumerate(inputs):
            vector = content.embedding(text, dimensions)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": content.embedding_base64(vector) if encoding == "base64" else vector,
                }
            )
        tokens = sum(count for _, count in inputs)
        response = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        await self._send_maybe_dropped(send, orjson.dumps(response), knobs)

    async def _images(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: dict[str, Any],
        header_overrides: Overrides,
        api_key: str | None,
        endpoint: str,
    ) -> None:
        prompt = body.get("prompt")
        if prompt is None:
            raise _missing("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _invalid("prompt", "Invalid 'prompt': expected a non-empty string.")
        model = body.get("model") or "dall-e-2"
        if not isinstance(model, str):
            raise _invalid("model", "Invalid 'model': expected a string.")
        gpt_image = model.startswith("gpt-image")
        response_format = body.get("response_format") or ("b64_json" if gpt_image else "url")
        if response_format not in ("url", "b64_json") or (gpt_image and response_format != "b64_json"):
            raise _invalid("response_format", f"Invalid 'response_format' for {model}: {response_format!r}.")
        n = _optional_int(body, "n", 1, 10) or 1
        knobs = self._knobs(model, header_overrides)
        self._record(endpoint, model, False, api_key, body)
        if not await self._before_response(receive, send, knobs):
            return
        data: list[dict[str, Any]] = []
        for _ in range(n):
            if response_format == "url":
                host = dict(scope["headers"]).get(b"host", b"localhost").decode("latin-1")
                item: dict[str, Any] = {"url": f"http://{host}/_standin/images/{self._next_id()}.png"}
            else:
                item = {"b64_json": content.PNG_B64}
            if model == "dall-e-3":
                item["revised_prompt"] = prompt
            data.append(item)
        response: dict[str, Any] = {"created": int(time.time()), "data": data}
        if gpt_image:
            tokens = content.count_tokens(prompt)
            response["usage"] = {
                "input_tokens": tokens,
                "output_tokens": 272 * n,
                "total_tokens": tokens + 272 * n,
                "input_tokens_details": {"text_tokens": tokens, "image_tokens": 0},
            }
        await self._send_maybe_dropped(send, orjson.dumps(response), knobs)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_plain(send: Send, status: int, body: bytes, content_type: tuple[bytes, bytes] = _JSON) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [content_type, (b"content-length", b"%d" % len(body))],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(config: StandinConfig | None = None) -> StandinApp:
    return StandinApp(config if config is not None else StandinConfig.from_env())
