"""Billing's `openapi.json`: which credential each route takes, and the local test checkout pages."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from shared.openapi import Security, describe_openapi

SECURITY_SCHEMES: dict[str, Any] = {
    "internalToken": {"type": "http", "scheme": "bearer", "description": "INTERNAL_TOKEN"},
    "stripeSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "Stripe-Signature",
        "description": "Stripe's webhook signature",
    },
}

SESSION_ID = [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def _page(method: str, summary: str) -> dict[str, Any]:
    return {
        method: {
            "summary": summary,
            "tags": ["local test mode"],
            "security": [],
            "parameters": SESSION_ID,
            "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                "303": {"description": "Back to the portal"},
            },
        }
    }


def extra_paths() -> dict[str, Any]:
    """The local test checkout (no STRIPE_API_KEY): a page marked TEST MODE, and its Pay and Cancel buttons."""
    return {
        "/test-checkout/{session_id}": _page("get", "The test checkout page"),
        "/test-checkout/{session_id}/pay": _page(
            "post", "Pay: a signed checkout.session.completed goes through the webhook"
        ),
        "/test-checkout/{session_id}/cancel": _page("post", "Cancel: the session expires"),
    }


def security_of(method: str, path: str) -> Security:
    if path == "/v1/packs":
        return []
    if path == "/v1/webhooks/stripe":
        return [{"stripeSignature": []}]
    return [{"internalToken": []}]


def describe(app: FastAPI) -> None:
    describe_openapi(app, security_schemes=SECURITY_SCHEMES, security_of=security_of, paths=extra_paths())
