"""An asyncio client for OpenAI-compatible endpoints that survives what APIs do.

Bounded concurrency (one semaphore over all endpoints); every answer goes to the
:class:`~.cache.RequestCache` before it is used, so nothing answered is ever asked again;
transient faults (429 with ``Retry-After``, 5xx, timeouts, dropped connections, malformed
JSON) are retried with exponential backoff and jitter; several endpoints are used round
robin, an endpoint that fails is benched (with a ``GET /models`` health check before it is
used again) and the request goes to another one. A request that still fails after
``max_attempts`` raises :class:`TeacherUnavailable` (one line, what to do).

The API key is read once and only ever sent in the ``Authorization`` header: it is not in
the request body, the cache key, the logs or any file.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import time
from dataclasses import dataclass, field

from ..errors import DKError
from .budget import Budget, BudgetExhausted
from .cache import RequestCache, request_key


class TeacherUnavailable(DKError):
    """A request failed ``max_attempts`` times: the endpoints are down or broken."""


class TeacherRejected(DKError):
    """The endpoint answered 4xx (other than 429): retrying would not help."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, bench: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.bench = bench  # take the endpoint out of rotation for a while


@dataclass
class RetryPolicy:
    max_attempts: int = 6
    backoff_s: float = 0.5  # first wait; doubles per failure
    max_backoff_s: float = 30.0
    timeout_s: float = 120.0  # per request (connect, each read)
    max_retry_after_s: float = 300.0


@dataclass
class Endpoint:
    url: str  # base URL, e.g. http://127.0.0.1:8000/v1
    benched_until: float = 0.0
    needs_check: bool = False
    fails: int = 0  # consecutive
    sent: int = 0
    answered: int = 0
    errors: int = 0
    checking: asyncio.Lock | None = field(default=None, repr=False)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def validate_response(data, n: int | None, api: str) -> None:
    """Raise ``ValueError`` unless ``data`` looks like an OpenAI (chat) completion."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise ValueError("no 'choices' list")
    choices = data["choices"]
    if n is not None and len(choices) != n:
        raise ValueError(f"{len(choices)} choices for n={n}")
    for c in choices:
        if not isinstance(c, dict):
            raise ValueError("a choice is not an object")
        if api == "chat":
            msg = c.get("message")
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise ValueError("a choice has no message.content string")
        elif not isinstance(c.get("text"), str):
            raise ValueError("a choice has no text string")


def tls_context() -> ssl.SSLContext:
    """The context that checks an https teacher's certificate: the CA bundle in
    ``SSL_CERT_FILE`` (and the folder in ``SSL_CERT_DIR``) when set, as OpenSSL, curl and
    Python's requests do (a private CA, a company proxy); otherwise the system store
    plus certifi's bundle."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    for name, val, ok in (("SSL_CERT_FILE", cafile, os.path.isfile),
                          ("SSL_CERT_DIR", capath, os.path.isdir)):  # fmt: skip
        if val is not None and not ok(val):
            raise DKError(f"{name}={val}: no such {'file' if ok is os.path.isfile else 'folder'}")
    try:
        if cafile or capath:
            return ssl.create_default_context(cafile=cafile, capath=capath)
        import certifi

        ctx = ssl.create_default_context()  # the system store
        ctx.load_verify_locations(cafile=certifi.where())
        return ctx
    except ssl.SSLError as e:
        raise DKError(f"SSL_CERT_FILE={cafile}: not a PEM CA bundle ({e.reason or e})") from None


