"""Request bodies are bounded while they stream in (ASGI middleware).

Every request's body is counted as the server receives it: a ``Content-Length`` over the
cap is answered 413 before any of the body is read, and a body without one (chunked) or
longer than it claimed is answered 413 as soon as the count passes the cap, so the
service reads at most the cap plus the one chunk that crossed it. Nothing is stored: the
route never sees the request (or, for an upload that streams to disk, removes what it
wrote). The cap is ``max_request_mb`` for JSON and form bodies and ``upload_limit_mb``
for dataset uploads (``POST /api/v1/datasets``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import ServiceSettings

UPLOAD_PATH = "/api/v1/datasets"


@dataclass
class BodyStats:
    """What the middleware saw (for tests and logs): the last refused request's bytes."""

    refused: int = 0
    last_refused_read: int = 0
    last_cap: int = 0
    reads: list[int] = field(default_factory=list)  # bytes read, last 100 requests

    def note(self, read: int) -> None:
        self.reads = [*self.reads[-99:], read]


class BodyLimit:
    def __init__(self, app: ASGIApp, settings: ServiceSettings, stats: BodyStats) -> None:
        self.app = app
        self.settings = settings
        self.stats = stats

    def cap(self, scope: Scope) -> tuple[int, str]:
        if scope["method"] == "POST" and scope["path"].rstrip("/") == UPLOAD_PATH:
            return self.settings.upload_limit_bytes, f"{self.settings.upload_limit_mb:g} MB"
        return self.settings.max_request_bytes, f"{self.settings.max_request_mb:g} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap, shown = self.cap(scope)
        what = "upload" if scope["path"].rstrip("/") == UPLOAD_PATH else "request body"
        detail = f"{what} larger than the limit of {shown}"
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:
            self._refused(0, cap)
            await _send_413(send, detail)
            return
        read = 0

        async def counted() -> Message:
            nonlocal read
            msg = await receive()
            if msg["type"] == "http.request":
                read += len(msg.get("body", b""))
                if read > cap:
                    self._refused(read, cap)
                    raise HTTPException(413, detail)
            return msg

        try:
            await self.app(scope, counted, send)
        finally:
            self.stats.note(read)

    def _refused(self, read: int, cap: int) -> None:
        self.stats.refused += 1
        self.stats.last_refused_read = read
        self.stats.last_cap = cap


async def _send_413(send: Send, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})
