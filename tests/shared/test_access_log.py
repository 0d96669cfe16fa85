"""One readable access line per request: request id, user, route, status, credits charged, latency; the
portal's polling only at DEBUG; uvicorn's own lines under the service's name."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from shared.logs import configure_logging, note_request
from shared.web import TemplateRoute, create_service_app
from tests.support.servers import serve_app


def make_app() -> object:
    app = create_service_app("t", max_body_bytes=1000)

    async def charge(request: Request) -> Response:
        note_request(user="alice")  # what the gateway's caller check does
        return Response(b"{}", media_type="application/json", headers={"X-Credits-Charged": "3"})

    app.add_hot_routes([TemplateRoute("/v1/items/{item_id}/charge", charge, methods=["POST"])])

    @app.get("/v1/account")
    async def account() -> dict[str, int]:
        note_request(user="bob")
        return {"credits_remaining": 1}

    return app


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "access"]


async def test_one_line_per_request_with_who_what_and_how_much(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="access")
    async with serve_app(make_app()) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/v1/items/42/charge", headers={"X-Request-Id": "req-123"})
    assert r.status_code == 200
    (line,) = access_lines(caplog)
    text = line.getMessage()
    assert text.startswith("POST /v1/items/42/charge 200 user=alice credits=3 ")
    assert " ms rid=req-123" in text
    fields = line.fields  # type: ignore[attr-defined]
    assert fields["route"] == "/v1/items/{item_id}/charge"
    assert fields["user_id"] == "alice" and fields["credits_charged"] == "3" and fields["status"] == 200
    assert fields["duration_ms"] >= 0


async def test_the_portals_polling_is_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="access")
    async with serve_app(make_app()) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            await client.get("/v1/account", headers={"X-Poll": "1"})
            assert access_lines(caplog) == []
            await client.get("/v1/account")
            caplog.set_level(logging.DEBUG, logger="access")
            await client.get("/v1/account", headers={"X-Poll": "1"})
    first, polled = access_lines(caplog)
    assert first.levelno == logging.INFO and "user=bob credits=- " in first.getMessage()
    assert polled.levelno == logging.DEBUG


def test_uvicorn_lines_carry_the_services_name(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("credits", "INFO", json_format=False)
        # Through uvicorn's own logger, as uvicorn logs it: whatever an earlier in-process server
        # (the test stand-in's uvicorn.Config sets log levels) did to that logger must not hide it.
        logging.getLogger("uvicorn.error").info("Application startup complete.")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    assert "credits INFO credits: Application startup complete." in capsys.readouterr().err
