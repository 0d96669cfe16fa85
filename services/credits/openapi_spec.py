"""Credits' `openapi.json`: its hot routes (plain Starlette, unseen by FastAPI) with their bodies, and
which token each route takes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from services.credits.api_bodies import CommitBody, ReserveBody, SettleBatch, VerifyKey
from shared.openapi import Security, describe_openapi, json_content, ok, ref

SECURITY_SCHEMES: dict[str, Any] = {
    "internalToken": {"type": "http", "scheme": "bearer", "description": "INTERNAL_TOKEN"},
    "adminToken": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"},
}

RESERVATION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reservation_id": {"type": "string"},
        "user_id": {"type": "string"},
        "amount": {"type": "integer"},
        "status": {"type": "string"},
        "expires_at": {"type": "string", "format": "date-time"},
        "credits_remaining": {"type": "integer"},
    },
}
SETTLEMENT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reservation_id": {"type": "string"},
        "charged": {"type": "integer", "description": "Commits only"},
        "refunded": {"type": "integer"},
        "credits_remaining": {"type": "integer"},
    },
}
BATCH_RESULTS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "results": {
            "type": "array",
            "description": "One per item, in order: the status and body the single call would have answered",
            "items": {
                "type": "object",
                "properties": {"status": {"type": "integer"}},
                "additionalProperties": True,
            },
        }
    },
}
VERIFIED_KEY: dict[str, Any] = {
    "type": "object",
    "properties": {
        "user_id": {"type": "string"},
        "key_id": {"type": "string"},
        "api_access_unlocked": {"type": "boolean"},
    },
}
RESERVATION_ID = [{"name": "reservation_id", "in": "path", "required": True, "schema": {"type": "string"}}]


# Request bodies are the routes' own pydantic models; their nested models become components too.
BODY_SCHEMAS: dict[str, Any] = {}


def _body(model: type[Any]) -> dict[str, Any]:
    schema: dict[str, Any] = model.model_json_schema(ref_template="#/components/schemas/{model}")
    BODY_SCHEMAS.update(schema.pop("$defs", {}))
    return schema


def _post(
    summary: str, body: type[Any], answer: dict[str, Any], status: str = "200", **extra: Any
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "tags": ["reservations"],
            "requestBody": {"required": status == "201", "content": json_content(_body(body))},
            "responses": ok(summary, answer, status),
            **extra,
        }
    }


def extra_paths() -> dict[str, Any]:
    return {
        "/v1/reservations": _post("Hold credits", ReserveBody, ref("Reservation"), "201"),
        "/v1/reservations/batch": _post("Settle and record many holds", SettleBatch, ref("BatchResults")),
        "/v1/reservations/{reservation_id}/commit": _post(
            "Charge a hold (the rest goes back)", CommitBody, ref("Settlement"), parameters=RESERVATION_ID
        ),
        "/v1/reservations/{reservation_id}/release": {
            "post": {
                "summary": "Give a hold back",
                "tags": ["reservations"],
                "parameters": RESERVATION_ID,
                "responses": ok("Released", ref("Settlement")),
            }
        },
        "/v1/api-keys/verify": _post("Whose key is this", VerifyKey, ref("VerifiedKey")),
        "/admin/": {
            "get": {
                "summary": "The operator dashboard (signs in with the admin token)",
                "tags": ["admin"],
                "security": [],
                "responses": {
                    "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}
                },
            }
        },
    }


def security_of(method: str, path: str) -> Security:
    return [{"adminToken": []}] if path.startswith("/v1/admin/") else [{"internalToken": []}]


def describe(app: FastAPI) -> None:
    paths = extra_paths()
    describe_openapi(
        app,
        security_schemes=SECURITY_SCHEMES,
        security_of=security_of,
        paths=paths,
        schemas={
            **BODY_SCHEMAS,
            "Reservation": RESERVATION,
            "Settlement": SETTLEMENT,
            "BatchResults": BATCH_RESULTS,
            "VerifiedKey": VERIFIED_KEY,
        },
    )
