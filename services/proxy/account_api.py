"""Account endpoints (docs/api.md, Proxy) for the portal and trusted backends, the Stripe webhook passed
through to billing, and the portal's static files (§6.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, Response

from shared.errors import InvalidRequest
from shared.responses import JsonResponse

from .callers import Caller
from .runtime import Proxy
from .upstream import loads_object

router = APIRouter()
PORTAL_DIR = Path(__file__).resolve().parent / "portal"


def _proxy(request: Request) -> Proxy:
    proxy: Proxy = request.app.state.proxy
    return proxy


async def _account_caller(request: Request, *, read_only: bool = False) -> tuple[Proxy, Caller]:
    """The user acting: a sign-in token or the internal token; for the reads (`read_only`) also a
    user API key (docs/api.md, Proxy), which may not manage keys or start a checkout (403)."""
    proxy = _proxy(request)
    caller = await proxy.auth.for_account(
        request.headers.get("authorization"), request.headers.get("x-user-id"), allow_api_key=read_only
    )
    # The first sight of a user creates their account (with the signup credits, once).
    await proxy.credits.ensure_user(caller.user_id)
    return proxy, caller


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    body = loads_object(raw)
    if body is None:
        raise InvalidRequest("The request body must be a JSON object.")
    return body


@router.get("/v1/packs")
async def packs(request: Request) -> Any:
    return await _proxy(request).billing.packs()


@router.get("/v1/account")
async def account(request: Request) -> Any:
    proxy, caller = await _account_caller(request, read_only=True)
    return await proxy.credits.account(caller.user_id)


@router.get("/v1/account/transactions")
async def transactions(request: Request) -> Any:
    proxy, caller = await _account_caller(request, read_only=True)
    query = {k: v for k, v in request.query_params.items() if k in ("limit", "before")}
    return await proxy.credits.transactions(caller.user_id, query)


@router.get("/v1/account/purchases")
async def purchases(request: Request) -> Any:
    proxy, caller = await _account_caller(request, read_only=True)
    return await proxy.billing.purchases(caller.user_id)


@router.post("/v1/account/checkout", status_code=201)
async def checkout(request: Request) -> Any:
    proxy, caller = await _account_caller(request)
    body = await _json_object(request)
    pack = body.get("pack")
    if not isinstance(pack, str) or not pack:
        raise InvalidRequest("pack: a pack id is required.")
    # Never the request's Host header: that would let a link's sender pick where Stripe returns to.
    base = proxy.settings.public_base_url
    return await proxy.billing.checkout(
        {
            "user_id": caller.user_id,
            "pack": pack,
            "success_url": f"{base}/?checkout=success",
            "cancel_url": f"{base}/?checkout=cancel",
        }
    )


@router.get("/v1/account/api-keys")
async def list_keys(request: Request) -> Any:
    proxy, caller = await _account_caller(request)
    return await proxy.credits.list_keys(caller.user_id)


@router.post("/v1/account/api-keys", status_code=201)
async def create_key(request: Request) -> Any:
    proxy, caller = await _account_caller(request)
    body = await _json_object(request)
    payload = {"name": body["name"]} if isinstance(body.get("name"), str) else {}
    return await proxy.credits.create_key(caller.user_id, payload)


@router.delete("/v1/account/api-keys/{key_id}")
async def revoke_key(request: Request, key_id: str) -> Response:
    proxy, caller = await _account_caller(request)
    answer = await proxy.credits.revoke_key(caller.user_id, key_id)
    content_type = answer.header(b"content-type")
    return Response(
        answer.body,
        status_code=answer.status,
        media_type=content_type.decode("latin-1") if content_type and answer.body else None,
    )


@router.post("/v1/webhooks/stripe")
async def stripe_webhook(request: Request) -> Response:
    """Passed to billing byte for byte: the signature covers the raw body."""
    proxy = _proxy(request)
    body = await request.body()
    headers: list[tuple[bytes, bytes]] = []
    for name in (b"stripe-signature", b"content-type", b"user-agent"):
        for key, value in request.headers.raw:
            if key == name:
                headers.append((key, value))
    answer = await proxy.billing.forward_webhook(body, headers)
    if answer.status >= 500:
        # Stripe retries a failed delivery; say so in our envelope.
        return JsonResponse(
            {
                "error": {
                    "type": "api_error",
                    "code": "service_unavailable",
                    "message": "Billing failed; retry.",
                }
            },
            status_code=503,
        )
    content_type = answer.header(b"content-type")
    return Response(
        answer.body,
        status_code=answer.status,
        media_type=content_type.decode("latin-1") if content_type else "application/json",
    )


@router.get("/", include_in_schema=False)
async def portal_index() -> Response:
    return FileResponse(PORTAL_DIR / "index.html", media_type="text/html")
