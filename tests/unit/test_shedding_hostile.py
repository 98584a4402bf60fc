"""The shed path under hostile input (the middleware and the drain loop): slow
bodies, unsigned junk and signed replays must never displace or delay a real callback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from qywx_ray.ingress.shedding import (
    SHED_DRAINED,
    LoadShedder,
    RawCallback,
    ShedBacklog,
    ShedMiddleware,
    parse_callback,
)
from qywx_ray.wecom.crypto import WeComCrypto
from tests.helpers.callbacks import (
    AES_KEY,
    CORP,
    CRYPTO,
    TOKEN,
    App,
    Message,
    Overload,
    RecordingSink,
    callback,
    junk,
)
from tests.helpers.wait import wait_until_async


def body_receive(body: bytes) -> Callable[[], Awaitable[Message]]:
    sent = [False]
    forever = asyncio.Event()

    async def receive() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await forever.wait()  # the client stays connected
        return {"type": "http.disconnect"}

    return receive


async def call(
    mw: ShedMiddleware, query: bytes, receive: Callable[[], Awaitable[Message]]
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/wecom/callback",
        "query_string": query,
        "headers": [],
    }
    await mw(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start.get("headers", [])), body


async def post(mw: ShedMiddleware, raw: RawCallback) -> tuple[int, dict[bytes, bytes], bytes]:
    return await call(mw, raw.query, body_receive(raw.body))


def middleware(app: Any, shedder: LoadShedder, sink: RecordingSink, **kw: Any) -> ShedMiddleware:
    return ShedMiddleware(
        app,
        shedder=shedder,
        backlog=kw.pop("backlog", ShedBacklog(10_000)),
        crypto=CRYPTO,
        sink=sink,
        **kw,
    )


# ------------------------------------------------------------------ slow bodies
async def test_stalled_bodies_do_not_count_in_flight() -> None:
    """128 stalled POSTs used to fill max_inflight; a signed callback was then shed."""
    app, sink = App(), RecordingSink()
    shedder = LoadShedder(max_inflight=2, max_loop_lag_s=0)
    mw = middleware(app, shedder, sink, drain_interval_s=3600)
    entered = [0]
    never = asyncio.Event()

    async def stalled() -> Message:
        entered[0] += 1
        await never.wait()
        return {"type": "http.disconnect"}

    stuck = [asyncio.create_task(call(mw, b"", stalled)) for _ in range(5)]
    await wait_until_async(lambda: entered[0] == 5, timeout_s=10, what="5 bodies entered")
    status, headers, text = await post(mw, callback("wkReal", int(time.time())))
    assert (status, text) == (200, b"app")
    assert b"x-qywx-shed" not in headers
    assert len(app.bodies) == 1
    assert shedder.inflight == 0
    for task in stuck:
        task.cancel()
    await asyncio.gather(*stuck, return_exceptions=True)
    await mw.aclose()


async def test_a_stalled_body_times_out_with_408() -> None:
    app, sink = App(), RecordingSink()
    mw = middleware(app, LoadShedder(), sink, body_timeout_s=0.05, drain_interval_s=3600)
    never = asyncio.Event()

    async def stalled() -> Message:
        await never.wait()
        return {"type": "http.disconnect"}

    status, _, _ = await asyncio.wait_for(call(mw, b"", stalled), 10)
    assert status == 408
    assert app.bodies == []
    await mw.aclose()


# ------------------------------------------------------------------ junk vs signed
async def test_unsigned_junk_never_displaces_a_signed_shed_callback() -> None:
    """A never-seen open_kfid's only callback is shed, then 10,001 tiny and 1,000 ~64 KB
    unsigned POSTs arrive: it must still be pulled, and the junk must hold no memory."""
    app, sink = App(), RecordingSink()
    shedder = Overload()
    mw = middleware(app, shedder, sink, drain_interval_s=3600)  # drained by hand below
    status, headers, _ = await post(mw, callback("wkNeverSeen", int(time.time())))
    assert status == 200
    assert headers[b"x-qywx-shed"] == b"inflight"
    statuses = set()
    for raw in [junk(100) for _ in range(10_001)] + [junk(64_000) for _ in range(1_000)]:
        statuses.add((await post(mw, raw))[0])
    assert statuses == {401}
    held = [mw.backlog.take(1)[0] for _ in range(len(mw.backlog))]
    held_bytes = sum(len(r.query) + len(r.body) for r in held)
    assert len(held) == 1, (len(held), held_bytes)
    assert held_bytes < 2_000, (len(held), held_bytes)
    event = parse_callback(CRYPTO, held[0])
    assert event is not None
    assert event.open_kfid == "wkNeverSeen"
    assert app.bodies == []  # nothing of it reached the app
    await mw.aclose()


async def test_signed_replays_and_stale_callbacks_are_not_queued_twice() -> None:
    app, sink = App(), RecordingSink()
    mw = middleware(app, Overload(), sink, drain_interval_s=3600)
    raw = callback("wkOnce", int(time.time()))
    sig = dict(p.split("=") for p in raw.query.decode().split("&"))["msg_signature"]
    upper = RawCallback(raw.query.replace(sig.encode(), sig.upper().encode()), raw.body, 0.0)
    for _ in range(100):
        assert (await post(mw, raw))[0] == 200
        assert (await post(mw, upper))[0] == 200
    assert len(mw.backlog) == 1
    stale = callback("wkOld", int(time.time()) - 30 * 86400)
    assert (await post(mw, stale))[0] == 403
    bad_ts = callback("wkBig", "9" * 400)
    assert (await post(mw, bad_ts))[0] == 400
    assert len(mw.backlog) == 1
    await mw.aclose()


def test_backlog_has_a_byte_cap_and_drops_the_oldest() -> None:
    backlog = ShedBacklog(max_items=1000, max_bytes=10_000)
    items = [RawCallback(b"q" * 10, bytes([65 + i]) * 2_990, 0.0) for i in range(5)]
    for item in items:
        backlog.add(item)
    assert len(backlog) == 3
    assert backlog.bytes == 9_000
    assert backlog.dropped == 2
    assert [r.body[:1] for r in backlog.take(10)] == [b"C", b"D", b"E"]
    assert backlog.bytes == 0
    backlog.add(RawCallback(b"", b"x" * 10_001, 0.0))  # alone over the cap
    assert len(backlog) == 0
    assert backlog.dropped == 3


async def test_a_shed_callback_is_drained_to_the_sink_and_sweeps() -> None:
    app, sink = App(), RecordingSink()
    shedder = Overload()
    mw = middleware(app, shedder, sink, drain_interval_s=0.01)
    assert (await post(mw, callback("wkDrain", int(time.time()))))[0] == 200
    assert sink.sweeps == 1
    await wait_until_async(
        lambda: [e.open_kfid for e in sink.events] == ["wkDrain"], timeout_s=10, what="drain"
    )
    await mw.aclose()


# ------------------------------------------------------------------ item 8: the drain loop
def test_parse_callback_returns_none_for_a_huge_signed_timestamp() -> None:
    assert parse_callback(CRYPTO, callback("wkHuge", "9" * 400)) is None


class FlakyCrypto(WeComCrypto):
    """decrypt raises something nobody expects, once."""

    def __init__(self) -> None:
        super().__init__(TOKEN, AES_KEY, CORP)
        self.explode = True

    def decrypt(self, encrypt_b64: str) -> str:
        if self.explode:
            self.explode = False
            raise RuntimeError("boom")
        return super().decrypt(encrypt_b64)


async def test_an_unexpected_error_never_ends_the_drain_loop() -> None:
    app, sink = App(), RecordingSink()
    shedder = Overload()
    mw = ShedMiddleware(
        app,
        shedder=shedder,
        backlog=ShedBacklog(100),
        crypto=FlakyCrypto(),
        sink=sink,
        drain_interval_s=0.01,
    )
    before = SHED_DRAINED.value(result="error")
    assert (await post(mw, callback("wkFirst", int(time.time()))))[0] == 200
    await wait_until_async(
        lambda: SHED_DRAINED.value(result="error") == before + 1, timeout_s=10, what="drain error"
    )
    assert (await post(mw, callback("wkSecond", int(time.time()))))[0] == 200
    await wait_until_async(
        lambda: [e.open_kfid for e in sink.events] == ["wkSecond"], timeout_s=10, what="next drain"
    )
    await mw.aclose()


@pytest.mark.parametrize("declared", [b"999999999", b"abc"])
async def test_a_bad_content_length_is_refused_before_reading(declared: bytes) -> None:
    app, sink = App(), RecordingSink()
    mw = middleware(app, Overload(), sink, drain_interval_s=3600)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        raise AssertionError("the body must not be read")

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/wecom/callback",
        "query_string": b"",
        "headers": [(b"content-length", declared)],
    }
    await mw(scope, receive, send)
    assert sent[0]["status"] == (413 if declared.isdigit() else 400)
    await mw.aclose()
