"""Load shedding on the WeCom callback path: under overload, answer 200 at once, lose nothing.

WeCom retries a callback when no 200 arrives within 5 s, so a callback path that slows
down under load multiplies its own load. When this replica is overloaded (too many
callbacks in flight, or its event loop lagging), `ShedMiddleware` answers a callback
POST `200 success` before reading its query or decrypting it — a few microseconds —
counts it in `qywx_callbacks_shed_total`, and keeps its raw bytes in a bounded backlog.

Why nothing is lost (this module must never make a message unreachable):
- A callback carries no message, only "open_kfid has news". The messages stay on
  WeCom for 3 days and the syncer pulls them by cursor, so any later pull of that
  open_kfid fetches everything the shed callback announced.
- Every shed asks the dispatcher to pull every open_kfid it knows within
  `callback_shed_sweep_delay_s` (one coalesced request per host, not one per callback),
  and the syncer hosts sweep every known open_kfid every `sweep_interval_s` anyway
  (known = configured `ingest.open_kfids` + every open_kfid ever seen, kept in Redis).
- The one case neither covers is an open_kfid never seen before whose first callback is
  shed. For that, the raw shed callbacks wait in the backlog and are verified, decrypted
  and submitted (duplicates coalesce) off the request path: a small batch per interval
  while overloaded, the rest as soon as the overload ends. Only if the backlog
  (`callback_shed_backlog` entries) overflows are the oldest dropped — counted in
  `qywx_callbacks_shed_dropped_total`; their open_kfids, if already known, are still
  swept, and a never-seen account is pulled at its next non-shed callback.
The policy (LoadShedder, ShedBacklog, parse_callback) is plain code; ShedMiddleware is
the thin ASGI glue. Never decrypt or call Redis, Ray, Kafka or WeCom while shedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

import defusedxml
import defusedxml.ElementTree as SafeET
from pydantic import ValidationError

from qywx_ray.errors import CryptoError
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter, gauge
from qywx_ray.wecom.crypto import WeComCrypto
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
    "Shed callbacks decrypted after the overload, by result",
    ["result"],
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
    """A shed callback exactly as received: query string, body, arrival (wall clock)."""

    query: bytes
    body: bytes
    received_at: float


class ShedBacklog:
    """Bounded FIFO of shed callbacks; when full, the oldest is dropped and counted."""

    def __init__(self, max_items: int = 10_000) -> None:
        self.max_items = max_items
        self._items: deque[RawCallback] = deque()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: RawCallback) -> None:
        if self.max_items <= 0:
            self.dropped += 1
            SHED_DROPPED.inc()
            return
        if len(self._items) >= self.max_items:
            self._items.popleft()
            self.dropped += 1
            SHED_DROPPED.inc()
        self._items.append(item)

    def take(self, n: int) -> list[RawCallback]:
        out: list[RawCallback] = []
        while self._items and len(out) < n:
            out.append(self._items.popleft())
        return out


def parse_callback(
    crypto: WeComCrypto, raw: RawCallback, *, max_skew_s: int = 300
) -> KfCallbackEvent | None:
    """Verify and decrypt a shed callback like the router does; None if not a valid kf event.

    The timestamp is checked against the callback's arrival, not now: it was fresh then.
    No replay check: a replay only causes a duplicate pull request, and those coalesce.
    """
    try:
        params = {k: v[0] for k, v in parse_qs(raw.query.decode("latin-1")).items() if v}
        signature, timestamp, nonce = (params[k] for k in ("msg_signature", "timestamp", "nonce"))
        encrypt = _xml_fields(raw.body).get("Encrypt", "")
        crypto.verify(signature, timestamp, nonce, encrypt)
        if abs(raw.received_at - int(timestamp)) > max_skew_s:
            return None
        inner = _xml_fields(crypto.decrypt(encrypt))
        if inner.get("MsgType") != "event" or inner.get("Event") != "kf_msg_or_event":
            return None
        return KfCallbackEvent.model_validate(inner)
    except (KeyError, ValueError, CryptoError, ValidationError):
        return None


def _xml_fields(data: bytes | str) -> dict[str, str]:
    try:
        root = SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ET.ParseError, defusedxml.DefusedXmlException) as exc:
        raise ValueError("bad xml") from exc
    return {child.tag: (child.text or "").strip() for child in root}


class ShedSink(Protocol):
    """What the shedder needs from the pull dispatcher."""

    def submit(self, event: KfCallbackEvent) -> None: ...

    def sweep_soon(self) -> None: ...


# ---------------------------------------------------------------------- ASGI glue
ASGIApp = Callable[..., Any]
_SUCCESS = b"success"
_SUCCESS_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", str(len(_SUCCESS)).encode()),
]


class ShedMiddleware:
    """Wraps the app; sheds POSTs to `path` while the LoadShedder says overloaded.

    Admitted requests go to the app unchanged (in-flight counted around them). A shed
    request is answered 200 "success" at once; its body is read (already buffered by
    the server) into the backlog. Background work (lag probe, backlog drain) starts
    lazily on the serving loop, at the first callback.
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
        reason = self.shedder.try_enter()
        if reason is None:
            try:
                await self.app(scope, receive, send)
            finally:
                self.shedder.leave()
            return
        CALLBACKS_SHED.inc(reason=reason)
        headers = [*_SUCCESS_HEADERS, (b"x-qywx-shed", reason.encode())]  # for operators
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": _SUCCESS})
        body = await self._read_body(receive)
        if body is not None:
            self.backlog.add(RawCallback(scope.get("query_string", b""), body, self.wall_clock()))
        self.sink.sweep_soon()

    async def _read_body(self, receive: Any) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
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
            self.shedder.observe_loop_lag(time.monotonic() - started - interval_s)
            CALLBACKS_INFLIGHT.set(self.shedder.inflight)  # sampled, not per request

    async def _drain(self) -> None:
        """Decrypt backlogged callbacks: a batch per interval, a small one while overloaded.

        Draining goes on under sustained overload too (at a bounded cost, ~50 µs each),
        or a never-seen open_kfid named only by shed callbacks would wait for it to end.
        """
        while True:
            await asyncio.sleep(self.drain_interval_s)
            if not len(self.backlog):
                continue
            overloaded = self.shedder.overload_reason() is not None
            batch = self.drain_batch_overloaded if overloaded else self.drain_batch
            for i, raw in enumerate(self.backlog.take(batch)):
                if i and not i % 50:
                    await asyncio.sleep(0)  # let requests in between
                event = parse_callback(self.crypto, raw, max_skew_s=self.max_skew_s)
                SHED_DRAINED.inc(result="submitted" if event else "invalid")
                if event is not None:
                    with contextlib.suppress(Exception):
                        self.sink.submit(event)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
