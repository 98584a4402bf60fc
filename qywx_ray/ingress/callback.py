"""The WeCom callback endpoint: verify, decrypt, dedupe, hand off, answer — nothing more.

GET answers WeCom's URL check (must be well under 1 s; signed, fresh, and it echoes only
a plain echostr, never a decrypted callback); POST takes a kf_msg_or_event callback and
passes a KfCallbackEvent to a CallbackSink that returns immediately.
This module must never call Kafka or WeCom inside a request, never echo a secret or a
decryption detail to the caller, and never fail a request because Redis (the replay
cache) is down — a duplicate pull is harmless, a missed callback is not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, Protocol

import defusedxml
import defusedxml.ElementTree as SafeET
import redis.asyncio as aioredis
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import ValidationError

from qywx_ray.errors import CryptoError
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter, histogram
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings
from qywx_ray.wecom.crypto import BadSignatureError, WeComCrypto
from qywx_ray.wecom.models import KfCallbackEvent

log = get_logger(__name__)

CALLBACKS = counter(
    "qywx_callbacks_total",
    "WeCom callback requests by result",
    ["result"],
)
REPLAY_CACHE_ERRORS = counter(
    "qywx_callback_replay_cache_errors_total",
    "Replay-cache lookups that failed or timed out (the callback failed open)",
)
CALLBACK_SECONDS = histogram(
    "qywx_callback_duration_seconds", "Time to answer a WeCom callback", ["method"]
)


class CallbackSink(Protocol):
    """Receives verified callbacks; must return immediately (enqueue, no I/O)."""

    def submit(self, event: KfCallbackEvent) -> None: ...


class ReplayCache(Protocol):
    async def first_seen(self, key: str, ttl_s: int) -> bool:
        """True the first time `key` is seen within ttl_s, False for a replay."""
        ...

    async def forget(self, key: str) -> None:
        """Undo first_seen (the callback was not acked, so WeCom's retry must pass)."""
        ...


class InMemoryReplayCache:
    """For unit tests and single-process use; expires entries by an injected clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}

    async def first_seen(self, key: str, ttl_s: int) -> bool:
        now = self._clock()
        if len(self._expiry) > 10_000:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
        expiry = self._expiry.get(key)
        if expiry is not None and expiry > now:
            return False
        self._expiry[key] = now + ttl_s
        return True

    async def forget(self, key: str) -> None:
        self._expiry.pop(key, None)


class RedisReplayCache:
    """SET NX EX in Redis, so every replica of the ingress shares one replay window."""

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "qywx:wecom:callback:seen:"
    ) -> None:
        self._client = client
        self._prefix = prefix

    @classmethod
    def from_settings(cls, settings: RedisSettings) -> RedisReplayCache:
        return cls(make_async_redis(settings))

    async def first_seen(self, key: str, ttl_s: int) -> bool:
        return bool(await self._client.set(self._prefix + key, b"1", nx=True, ex=max(1, ttl_s)))

    async def forget(self, key: str) -> None:
        await self._client.delete(self._prefix + key)

    async def aclose(self) -> None:
        await self._client.aclose()


class _Reject(Exception):
    def __init__(self, status: int, result: str, body: str) -> None:
        self.status = status
        self.result = result
        self.body = body


_GENERIC = {
    400: "bad request",
    401: "unauthorized",
    403: "forbidden",
    413: "payload too large",
}


def _reject(status: int, result: str) -> _Reject:
    return _Reject(status, result, _GENERIC[status])


def _xml_fields(data: bytes | str) -> dict[str, str]:
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ET.ParseError, defusedxml.DefusedXmlException, ValueError) as exc:
        raise _reject(400, "bad_xml") from exc
    return {child.tag: (child.text or "").strip() for child in root}


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_body_bytes:
                raise _reject(413, "too_large")
        except ValueError as exc:
            raise _reject(400, "bad_request") from exc
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body_bytes:
            raise _reject(413, "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_MAX_ECHO_CHARS = 1024


def parse_timestamp(timestamp: str) -> int:
    """WeCom's timestamp as int; ValueError unless 1-12 ASCII digits.

    `int()` alone accepts `1_760_000_000`, ` +1`, other scripts' digits and 400-digit
    numbers (whose comparison with a float clock raises OverflowError, a 500).
    """
    if not _TIMESTAMP.fullmatch(timestamp):
        raise ValueError("timestamp must be 1-12 ASCII digits")
    return int(timestamp)


def replay_key(timestamp: str, nonce: str, signature: str) -> str:
    """The replay-cache key of a callback; the signature lowercased as `verify` compares it,
    or the same callback resent with an UPPERCASE signature would count as new."""
    return hashlib.sha1(f"{timestamp}|{nonce}|{signature.lower()}".encode()).hexdigest()


def is_echostr(plain: str) -> bool:
    """What a URL-check echostr decrypts to: a short printable string, never markup.

    A captured POST's Encrypt decrypts to XML carrying the sync Token and OpenKfId; the
    GET must not turn into a decryption oracle for it.
    """
    return 0 < len(plain) <= _MAX_ECHO_CHARS and plain.isprintable() and "<" not in plain


def _query(request: Request, *names: str) -> list[str]:
    values = [request.query_params.get(n) for n in names]
    if any(not v for v in values):
        raise _reject(400, "bad_request")
    return [v for v in values if v]


def make_callback_router(  # noqa: C901 - a route factory: its nested routes' branches count here
    crypto: WeComCrypto,
    sink: CallbackSink,
    replay: ReplayCache,
    *,
    max_skew_s: int = 300,
    max_body_bytes: int = 65_536,
    replay_timeout_s: float = 0.5,
    clock: Callable[[], float] = time.time,
    path: str = "/wecom/callback",
) -> APIRouter:
    """The callback router; mount it on any FastAPI app (Serve ingress, tests)."""
    router = APIRouter()
    replay_ttl_s = 2 * max_skew_s + 60  # a replay older than this is rejected as stale anyway

    def _done(method: str, started: float, result: str, response: Response) -> Response:
        CALLBACKS.inc(result=result)
        CALLBACK_SECONDS.observe(time.perf_counter() - started, method=method)
        return response

    async def _first_seen(key: str) -> bool:
        try:
            async with asyncio.timeout(replay_timeout_s):
                return await replay.first_seen(key, replay_ttl_s)
        except Exception as exc:  # noqa: BLE001 - Redis down or slow: fail open, a duplicate pull is harmless
            REPLAY_CACHE_ERRORS.inc()
            log.warning("callback.replay_cache_unavailable", error=type(exc).__name__)
            return True

    def _open(signature: str, timestamp: str, nonce: str, ciphertext: str) -> str:
        """The plaintext of a signed, fresh ciphertext, or the rejection both routes give
        (401 bad signature, 400/403 bad or stale timestamp, 400 bad crypto)."""
        try:
            crypto.verify(signature, timestamp, nonce, ciphertext)
        except BadSignatureError as exc:
            raise _reject(401, "bad_signature") from exc
        try:
            ts = parse_timestamp(timestamp)
        except ValueError as exc:
            raise _reject(400, "bad_request") from exc
        if abs(clock() - ts) > max_skew_s:
            raise _reject(403, "stale")
        try:
            return crypto.decrypt(ciphertext)
        except CryptoError as exc:
            raise _reject(400, "bad_crypto") from exc

    @router.get(path, response_class=PlainTextResponse)
    async def verify_url(request: Request) -> Response:
        started = time.perf_counter()
        try:
            signature, timestamp, nonce, echostr = _query(
                request, "msg_signature", "timestamp", "nonce", "echostr"
            )
            plain = _open(signature, timestamp, nonce, echostr)
            if not is_echostr(plain):
                raise _reject(400, "not_echostr")
        except _Reject as rej:
            log.warning("callback.rejected", method="GET", result=rej.result)
            return _done("GET", started, rej.result, PlainTextResponse(rej.body, rej.status))
        return _done("GET", started, "verified", PlainTextResponse(plain))

    @router.post(path, response_class=PlainTextResponse)
    async def receive(request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = await _read_body(request, max_body_bytes)
            signature, timestamp, nonce = _query(request, "msg_signature", "timestamp", "nonce")
            outer = _xml_fields(body)
            encrypt = outer.get("Encrypt")
            if not encrypt:
                raise _reject(400, "bad_xml")
            inner: dict[str, Any] = _xml_fields(_open(signature, timestamp, nonce, encrypt))
            if inner.get("MsgType") != "event" or inner.get("Event") != "kf_msg_or_event":
                # Authentic but not ours (another event on a shared URL): ack, do nothing.
                return _done("POST", started, "ignored", PlainTextResponse("success"))
            try:
                event = KfCallbackEvent.model_validate(inner)
            except ValidationError as exc:
                raise _reject(400, "bad_fields") from exc
        except _Reject as rej:
            log.warning("callback.rejected", method="POST", result=rej.result)
            return _done("POST", started, rej.result, PlainTextResponse(rej.body, rej.status))
        key = replay_key(timestamp, nonce, signature)
        if not await _first_seen(key):
            return _done("POST", started, "duplicate", PlainTextResponse("success"))
        try:
            sink.submit(event)
        except Exception:
            # Not acked: let WeCom's retry through the replay window, or the pull is lost.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(replay_timeout_s):
                    await replay.forget(key)
            log.error("callback.sink_failed", exc_info=True, open_kfid=event.open_kfid)
            return _done("POST", started, "sink_error", PlainTextResponse("retry", 503))
        return _done("POST", started, "ok", PlainTextResponse("success"))

    return router
