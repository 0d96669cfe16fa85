"""Checks form parameters the SDK sent against Stripe's OpenAPI spec (vendored in tests/specs).

Form values arrive as strings, so types are checked by what the string must look like; unknown
parameters, missing required ones, enum and maxLength violations are all reported.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

from tests.billing.conftest import SPECS_DIR

_INTEGER = re.compile(r"^-?\d+$")


@cache
def checkout_spec() -> dict[str, Any]:
    spec: dict[str, Any] = json.loads((SPECS_DIR / "stripe-checkout-subset.json").read_text())
    return spec


@cache
def fixtures() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SPECS_DIR / "stripe-fixtures3.json").read_text())["resources"]
    return data


def create_session_schema() -> dict[str, Any]:
    post = checkout_spec()["paths"]["/v1/checkout/sessions"]["post"]
    schema: dict[str, Any] = post["requestBody"]["content"]["application/x-www-form-urlencoded"]["schema"]
    return schema


def list_sessions_parameters() -> dict[str, dict[str, Any]]:
    params = checkout_spec()["paths"]["/v1/checkout/sessions"]["get"]["parameters"]
    return {p["name"]: p["schema"] for p in params}


def problems(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    if "anyOf" in schema:
        branches = [problems(value, branch, path) for branch in schema["anyOf"]]
        return [] if any(not b for b in branches) else min(branches, key=len)
    if "$ref" in schema:
        return []  # outside the subset; nothing to check against
    kind = schema.get("type")
    where = path or "body"
    if kind == "object":
        if not isinstance(value, dict):
            # Stripe lets `metadata=` (empty string) unset an object; anything else is wrong.
            return [] if value == "" else [f"{where}: expected an object, got {value!r}"]
        found: list[str] = []
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key in schema.get("required", []):
            if key not in value:
                found.append(f"{where}: missing required {key!r}")
        for key, item in value.items():
            child = f"{path}[{key}]" if path else key
            if key in properties:
                found += problems(item, properties[key], child)
            elif isinstance(extra, dict):
                found += problems(item, extra, child)
            elif extra is False or properties:
                found.append(f"{child}: not a parameter of this endpoint")
        return found
    if kind == "array":
        if not isinstance(value, list):
            return [f"{where}: expected an array, got {value!r}"]
        out: list[str] = []
        for index, item in enumerate(value):
            out += problems(item, schema.get("items", {}), f"{path}[{index}]")
        return out
    if not isinstance(value, str):
        return [f"{where}: expected a scalar, got {value!r}"]
    if kind == "integer" and not _INTEGER.match(value):
        return [f"{where}: expected an integer, got {value!r}"]
    if kind == "boolean" and value not in ("true", "false"):
        return [f"{where}: expected a boolean, got {value!r}"]
    if kind == "number":
        try:
            float(value)
        except ValueError:
            return [f"{where}: expected a number, got {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} not in {schema['enum']}"]
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        return [f"{where}: longer than {schema['maxLength']}"]
    return []
