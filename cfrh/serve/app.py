"""HTTP in front of a :class:`~cfrh.serve.service.SearchService`: the JSON API, thumbnails and the page.

Routes (every error is JSON ``{"error": "<one line>"}`` with a 4xx status)::

    GET  /                      the page (page.html: no build step, no external assets)
    GET  /healthz               {"ok": true, ...}
    GET  /api/info              what the page needs first: pipeline, bits, which queries work, examples
    GET  /api/search?text=T&k=10              a text → images
    GET  /api/search?id=ID&modality=image&k=10  a stored item → the other modality, and its own
    POST /api/search            an image (multipart field "image", or the body with an image/* type) → texts
    GET  /api/items/{id}        an item: text, label names, image url
    GET  /images/{id}           its thumbnail (JPEG, made from the dataset image, kept in memory)

Searches, image uploads and thumbnails run in worker threads, so requests proceed concurrently while
the event loop only parses and answers. Text and id searches hold the GIL for most of their ~0.5 ms (the
bag-of-words, a tiny MLP, the index kernel), so they get their own pool of one thread per core: more
threads would only queue for the GIL, and measured (benchmarks/serve.py) served fewer queries per second
than this. Uploads (the CLIP forward pass releases the GIL) and thumbnails use Starlette's larger pool.

With a token every request needs ``Authorization: Bearer T`` or ``?token=T`` (images in a page cannot
send headers, so the page passes it in their urls).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re
from importlib import resources
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import anyio
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import CfrhError
from .service import SearchService, ServeError, TooLarge, parse_k

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
MULTIPART_SLACK = 64 * 1024  # bytes of multipart framing and form fields allowed beyond the image itself
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
            (b"x-frame-options", b"DENY")]


def page_html() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def content_security_policy(html: str) -> str:
    """A CSP allowing exactly the page's own inline script and style (by hash) and same-origin fetches and
    images: nothing external can load, and injected markup could not run."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in blocks)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            f"img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"cache-control": "no-store"})


def host_name(host: str) -> str:
    """A Host header without its port: ``127.0.0.1:8000`` → ``127.0.0.1``, ``[::1]:8000`` → ``[::1]``."""
    return host[:host.find("]") + 1] if host.startswith("[") else host.split(":", 1)[0]


class Guard:
    """Pure ASGI middleware: refuses requests for another host name (when ``hosts`` is given) or without the
    token (when one is set), and adds the security headers to every response."""

    def __init__(self, app: ASGIApp, token: str | None = None, hosts: list[str] | None = None):
        self.app, self.token = app, token.encode() if token else None
        self.hosts = {h.lower() for h in hosts} if hosts else None

    def _refusal(self, scope: dict) -> JSONResponse | None:
        headers = dict(scope.get("headers") or [])
        host = host_name(headers.get(b"host", b"").decode("latin-1").lower())
        if self.hosts is not None and host not in self.hosts:
            return error(400, "unexpected Host header: this server answers only to " + ", ".join(sorted(self.hosts)))
        if not self._authorised(headers, scope):
            response = error(401, "this server needs a token: send 'Authorization: Bearer <token>' or add "
                                  "?token=<token> to the url")
            response.headers["www-authenticate"] = 'Bearer realm="cfrh"'
            return response
        return None

    def _authorised(self, headers: dict, scope: dict) -> bool:
        if self.token is None:
            return True
        auth = headers.get(b"authorization", b"")
        given = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if not given:
            given = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token") or [""])[0].encode()
        return hmac.compare_digest(given, self.token)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + _HEADERS
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is larger than ``limit`` bytes, declared or not."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"upload of {int(declared):,} bytes; uploads are limited to {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"upload larger than {limit:,} bytes; uploads are limited to that")
        chunks.append(chunk)
    return b"".join(chunks)


async def uploaded_image(request: Request, limit: int) -> tuple[bytes, str, Any]:
    """(image bytes, its name, the form's k) from a multipart form (field "image", else the first file) or a
    raw body with an image content type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("image/") or kind == "application/octet-stream":
        return await read_limited(request, limit), "upload", None
    if kind != "multipart/form-data":
        raise ServeError("POST an image as multipart/form-data (field 'image') or as the body with an image/* "
                         "content type")
    body = await read_limited(request, limit + MULTIPART_SLACK)

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
    if upload is None:
        raise ServeError("no file in the form: send the image in a field named 'image'")
    return await upload.read(), upload.filename or "upload", form.get("k")


def create_app(service: SearchService, token: str | None = None,
               allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI app. ``token``: required on every request when set; ``allowed_hosts``: Host headers accepted
    (a server bound to loopback should accept only loopback names: a page elsewhere that points a DNS
    name at 127.0.0.1 then cannot read it)."""
    html = page_html()
    page_headers = {"content-security-policy": content_security_policy(html), "cache-control": "no-cache"}
    api_headers = {"cache-control": "no-store"}
    searchers = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))

    async def searched(fn: Callable[..., dict], *args: Any) -> Response:
        """``fn(*args)`` in the searchers' pool, answered as JSON."""
        return JSONResponse(await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=searchers),
                            headers=api_headers)

    async def page(request: Request) -> Response:
        return HTMLResponse(html, headers=page_headers)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"ok": True, "pipeline": service.cache.dataset, "bits": service.bits,
                             "items": len(service.ids)}, headers=api_headers)

    async def info(request: Request) -> Response:
        return JSONResponse(service.info(), headers=api_headers)

    async def search(request: Request) -> Response:
        params = request.query_params
        if request.method == "POST":
            data, name, form_k = await uploaded_image(request, service.max_upload)
            k = parse_k(params.get("k", form_k))
            return JSONResponse(await run_in_threadpool(service.search_image, data, k, name), headers=api_headers)
        k = parse_k(params.get("k"))
        if ("text" in params) == ("id" in params):
            raise ServeError("give one query: text=<words> (finds images) or id=<item id> (its neighbours); or "
                             "POST an image")
        if "text" in params:
            return await searched(service.search_text, params["text"], k)
        return await searched(service.search_item, params["id"], params.get("modality", "image"), k)

    async def item(request: Request) -> Response:
        return JSONResponse(service.item(request.path_params["item_id"]), headers=api_headers)

    async def image(request: Request) -> Response:
        data = await run_in_threadpool(service.thumbnail, request.path_params["item_id"])
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    async def cfrh_error(request: Request, exc: Exception) -> Response:
        return error(getattr(exc, "status", 400), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"not found: {request.url.path[:200]}",
                   405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(exc.status_code)
        return error(exc.status_code, message or str(exc.detail))

    routes = [Route("/", page), Route("/healthz", healthz), Route("/api/info", info),
              Route("/api/search", search, methods=["GET", "POST"]),
              Route("/api/items/{item_id:path}", item), Route("/images/{item_id:path}", image)]
    handlers = {CfrhError: cfrh_error, HTTPException: http_error, Exception: internal_error}
    return Starlette(routes=routes, middleware=[Middleware(Guard, token=token, hosts=allowed_hosts)],
                     exception_handlers=handlers)
