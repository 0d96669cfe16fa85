"""The gateway's `openapi.json`: the OpenAI-compatible endpoints with OpenAI's own schemas (shipped in
openai_schemas.json), the account endpoints, the portal, and who may call what."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from shared.openapi import Security, describe_openapi, json_content, ok, ref

OPENAI_SCHEMAS = Path(__file__).resolve().parent / "openai_schemas.json"

SECURITY_SCHEMES: dict[str, Any] = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A user's API key (portal → API keys); its account must have the API unlocked.",
    },
    "internalToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "INTERNAL_TOKEN: a trusted back end acting for the user named in X-User-Id.",
    },
    "userId": {"type": "apiKey", "in": "header", "name": "X-User-Id", "description": "With internalToken."},
    "userJwt": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A signed-in user: HS256 with USER_TOKEN_SECRET, `sub` = user id, `exp` required.",
    },
    "stripeSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "Stripe-Signature",
        "description": "Stripe's webhook signature (checked by billing).",
    },
}

AS_BACKEND: Security = [{"internalToken": [], "userId": []}]
OPENAI_CALLERS: Security = [{"apiKey": []}, *AS_BACKEND]
ACCOUNT_CALLERS: Security = [{"userJwt": []}, *AS_BACKEND]
ACCOUNT_READERS: Security = [*ACCOUNT_CALLERS, {"apiKey": []}]
READ_ONLY = {"/v1/account", "/v1/account/transactions", "/v1/account/purchases"}

ACCOUNT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "user_id": {"type": "string"},
        "credits_remaining": {"type": "integer", "description": "What can still be held and spent"},
        "credits_reserved": {"type": "integer"},
        "credits_purchased_total": {"type": "integer"},
        "credits_lifetime_used": {"type": "integer"},
        "api_access_unlocked": {"type": "boolean"},
        "tier": {"type": "string", "description": "The largest pack ever bought, or free"},
        "support_tier": {"type": "string"},
        "low_balance": {"type": "boolean"},
        "last_purchase_date": {"type": ["string", "null"], "format": "date-time"},
        "last_purchase_amount": {"type": ["integer", "null"]},
        "created_at": {"type": "string", "format": "date-time"},
    },
}

CREDIT_HEADERS: dict[str, Any] = {
    "X-Credits-Charged": {"description": "Credits this request cost", "schema": {"type": "integer"}},
    "X-Credits-Remaining": {"description": "Credits left to spend", "schema": {"type": "integer"}},
    "X-Credits-Low": {
        "description": "`true` at or below the low-balance threshold",
        "schema": {"type": "string"},
    },
}

CHARGED_ERRORS: dict[str, Any] = {
    "402": {
        "description": "Not enough credits (`insufficient_credits`); nothing was charged",
        "content": json_content(ref("Error")),
    },
    "403": {
        "description": "The API key's account has not unlocked the API (`api_access_locked`)",
        "content": json_content(ref("Error")),
    },
    "502": {
        "description": "The AI provider failed or is unreachable (`upstream_error`)",
        "content": json_content(ref("Error")),
    },
    "504": {
        "description": "The AI provider did not answer in time (`upstream_timeout`)",
        "content": json_content(ref("Error")),
    },
}


def _openai_operation(
    summary: str, request: str, response: str, *, stream: str | None = None
) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": ref(response)}}
    if stream:
        content["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": f"With `stream: true`: `data: <{stream}>` events, then `data: [DONE]`",
            }
        }
    return {
        "post": {
            "summary": summary,
            "tags": ["OpenAI-compatible"],
            "requestBody": {"required": True, "content": json_content(ref(request))},
            "responses": {
                "200": {"description": "OpenAI's answer", "headers": CREDIT_HEADERS, "content": content},
                **CHARGED_ERRORS,
            },
        }
    }


def extra_paths() -> dict[str, Any]:
    """The routes FastAPI does not describe: the OpenAI-compatible ones (plain Starlette) and the portal."""
    return {
        "/v1/models": {
            "get": {
                "summary": "The models the provider offers (free)",
                "tags": ["OpenAI-compatible"],
                "responses": ok("The model list", ref("ListModelsResponse")),
            }
        },
        "/v1/chat/completions": _openai_operation(
            "A chat completion, charged per the pricing file",
            "CreateChatCompletionRequest",
            "CreateChatCompletionResponse",
            stream="CreateChatCompletionStreamResponse",
        ),
        "/v1/embeddings": _openai_operation(
            "Embeddings", "CreateEmbeddingRequest", "CreateEmbeddingResponse"
        ),
        "/v1/images/generations": _openai_operation("Images", "CreateImageRequest", "ImagesResponse"),
        "/": {
            "get": {
                "summary": "The customer portal (sign in with /#token=<user JWT>)",
                "tags": ["portal"],
                "security": [],
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            }
        },
    }


@cache
def openai_schemas() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(OPENAI_SCHEMAS.read_text())["schemas"]
    return data


def security_of(method: str, path: str) -> Security:
    if path == "/v1/packs":
        return []
    if path == "/v1/webhooks/stripe":
        return [{"stripeSignature": []}]
    if path.startswith("/v1/account"):
        return ACCOUNT_READERS if method == "GET" and path in READ_ONLY else ACCOUNT_CALLERS
    return OPENAI_CALLERS


def _account_answers(spec_paths: dict[str, Any]) -> None:
    operation = spec_paths.get("/v1/account", {}).get("get")
    if operation is not None:
        operation["responses"]["200"] = ok("The account", ref("Account"))["200"]
    for path, operations in spec_paths.items():
        for operation in operations.values():
            if not operation.get("tags"):
                operation["tags"] = ["account"] if path.startswith("/v1/account") else ["packs and payments"]


def describe(app: FastAPI) -> None:
    describe_openapi(
        app,
        security_schemes=SECURITY_SCHEMES,
        security_of=security_of,
        paths=extra_paths(),
        schemas={**openai_schemas(), "Account": ACCOUNT},
    )
    described = app.openapi

    def openapi() -> dict[str, Any]:
        spec = described()
        _account_answers(spec["paths"])
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
