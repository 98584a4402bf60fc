"""Load shedding on the WeCom callback path: under overload, answer at once, lose nothing.

WeCom retries a callback when no 200 arrives within 5 s, so a callback path that slows
down under load multiplies its own load. `ShedMiddleware` first reads the POST body —
bounded (`max_body_bytes`, 413) and with a deadline (`body_timeout_s`, 408) — and only
then counts the request: a stalled or slow body never holds an in-flight slot. When this
replica is overloaded (too many callbacks in flight, or its event loop lagging), it
checks the signature (one SHA-1, no AES) and the timestamp window; only a signed, fresh
callback is answered `200 success`, counted in `qywx_callbacks_shed_total` and kept (raw
bytes, once per signature) in a backlog bounded in entries and in bytes. Anything else
gets the router's 4xx and is kept nowhere: unsigned requests never displace signed ones.

The body is read before anything is answered: uvicorn (h11, httptools) answers
`http.disconnect` to a `receive()` made after the response was sent, so a middleware that
answered first would never see the body of a shed callback.

Why nothing is lost (this module must never make a message unreachable):
- A callback carries no message, only "open_kfid has news". The messages stay on
  WeCom for 3 days and the syncer pulls them by cursor, so any later pull of that
  open_kfid fetches everything the shed callback announced.
- Every shed asks the dispatcher to pull every open_kfid it knows within
  `callback_shed_sweep_delay_s` (one coalesced request per host, not one per callback),
  and the syncer hosts sweep every known open_kfid every `sweep_interval_s` anyway
  (known = configured `ingest.open_kfids` + every open_kfid ever seen, kept in Redis).
- The one case neither covers is an open_kfid never seen before whose first callback is
  shed. For that, the raw shed callbacks wait in the backlog and are decrypted and
  submitted (duplicates coalesce) off the request path: a small batch per interval
  while overloaded, the rest as soon as the overload ends. Only if the backlog
  (`callback_shed_backlog` entries, `callback_shed_backlog_max_bytes`) overflows with
  signed callbacks are the oldest dropped — counted in `qywx_callbacks_shed_dropped_total`;
  their open_kfids, if already known, are still swept, and a never-seen account is pulled
  at its next non-shed callback.
- The drain and lag-probe loops catch, count and log every error and go on: a loop that
  died would silently turn every later shed into a lost pull for a never-seen open_kfid.
The policy (LoadShedder, ShedBacklog, check_signed, parse_callback) is plain code;
ShedMiddleware is the thin ASGI glue. Never decrypt or call Redis, Ray, Kafka or WeCom
while shedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import defusedxml
import defusedxml.ElementTree as SafeET
from pydantic import ValidationError

from qywx_ray.cancel import cancel_until_done
from qywx_ray.errors import CryptoError
from qywx_ray.ingress.callback import CALLBACKS, parse_timestamp, replay_key
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter, gauge
from qywx_ray.wecom.crypto import BadSignatureError, WeComCrypto
from qywx_ray.wecom.models import KfCallbackEvent

log = get_logger(__name__)

CALLBACKS_SHED = counter(
    "qywx_callbacks_shed_total",
    "Callbacks answered 200 without decrypting because the ingress was overloaded",
    ["reason"],
)
SHED_DROPPED = counter(
    "qywx_callbacks_shed_dropped_total",
    "Shed callbacks dropped from the full backlog (their open_kfid relies on the sweep)",
)
SHED_DRAINED = counter(
    "qywx_callbacks_shed_drained_total",
    "Shed callbacks decrypted after the overload, by result (submitted, invalid, error)",
    ["result"],
)
SHED_LOOP_ERRORS = counter(
    "qywx_callbacks_shed_loop_errors_total",
    "Unexpected errors caught in the shedder's background loops (they go on)",
    ["loop"],
)
CALLBACKS_INFLIGHT = gauge("qywx_callbacks_inflight", "Callback requests being handled now")

ShedReason = str  # "inflight" | "loop_lag"


class LoadShedder:
    """Admission policy: admit while in-flight < max_inflight and loop lag ≤ max_loop_lag_s.

    `max_inflight=0` / `max_loop_lag_s=0` disable that signal. The loop lag is the most
    recent overshoot reported by a LoopLagMonitor; it counts only while fresh (a stale
    reading — the monitor itself starved — is treated as lag equal to its age).
    """

    def __init__(
        self,
        *,
        max_inflight: int = 128,
        max_loop_lag_s: float = 0.25,
        lag_probe_interval_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_inflight = max_inflight
        self.max_loop_lag_s = max_loop_lag_s
        self.lag_probe_interval_s = lag_probe_interval_s
        self.clock = clock
        self.inflight = 0
        self.admitted = 0
        self.shed = 0
        self.last_shed_at: float | None = None
        self._lag_s = 0.0
        self._lag_at: float | None = None

    def observe_loop_lag(self, lag_s: float) -> None:
        self._lag_s = max(0.0, lag_s)
        self._lag_at = self.clock()

    def loop_lag_s(self) -> float:
        if self._lag_at is None:
            return 0.0
        # If the probe has not reported for a while, the loop is at least that late.
        overdue = self.clock() - self._lag_at - self.lag_probe_interval_s
        return max(self._lag_s, overdue)

    def overload_reason(self) -> ShedReason | None:
        if self.max_inflight and self.inflight >= self.max_inflight:
            return "inflight"
        if self.max_loop_lag_s and self.loop_lag_s() > self.max_loop_lag_s:
            return "loop_lag"
        return None

    def try_enter(self) -> ShedReason | None:
        """None: admitted (call leave() when done). Else the reason it is shed."""
        reason = self.overload_reason()
        if reason is None:
            self.inflight += 1
            self.admitted += 1
            return None
        self.shed += 1
        self.last_shed_at = self.clock()
        return reason

    def leave(self) -> None:
        self.inflight = max(0, self.inflight - 1)


@dataclass(frozen=True)
class RawCallback:
    """A shed callback exactly as received: query string, body, arrival (wall clock).

    `key` is its replay key (signature lowercased) once verified: the backlog keeps one
    entry per key, so a replayed signed callback cannot fill it either.
    """

    query: bytes
    body: bytes
    received_at: float
    key: str = ""

    @property
    def size_bytes(self) -> int:
        return len(self.query) + len(self.body)


class ShedBacklog:
    """Bounded FIFO of shed callbacks (entries and bytes); when full, the oldest is dropped
    and counted. A callback whose key is already queued is not queued again."""

    def __init__(self, max_items: int = 10_000, max_bytes: int = 16 << 20) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: deque[RawCallback] = deque()
        self._keys: set[str] = set()
        self.bytes = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: RawCallback) -> bool:
        """True if queued; False if a duplicate or dropped (too big for the backlog)."""
        if item.key and item.key in self._keys:
            return False
        size = item.size_bytes
        if self.max_items <= 0 or size > self.max_bytes:
            self._drop()
            return False
        while self._items and (
            len(self._items) >= self.max_items or self.bytes + size > self.max_bytes
        ):
            self._forget(self._items.popleft())
            self._drop()
        self._items.append(item)
        self._keys.add(item.key)
        self.bytes += size
        return True

    def take(self, n: int) -> list[RawCallback]:
        out: list[RawCallback] = []
        while self._items and len(out) < n:
            item = self._items.popleft()
            self._forget(item)
            out.append(item)
        return out

    def _forget(self, item: RawCallback) -> None:
        self._keys.discard(item.key)
        self.bytes -= item.size_bytes

    def _drop(self) -> None:
        self.dropped += 1
        SHED_DROPPED.inc()


class ShedRefused(Exception):
    """The request is not a signed, fresh callback: answer `status`, keep nothing."""

    def __init__(self, status: int, result: str) -> None:
        super().__init__(result)
        self.status = status
        self.result = result


def check_signed(
    crypto: WeComCrypto, query: bytes, body: bytes, *, now: float, max_skew_s: int = 300
) -> tuple[str, str]:
    """(replay key, Encrypt) of a signed callback fresh at `now`; else ShedRefused.

    What the router checks before it decrypts, in its order and with its status codes
    (400 malformed, 401 signature, 403 stale), at the cost of one SHA-1 and no AES: cheap
    enough to do for every request shed under a flood.
    """
    params = {k: v[0] for k, v in parse_qs(query.decode("latin-1")).items() if v}
    try:
        signature, timestamp, nonce = (params[k] for k in ("msg_signature", "timestamp", "nonce"))
    except KeyError as exc:
        raise ShedRefused(400, "bad_request") from exc
    try:
        encrypt = _xml_fields(body).get("Encrypt", "")
    except ValueError as exc:
        raise ShedRefused(400, "bad_xml") from exc
    if not encrypt:
        raise ShedRefused(400, "bad_xml")
    try:
        crypto.verify(signature, timestamp, nonce, encrypt)
    except BadSignatureError as exc:
        raise ShedRefused(401, "bad_signature") from exc
    try:
        ts = parse_timestamp(timestamp)
    except ValueError as exc:
        raise ShedRefused(400, "bad_request") from exc
    if abs(now - ts) > max_skew_s:
        raise ShedRefused(403, "stale")
    return replay_key(timestamp, nonce, signature), encrypt


def parse_callback(
    crypto: WeComCrypto, raw: RawCallback, *, max_skew_s: int = 300
) -> KfCallbackEvent | None:
    """Verify and decrypt a shed callback like the router does; None if not a valid kf event.

    The timestamp is checked against the callback's arrival, not now: it was fresh then.
    No replay check: a replay only causes a duplicate pull request, and those coalesce.
    """
    try:
        _, encrypt = check_signed(
            crypto, raw.query, raw.body, now=raw.received_at, max_skew_s=max_skew_s
        )
        inner = _xml_fields(crypto.decrypt(encrypt))
        if inner.get("MsgType") != "event" or inner.get("Event") != "kf_msg_or_event":
            return None
        return KfCallbackEvent.model_validate(inner)
    except (ShedRefused, ValueError, CryptoError, ValidationError):
        return None


def _xml_fields(data: bytes | str) -> dict[str, str]:
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ET.ParseError, defusedxml.DefusedXmlException) as exc:
        raise ValueError("bad xml") from exc
    return {child.tag: (child.text or "").strip() for child in root}


def _replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive() that yields the body already read, then defers to the server's."""
    delivered = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class ShedSink(Protocol):
    """What the shedder needs from the pull dispatcher."""

    def submit(self, event: KfCallbackEvent) -> None: ...

    def sweep_soon(self) -> None: ...


