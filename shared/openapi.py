"""A service's `openapi.json`: FastAPI's description of its routes, completed with what FastAPI cannot
see: the hot routes (plain Starlette), the probes, the security schemes each operation accepts, and the
error envelope every failure answers with."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

Security = list[dict[str, list[str]]]

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "code", "message"],
            "properties": {
                "type": {"type": "string", "example": "invalid_request_error"},
                "code": {"type": "string", "example": "invalid_request"},
                "message": {"type": "string"},
            },
        }
    },
}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def ok(description: str, schema: dict[str, Any], status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": json_content(schema)}}


ERROR_RESPONSE = {
    "description": "An error, in the envelope every service uses.",
    "content": json_content(ref("Error")),
}

PROBES: dict[str, Any] = {
    "/healthz": {
        "get": {
            "summary": "The process is alive",
            "tags": ["probes"],
            "security": [],
            "responses": ok("Alive", {"type": "object", "properties": {"status": {"const": "ok"}}}),
        }
    },
    "/readyz": {
        "get": {
            "summary": "Its database, Redis and broker connections work",
            "tags": ["probes"],
            "security": [],
            "responses": {
                **ok(
                    "Ready",
                    {
                        "type": "object",
                        "properties": {
                            "status": {"enum": ["ready", "not_ready"]},
                            "checks": {"type": "object", "additionalProperties": {"type": "string"}},
                        },
                    },
                ),
                "503": {"description": "Not ready: `checks` says which dependency fails"},
            },
        }
    },
    "/metrics": {
        "get": {
            "summary": "Prometheus metrics",
            "tags": ["probes"],
            "security": [],
            "responses": {
                "200": {
                    "description": "Text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    },
}


def describe_openapi(
    app: FastAPI,
    *,
    security_schemes: dict[str, Any],
    security_of: Callable[[str, str], Security],
    paths: dict[str, Any] | None = None,
    schemas: dict[str, Any] | None = None,
) -> None:
    """Replaces `app.openapi` with FastAPI's description completed as the module docstring says.
    `security_of(method, path)` names the schemes an operation accepts ([] for none)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if getattr(app.state, "openapi_described", None) is not None:
            cached: dict[str, Any] = app.state.openapi_described
            return cached
        spec = copy.deepcopy(generate())
        all_paths: dict[str, Any] = spec.setdefault("paths", {})
        for path, operations in {**PROBES, **(paths or {})}.items():
            for method, operation in operations.items():
                all_paths.setdefault(path, {}).setdefault(method, copy.deepcopy(operation))
        components = spec.setdefault("components", {})
        found = components.setdefault("schemas", {})
        found.update(copy.deepcopy(schemas or {}))
        found["Error"] = ERROR_SCHEMA
        # FastAPI's own validation-error schemas never reach a client: the envelope replaces them.
        found.pop("HTTPValidationError", None)
        found.pop("ValidationError", None)
        components["securitySchemes"] = security_schemes
        for path, operations in all_paths.items():
            for method, operation in operations.items():
                if "security" not in operation:
                    operation["security"] = security_of(method.upper(), path)
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {
                        "description": "Invalid body or parameters",
                        "content": json_content(ref("Error")),
                    }
                if path not in PROBES:
                    responses.setdefault("default", ERROR_RESPONSE)
        app.state.openapi_described = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
