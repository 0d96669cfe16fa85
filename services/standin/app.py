"""The stand-in as a bare ASGI application.

It is the upstream in latency benchmarks, so it avoids a framework: one dict lookup routes a
request, orjson writes the bodies, and nothing is computed that the response does not need.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}`` (:mod:`.models`), ``POST /v1/chat/completions``
(also ``stream: true``; :mod:`.chat`), ``POST /v1/embeddings`` (:mod:`.embeddings`),
``POST /v1/images/generations`` (:mod:`.images`); and for tests ``GET /_standin/stats``,
``POST /_standin/reset``, ``GET /_standin/images/{name}.png``, ``GET /healthz``. What they share
(authentication, answers, the knobs' effects) is in :mod:`.responder`; the failure and latency
knobs are described in :mod:`services.standin.knobs`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson

from . import content
from .asgi import Receive, Scope, Send, read_json, send_plain
from .chat import chat
from .config import StandinConfig
from .embeddings import embeddings
from .errors import ClientGone, RequestError
from .images import images
from .knobs import NO_OVERRIDES, KnobError, parse_headers
from .models import list_models, model_body
from .responder import Call, Responder
from .stats import Stats

Handler = Callable[[Responder, Call], Awaitable[None]]
_ROUTES: dict[tuple[str, str], tuple[str, Handler]] = {
    ("GET", "/v1/models"): ("models", list_models),
    ("POST", "/v1/chat/completions"): ("chat.completions", chat),
    ("POST", "/v1/embeddings"): ("embeddings", embeddings),
    ("POST", "/v1/images/generations"): ("images.generations", images),
}
_KNOWN_PATHS = frozenset(path for _, path in _ROUTES)


class StandinApp:
    def __init__(self, config: StandinConfig) -> None:
        self.config = config
        self.stats = Stats()
        self._responder = Responder(config, self.stats)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self._responder.started()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    def release_held(self) -> None:
        """Let held ("timeout"/"stall") requests end now; callable from any thread."""
        self._responder.release_held()

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        route = _ROUTES.get((method, path))
        responder = self._responder
        try:
            if route is None:
                await self._other(scope, send, method, path)
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
            api_key = responder.authenticate(authorization)
            overrides = parse_headers(knob_headers) if knob_headers else NO_OVERRIDES
            body = await read_json(receive) if method == "POST" else {}
            await handler(responder, Call(scope, receive, send, body, overrides, api_key, endpoint))
        except RequestError as exc:
            await responder.respond(send, exc.status, exc.body)
        except KnobError as exc:
            await responder.respond(send, 400, RequestError(400, str(exc)).body)
        except ClientGone:
            return

    async def _other(self, scope: Scope, send: Send, method: str, path: str) -> None:
        if method == "GET" and path.startswith("/v1/models/"):
            self.stats.requests["models.retrieve"] += 1
            self._responder.authenticate(dict(scope["headers"]).get(b"authorization", b""))
            await self._responder.respond(send, 200, model_body(path[len("/v1/models/") :]))
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
            status = 405 if path in _KNOWN_PATHS else 404
            await self._responder.respond(
                send, status, RequestError(status, f"Invalid URL ({method} {path})").body
            )


def create_app(config: StandinConfig | None = None) -> StandinApp:
    return StandinApp(config if config is not None else StandinConfig.from_env())
