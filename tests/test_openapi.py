"""Every service's `openapi.json` describes every route it serves (the OpenAI-compatible ones with
OpenAI's own schemas), with the credentials each accepts; `/docs` renders it from files the service
ships, never from a CDN."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.test_docs import apps, routes

# Served, but not API: the docs themselves.
NOT_API = {"/docs", "/openapi.json"}


@pytest.fixture(scope="module")
def specs() -> dict[str, tuple[Any, dict[str, Any]]]:
    found = {}
    for service, app in apps().items():
        response = TestClient(app).get("/openapi.json")
        assert response.status_code == 200, response.text
        found[service] = (app, response.json())
    return found


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref" and isinstance(v, str)] + [
            r for k, v in node.items() if k != "$ref" for r in refs(v)
        ]
    if isinstance(node, list):
        return [r for item in node for r in refs(item)]
    return []


@pytest.mark.parametrize("service", ["proxy", "billing", "credits"])
def test_every_route_is_described_with_its_credentials(specs: dict[str, Any], service: str) -> None:
    app, spec = specs[service]
    paths = spec["paths"]
    missing = [
        f"{method} {path}"
        for method, path in routes(app.routes)
        if path not in NOT_API and method.lower() not in paths.get(path, {})
    ]
    assert not missing, f"{service}: not in openapi.json: {missing}"
    schemes = spec["components"]["securitySchemes"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert "security" in operation, f"{method} {path}: who may call it?"
            for requirement in operation["security"]:
                assert set(requirement) <= set(schemes), f"{method} {path}: {requirement}"
            assert "200" in operation["responses"] or "201" in operation["responses"], f"{method} {path}"
    schemas = spec["components"]["schemas"]
    dangling = {r for r in refs(spec) if r.removeprefix("#/components/schemas/") not in schemas}
    assert not dangling, f"{service}: unresolved $refs {sorted(dangling)}"


def test_the_openai_endpoints_have_openais_schemas(specs: dict[str, Any]) -> None:
    _, spec = specs["proxy"]
    chat = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateChatCompletionRequest"
    }
    answer = chat["responses"]["200"]
    assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/CreateChatCompletionResponse")
    assert "text/event-stream" in answer["content"]
    assert {"X-Credits-Charged", "X-Credits-Remaining"} <= set(answer["headers"])
    assert {"402", "403", "502", "504", "default"} <= set(chat["responses"])
    # OpenAI's own definition, not a placeholder: the choices' message and the usage are there.
    response = spec["components"]["schemas"]["CreateChatCompletionResponse"]
    assert {"id", "choices", "created", "model", "object"} <= set(response["required"])
    assert chat["security"] == [{"apiKey": []}, {"internalToken": [], "userId": []}]
    assert spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/ListModelsResponse"}
    assert spec["paths"]["/v1/packs"]["get"]["security"] == []
    assert spec["paths"]["/v1/account"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/Account"}


@pytest.mark.parametrize("service", ["proxy", "billing", "credits"])
def test_docs_load_nothing_from_elsewhere(specs: dict[str, Any], service: str) -> None:
    app, _ = specs[service]
    client = TestClient(app)
    page = client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/") for s in sources), sources
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200 and len(asset.content) > 100, source
    assert "url: '/openapi.json'" in page.text