def _cert_error(e: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate check failure behind a transport error, if that is what it is."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, ssl.SSLCertVerificationError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


class ApiClient:
    """``await client.request(body)`` → the endpoint's JSON answer (from cache if known).

    ``body`` is the request body without credentials (``model``, ``messages`` or
    ``prompt``, sampling parameters). ``api`` is ``chat`` (``/chat/completions``) or
    ``completions``.
    """

    def __init__(
        self,
        base_urls: list[str],
        *,
        api: str = "chat",
        api_key: str | None = None,
        concurrency: int = 16,
        retry: RetryPolicy | None = None,
        cache: RequestCache | None = None,
        budget: Budget | None = None,
        log=None,
    ):
        if not base_urls:
            raise DKError("teacher.base_url: give at least one endpoint")
        if api not in ("chat", "completions"):
            raise DKError(f"teacher.api: {api!r} is not one of chat, completions")
        self.endpoints = [Endpoint(u.rstrip("/")) for u in base_urls]
        self.api = api
        self.path = "/chat/completions" if api == "chat" else "/completions"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.concurrency = concurrency
        self.retry = retry or RetryPolicy()
        self.cache = cache
        self.budget = budget or Budget()
        self.log = log or (lambda msg: None)
        self._rr = 0
        self._pool: asyncio.Queue | None = None
        self._http = None
        self.stats = {"requests": 0, "cached": 0, "retries": 0}

    async def __aenter__(self):
        import httpx

        for ep in self.endpoints:
            ep.checking = asyncio.Lock()
        t = self.retry.timeout_s
        # one TLS context for all clients (loading the CA bundle costs ~0.1 s each time)
        tls: ssl.SSLContext | bool = False
        if any(ep.url.startswith("https:") for ep in self.endpoints):
            tls = tls_context()

        def make(conns: int):
            return httpx.AsyncClient(
                verify=tls,
                timeout=httpx.Timeout(t, connect=min(t, 10.0)),
                limits=httpx.Limits(max_connections=conns, max_keepalive_connections=conns),
                headers=self._headers,
            )

        # One small client per concurrency slot (the queue is the concurrency bound):
        # httpcore's pool scans every connection for every request, which costs more than
        # the request itself at 32+ connections; per-slot pools keep each scan tiny.
        self._clients = [make(len(self.endpoints)) for _ in range(self.concurrency)]
        self._pool = asyncio.Queue()
        for c in self._clients:
            self._pool.put_nowait(c)
        self._http = make(len(self.endpoints) * 2)  # health checks
        return self

    async def __aexit__(self, *exc):
        for c in [*self._clients, self._http]:
            await c.aclose()

    # -- endpoint choice -------------------------------------------------------------

    def _backoff(self, fails: int) -> float:
        b = min(self.retry.max_backoff_s, self.retry.backoff_s * 2 ** max(0, fails - 1))
        return b * (0.75 + 0.5 * random.random())

    def _bench(self, ep: Endpoint, reason: str, wait: float | None = None) -> None:
        ep.fails += 1
        ep.errors += 1
        ep.benched_until = time.monotonic() + (
            wait if wait is not None else self._backoff(ep.fails)
        )
        ep.needs_check = wait is None  # a rate limit needs no health check
        self.log(f"{ep.url}: {reason}; benched {ep.benched_until - time.monotonic():.2f}s")

    async def _healthy(self, ep: Endpoint) -> bool:
        """``GET /models``: the endpoint answers again (checked once per bench)."""
        async with ep.checking:
            if time.monotonic() < ep.benched_until:  # benched again while we waited
                return False
            if not ep.needs_check:
                return time.monotonic() >= ep.benched_until
            try:
                r = await self._http.get(ep.url + "/models", timeout=min(5.0, self.retry.timeout_s))
                ok = r.status_code < 500
            except Exception:
                ok = False
            if ok:
                ep.needs_check = False
                return True
            self._bench(ep, "health check failed")
            return False

    async def _pick(self, avoid: Endpoint | None) -> Endpoint:
        """The next endpoint (round robin) that is not benched, preferring one other than
        ``avoid`` (where the last attempt failed); waits while all are benched."""
        while True:
            now = time.monotonic()
            k = len(self.endpoints)
            order = [self.endpoints[(self._rr + i) % k] for i in range(k)]
            ready = [e for e in order if e.benched_until <= now]
            if len(ready) > 1 and avoid in ready:
                ready.remove(avoid)
            if ready:
                ep = ready[0]
                self._rr = (self.endpoints.index(ep) + 1) % k
                return ep
            wake = min(e.benched_until for e in self.endpoints)
            await asyncio.sleep(max(0.0, wake - time.monotonic()) + 0.001)

    # -- one request -----------------------------------------------------------------

    async def _send(self, http, ep: Endpoint, body: dict) -> dict:
        import httpx

        ep.sent += 1
        self.stats["requests"] += 1
        try:
            r = await http.post(ep.url + self.path, json=body)
        except httpx.TimeoutException:
            raise _Transient(f"timed out after {self.retry.timeout_s:g}s") from None
        except httpx.TransportError as e:
            bad = _cert_error(e)
            if bad is not None:  # retrying cannot help: the certificate is not trusted
                why = bad.verify_message or bad.reason or "verify failed"
                raise TeacherRejected(
                    f"teacher {ep.url}: TLS certificate not trusted ({why}); if it is signed "
                    "by a private CA, point SSL_CERT_FILE at that CA's PEM file"
                ) from None
            raise _Transient(f"connection failed ({type(e).__name__}: {e or 'dropped'})") from None
        if r.status_code == 429:
            ra = _retry_after(r.headers.get("retry-after"))
            raise _Transient("rate limited (429)", retry_after=ra, bench=False)
        if r.status_code >= 500:
            raise _Transient(f"server error {r.status_code}")
        if r.status_code >= 400:
            try:
                msg = r.json().get("error", {})
                msg = msg.get("message", msg) if isinstance(msg, dict) else msg
            except Exception:
                msg = r.text[:200]
            raise TeacherRejected(f"teacher {ep.url} rejected the request ({r.status_code}): {msg}")
        try:
            data = r.json()
            validate_response(data, body.get("n", 1), self.api)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise _Transient(f"malformed answer ({str(e)[:80]})") from None
        return data

    async def request(self, body: dict) -> tuple[dict, bool]:
        """The answer to ``body`` and whether it came from the cache. Raises
        :class:`BudgetExhausted`, :class:`TeacherUnavailable` or :class:`TeacherRejected`."""
        key = request_key(body)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats["cached"] += 1
                return hit, True
        http = await self._pool.get()
        try:
            return await self._attempts(http, key, body)
        finally:
            self._pool.put_nowait(http)

    async def _attempts(self, http, key: str, body: dict) -> tuple[dict, bool]:
        self.budget.check()
        last, avoid, t0 = "", None, time.monotonic()
        for attempt in range(1, self.retry.max_attempts + 1):
            ep = await self._pick(avoid)
            if ep.needs_check and not await self._healthy(ep):
                last, avoid = f"{ep.url}: not answering (health check failed)", ep
                continue
            try:
                data = await self._send(http, ep, body)
            except _Transient as e:
                last = f"{ep.url}: {e.reason}"
                if attempt == self.retry.max_attempts:
                    break
                self.stats["retries"] += 1
                if e.retry_after is not None or not e.bench:
                    wait = min(
                        self.retry.max_retry_after_s,
                        e.retry_after if e.retry_after is not None else self._backoff(attempt),
                    )
                    self._bench(ep, e.reason, wait=wait)
                else:
                    self._bench(ep, e.reason)
                avoid = ep
                continue
            ep.fails = 0
            ep.answered += 1
            if self.cache is not None:
                self.cache.put(key, data)  # first, before anything can fail
            self.budget.add(data.get("usage"))
            return data, False
        raise TeacherUnavailable(
            f"teacher unreachable: {self.retry.max_attempts} attempts over "
            f"{time.monotonic() - t0:.1f}s failed (last: {last})"
        )


__all__ = [
    "ApiClient",
    "BudgetExhausted",
    "Endpoint",
    "RetryPolicy",
    "TeacherRejected",
    "TeacherUnavailable",
    "validate_response",
]
