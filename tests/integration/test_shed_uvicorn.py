"""The shed path behind a real uvicorn server.

`httpx.ASGITransport` hands the body to the app whenever it is asked; uvicorn (h11 and
httptools) answers `http.disconnect` to a `receive()` made after the response was sent.
So the middleware must read the body before it answers, or a shed callback is never
kept and a never-seen open_kfid is never pulled. Real TCP on a free loopback port; the
server is started and stopped by its handle in the test, every wait is bounded.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import uvicorn

from qywx_ray.ingress.shedding import LoadShedder, RawCallback, ShedBacklog, ShedMiddleware
from qywx_ray.wecom.models import KfCallbackEvent
from tests.helpers.callbacks import CRYPTO, App, Overload, callback
from tests.helpers.wait import wait_until_async


class EventSink:
    def __init__(self) -> None:
        self.events: list[KfCallbackEvent] = []
        self.arrived = asyncio.Event()
        self.sweeps = 0

    def submit(self, event: KfCallbackEvent) -> None:
        self.events.append(event)
        self.arrived.set()

    def sweep_soon(self) -> None:
        self.sweeps += 1


Serve = Callable[[ShedMiddleware], Awaitable[str]]


@pytest.fixture(params=["h11", "httptools"])
async def serve(request: pytest.FixtureRequest) -> AsyncIterator[Serve]:
    """Starts uvicorn (the parametrised HTTP implementation) on a free loopback port."""
    stops: list[Callable[[], Awaitable[None]]] = []

    async def start(app: ShedMiddleware) -> str:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            app, http=request.param, log_level="warning", lifespan="off", access_log=False
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))

        async def stop() -> None:
            server.should_exit = True
            await asyncio.wait_for(task, 10)
            sock.close()
            await app.aclose()

        stops.append(stop)
        await wait_until_async(
            lambda: server.started or task.done(), timeout_s=10, what="uvicorn to start"
        )
        assert not task.done(), "uvicorn exited while starting"
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for stop in stops:
        await stop()


def _mw(app: Any, shedder: LoadShedder, sink: EventSink, **kw: Any) -> ShedMiddleware:
    return ShedMiddleware(
        app, shedder=shedder, backlog=ShedBacklog(100), crypto=CRYPTO, sink=sink, **kw
    )


async def _post(base: str, raw: RawCallback) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        return await client.post(f"/wecom/callback?{raw.query.decode()}", content=raw.body)


async def test_a_shed_callback_under_uvicorn_reaches_the_pull(serve: Serve) -> None:
    sink = EventSink()
    mw = _mw(App(), Overload(), sink, drain_interval_s=0.01)
    base = await serve(mw)
    resp = await _post(base, callback("wkUvicorn", int(time.time())))
    assert (resp.status_code, resp.text, resp.headers["x-qywx-shed"]) == (
        200,
        "success",
        "inflight",
    )
    await asyncio.wait_for(sink.arrived.wait(), 10)
    assert [e.open_kfid for e in sink.events] == ["wkUvicorn"]
    assert sink.sweeps == 1


async def test_admitted_and_unsigned_callbacks_under_uvicorn(serve: Serve) -> None:
    app, sink = App(), EventSink()
    shedder = Overload()
    shedder.on = False
    base = await serve(_mw(app, shedder, sink, drain_interval_s=3600))
    raw = callback("wkAdmitted", int(time.time()))
    resp = await _post(base, raw)
    assert (resp.status_code, resp.text) == (200, "app")
    assert app.bodies == [raw.body]
    shedder.on = True
    forged = RawCallback(raw.query.replace(b"msg_signature=", b"msg_signature=f"), raw.body, 0)
    assert (await _post(base, forged)).status_code == 401


async def test_a_stalled_body_under_uvicorn_gets_408_and_holds_no_slot(serve: Serve) -> None:
    app, sink = App(), EventSink()
    shedder = LoadShedder(max_inflight=1, max_loop_lag_s=0)
    base = await serve(_mw(app, shedder, sink, body_timeout_s=0.5, drain_interval_s=3600))
    host, port = base.removeprefix("http://").split(":")
    reply: list[bytes] = []

    def slowloris() -> None:
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(
                b"POST /wecom/callback HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n<xml>"
            )
            reply.append(conn.recv(4096))  # blocks until the server answers (≤ 10 s)

    thread = threading.Thread(target=slowloris, daemon=True)
    thread.start()
    # While it stalls, a real callback is admitted, not shed.
    resp = await _post(base, callback("wkReal", int(time.time())))
    assert (resp.status_code, resp.text) == (200, "app")
    assert "x-qywx-shed" not in resp.headers
    await asyncio.to_thread(thread.join, 15)
    assert not thread.is_alive()
    assert reply
    assert reply[0].startswith(b"HTTP/1.1 408")
