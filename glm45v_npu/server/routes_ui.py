"""The chat page at / (glm45v serve; --no-ui leaves this module unimported): static files from the package, no
build step. The page needs no key to load; everything it asks of the server (/ui/settings, the API) does. Its
assets are named by content hash (cached for a year, immutable); the page itself is revalidated by ETag. Every
response carries a Content-Security-Policy: scripts only from this server, nothing inline, no other origin."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ..sampling_params import SamplingParams
from .http import error_response
from .state import state_of

UI = Path(__file__).parent / "ui"
ASSETS = {"app.js": "text/javascript", "markdown.js": "text/javascript", "style.css": "text/css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

router = APIRouter()


@cache
def asset(name: str) -> tuple[bytes, str]:
    data = (UI / name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:16]


@cache
def page() -> tuple[bytes, str]:
    html = (UI / "index.html").read_text()
    for name in ASSETS:
        html = html.replace("{{" + name + "}}", f"/ui/static/{name}?v={asset(name)[1]}")
    data = html.encode()
    return data, hashlib.sha256(data).hexdigest()[:16]


def _send(request: Request, data: bytes, digest: str, media_type: str, cache_control: str) -> Response:
    etag = f'"{digest}"'
    headers = {**SECURITY, "ETag": etag, "Cache-Control": cache_control}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)


@router.get("/")
async def index(request: Request):
    return _send(request, *page(), "text/html; charset=utf-8", "no-cache")


@router.get("/ui/static/{name}")
async def static(request: Request, name: str):
    if name not in ASSETS:
        return error_response(404, f"/ui/static/{name}: no such file")
    data, digest = asset(name)
    fresh = request.query_params.get("v") == digest
    return _send(request, data, digest, ASSETS[name],
                 "public, max-age=31536000, immutable" if fresh else "no-cache")


@router.get("/ui/settings")
async def settings(request: Request):
    """What the page shows as defaults (behind the API key, like the API)."""
    state = state_of(request)
    d = SamplingParams(**state.defaults)
    body = {"model": state.config.model_name, "max_model_len": state.max_model_len,
            "api_key": state.config.api_key is not None, "temperature": d.temperature, "top_p": d.top_p,
            "max_tokens": state.defaults.get("max_tokens")}  # none: as the context allows
    return JSONResponse(body, headers={"Cache-Control": "no-store"})
