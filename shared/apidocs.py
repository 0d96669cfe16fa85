"""`/docs`: Swagger UI for the service's `openapi.json`, served from files shipped in this package
(shared/swagger_ui, from npm's swagger-ui-dist) so the page works offline and loads nothing from a CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

from shared.routing import TemplateMount

SWAGGER_UI_DIR = Path(__file__).resolve().parent / "swagger_ui"
STATIC_PREFIX = "/docs/static"


def install_docs(app: FastAPI) -> None:
    """Adds `GET /docs` and the Swagger UI files under `/docs/static/` (the app has `docs_url=None`)."""
    app.router.routes.append(
        TemplateMount(STATIC_PREFIX, StaticFiles(directory=SWAGGER_UI_DIR), name="swagger-ui")
    )

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API docs",
            swagger_js_url=f"{root}{STATIC_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_PREFIX}/favicon-32x32.png",
            # validatorUrl None: no call to an online validator, nothing leaves the machine.
            swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None},
        )

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
