from __future__ import annotations

import httpx
import pytest
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from shared.errors import Conflict
from shared.responses import JsonResponse
from shared.settings import SharedSettings
from shared.web import ServiceApp, TemplateRoute, create_service_app
from tests.support.servers import serve_app


class Body(BaseModel):
    amount: int


def make_app() -> object:
    app = create_service_app("t", max_body_bytes=1000)

    @app.post("/echo")
    async def echo(body: Body) -> dict[str, int]:
        return {"amount": body.amount}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    @app.get("/conflict")
    async def conflict() -> None:
        raise Conflict("already done")

    async def failing() -> None:
        raise ConnectionError("db down")

    app.state.readiness_checks["db"] = failing
    return app


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, str]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"type", "code", "message"}
    assert err["code"] == code
    assert all(isinstance(v, str) and v for v in err.values())
    return err


async def test_every_error_uses_the_envelope() -> None:
    async with serve_app(make_app()) as url, httpx.AsyncClient(base_url=url) as c:
        assert_envelope(await c.get("/nope"), 404, "not_found")
        assert_envelope(await c.post("/echo", json={"amount": "x"}), 422, "invalid_request")
        assert_envelope(
            await c.post("/echo", content=b"{not json", headers={"content-type": "application/json"}),
            422,
            "invalid_request",
        )
        err = assert_envelope(await c.get("/boom"), 500, "internal_error")
        assert "secret" not in err["message"] and "Traceback" not in err["message"]
        assert_envelope(await c.get("/conflict"), 409, "conflict")
        assert_envelope(await c.delete("/echo"), 405, "method_not_allowed")
        ok = await c.post("/echo", json={"amount": 3})
        assert ok.json() == {"amount": 3}
        assert ok.headers["x-request-id"]
        assert (await c.get("/echo", headers={"x-request-id": "abc"})).headers["x-request-id"] == "abc"


async def test_oversized_body_is_refused_with_413() -> None:
    async with serve_app(make_app()) as url, httpx.AsyncClient(base_url=url) as c:
        assert_envelope(
            await c.post("/echo", content=b"x" * 1001, headers={"content-type": "application/json"}),
            413,
            "payload_too_large",
        )

        async def chunks():  # no content-length: the limit must still hold while streaming
            for _ in range(20):
                yield b" " * 100

        assert_envelope(
            await c.post("/echo", content=chunks(), headers={"content-type": "application/json"}),
            413,
            "payload_too_large",
        )


async def test_probes() -> None:
    async with serve_app(make_app()) as url, httpx.AsyncClient(base_url=url) as c:
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["db"].startswith("failing")
        m = await c.get("/metrics")
        assert "http_request_duration_seconds" in m.text


def test_production_refuses_dev_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="INTERNAL_TOKEN"):
        SharedSettings()
    monkeypatch.setenv("INTERNAL_TOKEN", "a-real-secret")
    assert SharedSettings().internal_token == "a-real-secret"


def make_hot_app() -> ServiceApp:
    app = create_service_app("hot", max_body_bytes=1000)

    async def charge(request: Request) -> JsonResponse:
        body = await request.json()
        if body.get("fail") == "conflict":
            raise Conflict("already charged")
        if body.get("fail") == "crash":
            raise RuntimeError("secret internals")
        # FastAPI's exit-stack middleware marks the scope; the short way never passes it.
        short_way = "fastapi_middleware_astack" not in request.scope
        return JsonResponse({"id": request.path_params["rid"], "short_way": short_way})

    app.add_hot_routes([TemplateRoute("/v1/things/{rid}/charge", charge, methods=["POST"])])
    return app


async def test_hot_routes_answer_as_every_other_route() -> None:
    """Hot routes skip FastAPI's stack, yet keep the envelope, body limit, request id and metrics."""
    async with serve_app(make_hot_app()) as url, httpx.AsyncClient(base_url=url) as c:
        ok = await c.post("/v1/things/t1/charge", json={}, headers={"x-request-id": "rid-1"})
        assert ok.json() == {"id": "t1", "short_way": True}
        assert ok.headers["x-request-id"] == "rid-1"
        assert_envelope(await c.post("/v1/things/t1/charge", json={"fail": "conflict"}), 409, "conflict")
        err = assert_envelope(
            await c.post("/v1/things/t1/charge", json={"fail": "crash"}), 500, "internal_error"
        )
        assert "secret" not in err["message"]
        # Another method on a hot path goes through FastAPI, which answers 405 in the envelope.
        assert_envelope(await c.get("/v1/things/t1/charge"), 405, "method_not_allowed")

        async def chunks():  # no content-length: the limit holds on the short way too
            for _ in range(20):
                yield b" " * 100

        assert_envelope(
            await c.post(
                "/v1/things/t1/charge", content=chunks(), headers={"content-type": "application/json"}
            ),
            413,
            "payload_too_large",
        )
        metrics = (await c.get("/metrics")).text
        # Labelled by the route template, never the raw path.
        assert 'route="/v1/things/{rid}/charge",service="hot",status="409"' in metrics
        assert "/v1/things/t1/charge" not in metrics