# ---------------------------------------------------------------------- ASGI glue
ASGIApp = Callable[..., Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_SUCCESS = b"success"
_REFUSAL_BODIES = {  # the router's generic bodies: never a detail
    400: b"bad request",
    401: b"unauthorized",
    403: b"forbidden",
    408: b"request timeout",
    413: b"payload too large",
}


def _plain_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]


class _BodyRefused(Exception):
    def __init__(self, status: int, result: str) -> None:
        super().__init__(result)
        self.status = status
        self.result = result


class ShedMiddleware:
    """Wraps the app; reads callback POST bodies first, sheds while overloaded.

    Every POST to `path` has its body read (bounded, with a deadline) before it is
    counted in flight. Admitted requests then go to the app with that body replayed
    (in-flight counted around them). A shed request is answered at once: 200 "success"
    and kept in the backlog if signed and fresh, the router's 4xx otherwise. Background
    work (lag probe, backlog drain) starts lazily on the serving loop, at the first
    callback.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        shedder: LoadShedder,
        backlog: ShedBacklog,
        crypto: WeComCrypto,
        sink: ShedSink,
        path: str = "/wecom/callback",
        max_skew_s: int = 300,
        max_body_bytes: int = 65_536,
        body_timeout_s: float = 5.0,
        drain_batch: int = 500,
        drain_batch_overloaded: int = 25,
        drain_interval_s: float = 0.5,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.shedder = shedder
        self.backlog = backlog
        self.crypto = crypto
        self.sink = sink
        self.path = path
        self.max_skew_s = max_skew_s
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.drain_batch = drain_batch
        self.drain_batch_overloaded = drain_batch_overloaded
        self.drain_interval_s = drain_interval_s
        self.wall_clock = wall_clock
        self._tasks: list[asyncio.Task[None]] = []

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        if not self._tasks:
            self._start_background()
        try:
            body = await self._read_body(scope, receive)
        except _BodyRefused as refused:
            CALLBACKS.inc(result=refused.result)
            await self._answer(send, refused.status, _REFUSAL_BODIES[refused.status])
            return
        if body is None:
            return  # the client went away: nobody to answer
        reason = self.shedder.try_enter()
        if reason is None:
            try:
                await self.app(scope, _replay_body(body, receive), send)
            finally:
                self.shedder.leave()
            return
        query = scope.get("query_string", b"")
        now = self.wall_clock()
        try:
            key, _ = check_signed(self.crypto, query, body, now=now, max_skew_s=self.max_skew_s)
        except ShedRefused as refused:
            CALLBACKS.inc(result=refused.result)
            await self._answer(send, refused.status, _REFUSAL_BODIES[refused.status])
            return
        CALLBACKS_SHED.inc(reason=reason)
        self.backlog.add(RawCallback(query, body, now, key))
        await self._answer(send, 200, _SUCCESS, [(b"x-qywx-shed", reason.encode())])
        self.sink.sweep_soon()

    @staticmethod
    async def _answer(
        send: Any, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        headers = [*_plain_headers(body), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, scope: MutableMapping[str, Any], receive: Receive) -> bytes | None:
        """The whole body, or None if the client left; _BodyRefused if too large, late or
        its Content-Length is not a number (refused before reading anything)."""
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length":
                if not value.strip().isdigit():
                    raise _BodyRefused(400, "bad_request")
                if int(value) > self.max_body_bytes:
                    raise _BodyRefused(413, "too_large")
                break
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await self._receive_body(receive)
        except TimeoutError as exc:
            raise _BodyRefused(408, "body_timeout") from exc

    async def _receive_body(self, receive: Receive) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyRefused(413, "too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _start_background(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._probe_lag()), loop.create_task(self._drain())]

    async def _probe_lag(self) -> None:
        interval_s = self.shedder.lag_probe_interval_s
        while True:
            started = time.monotonic()
            await asyncio.sleep(interval_s)
            try:
                self.shedder.observe_loop_lag(time.monotonic() - started - interval_s)
                CALLBACKS_INFLIGHT.set(self.shedder.inflight)  # sampled, not per request
            except Exception:
                SHED_LOOP_ERRORS.inc(loop="lag_probe")
                log.error("shed.lag_probe_failed", exc_info=True)

    async def _drain(self) -> None:
        """Decrypt backlogged callbacks: a batch per interval, a small one while overloaded.

        Draining goes on under sustained overload too (at a bounded cost, ~50 µs each),
        or a never-seen open_kfid named only by shed callbacks would wait for it to end.
        Nothing ends this loop but cancellation: an error is caught, counted and logged
        for the one callback that raised it, and draining goes on with the next.
        """
        while True:
            await asyncio.sleep(self.drain_interval_s)
            try:
                await self._drain_once()
            except Exception:
                SHED_LOOP_ERRORS.inc(loop="drain")
                log.error("shed.drain_failed", exc_info=True)

    async def _drain_once(self) -> None:
        if not len(self.backlog):
            return
        overloaded = self.shedder.overload_reason() is not None
        batch = self.drain_batch_overloaded if overloaded else self.drain_batch
        for i, raw in enumerate(self.backlog.take(batch)):
            if i and not i % 50:
                await asyncio.sleep(0)  # let requests in between
            try:
                event = parse_callback(self.crypto, raw, max_skew_s=self.max_skew_s)
                if event is not None:
                    self.sink.submit(event)
            except Exception:
                SHED_DRAINED.inc(result="error")
                log.error("shed.drain_item_failed", exc_info=True)
                continue
            SHED_DRAINED.inc(result="submitted" if event else "invalid")

    async def aclose(self) -> None:
        for task in self._tasks:
            cancel_until_done(task)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
