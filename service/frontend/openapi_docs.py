"""`/docs` (Swagger UI) and `/redoc` that work without the internet.

FastAPI's own pages load their JavaScript and CSS from a CDN, so on an air-gapped
cluster they show a blank page. Here the same pages load the assets that the
`fastapi-offline` package ships (Swagger UI 5, ReDoc 2), served by the app itself.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs-assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def mount_offline_docs(
    app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc", assets_url: str = ASSETS_URL
) -> None:
    """Serve Swagger UI at `docs_url` and ReDoc at `redoc_url` from local assets.

    Build the app with `docs_url=None, redoc_url=None` so FastAPI's CDN pages are not
    registered as well. Paths honour the ASGI `root_path` (a service behind a prefix).
    """
    missing = [name for name in ASSETS if not (ASSETS_DIR / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline lacks {', '.join(missing)} in {ASSETS_DIR}")
    app.mount(assets_url, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or f"{docs_url}/oauth2-redirect"

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect_url}",
            swagger_js_url=f"{root}{assets_url}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{assets_url}/swagger-ui.css",
            swagger_favicon_url=f"{root}{assets_url}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{assets_url}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{assets_url}/favicon.png",
            with_google_fonts=False,
        )
