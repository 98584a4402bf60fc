"""WeCom integration: real Redis (replay + token caches), real TCP servers, the simulator CLI."""

from __future__ import annotations

import asyncio
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from qywx_ray.ingress.callback import (
    REPLAY_CACHE_ERRORS,
    InMemoryReplayCache,
    RedisReplayCache,
    make_callback_router,
)
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings
from qywx_ray.testing.wecomsim import (
    FaultRule,
    WeComSimulator,
    WeComSimulatorState,
    make_app,
)
from qywx_ray.wecom.client import (
    API_RETRIES,
    InMemoryTokenCache,
    RedisTokenCache,
    WeComClient,
)
from qywx_ray.wecom.crypto import WeComCrypto
from qywx_ray.wecom.models import KfCallbackEvent
from qywx_ray.wecom.settings import WeComSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SETTINGS = WeComSettings()
KF = "wkINTEGRATION"


class ListSink:
    def __init__(self) -> None:
        self.events: list[KfCallbackEvent] = []

    def submit(self, event: KfCallbackEvent) -> None:
        self.events.append(event)


def _crypto() -> WeComCrypto:
    return WeComCrypto(
        SETTINGS.token.get_secret_value(),
        SETTINGS.encoding_aes_key.get_secret_value(),
        SETTINGS.corp_id,
    )


def _callback_app(sink: ListSink, replay: Any, **kw: Any) -> FastAPI:
    app = FastAPI()
    app.include_router(make_callback_router(_crypto(), sink, replay, **kw))
    return app


def _free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


async def _serve(app: FastAPI) -> tuple[str, Callable[[], Awaitable[None]]]:
    """Run `app` on real TCP in this loop; returns (base_url, stop)."""
    sock = _free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture
def redis_settings(redis_url: str, redis_client: redis.Redis) -> RedisSettings:
    return RedisSettings(url=redis_url)


async def test_redis_replay_cache_is_shared_and_expires(
    redis_settings: RedisSettings, redis_client: redis.Redis
) -> None:
    replica_a = RedisReplayCache.from_settings(redis_settings)
    replica_b = RedisReplayCache.from_settings(redis_settings)
    try:
        assert await replica_a.first_seen("k1", 30) is True
        assert await replica_b.first_seen("k1", 30) is False  # another replica sees the replay
        assert await replica_a.first_seen("k2", 30) is True
        ttl = redis_client.ttl("qywx:wecom:callback:seen:k1")
        assert 0 < ttl <= 30
        assert await replica_a.first_seen("k3", 1) is True
        deadline = time.monotonic() + 5
        while redis_client.exists("qywx:wecom:callback:seen:k3"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert await replica_b.first_seen("k3", 1) is True
    finally:
        await replica_a.aclose()
        await replica_b.aclose()


async def test_simulator_pushes_over_tcp_and_redis_replay_drops_duplicates(
    redis_settings: RedisSettings,
) -> None:
    sink = ListSink()
    replay = RedisReplayCache.from_settings(redis_settings)
    ingress_url, stop_ingress = await _serve(_callback_app(sink, replay))
    state = WeComSimulatorState.from_settings(SETTINGS, rng=random.Random(11))
    sim = WeComSimulator(state, callback_url=f"{ingress_url}/wecom/callback")
    sim_url, stop_sim = await _serve(make_app(sim, manage_lifecycle=True))
    try:
        # URL verification over real TCP (answered from the request alone: see the unit
        # test; its speed is measured, not asserted, so a loaded machine cannot fail it).
        async with httpx.AsyncClient(base_url=ingress_url, timeout=5) as client:
            timings = []
            for i in range(20):
                params = state.build_url_check(f"echo{i}")
                started = time.perf_counter()
                resp = await client.get("/wecom/callback", params=params)
                timings.append(time.perf_counter() - started)
                assert resp.status_code == 200
                assert resp.text == f"echo{i}"
            assert sink.events == []
            print(f"url-verify median {statistics.median(timings) * 1000:.1f} ms")
        async with httpx.AsyncClient(base_url=sim_url, timeout=5) as admin:
            await admin.post("/sim/faults", json={"api": "callback", "kind": "duplicate"})
            resp = await admin.post(
                "/sim/messages", json={"open_kfid": KF, "external_userid": "wmU1", "count": 3}
            )
            ids = resp.json()["msgids"]
            await sim.idle(10)
            stats = (await admin.get("/sim/stats")).json()
        assert stats["callbacks_duplicated"] == 1
        assert stats["callbacks_delivered"] == 2
        assert len(sink.events) == 1  # the Redis replay cache absorbed the duplicate
        event = sink.events[0]
        assert event.open_kfid == KF
        client = WeComClient(  # type: ignore[assignment]  # the name is reused for the WeCom client
            SETTINGS.model_copy(update={"api_base": f"{sim_url}/cgi-bin"}),
            RedisTokenCache(make_async_redis(redis_settings)),
        )
        page = await client.sync_msg(KF, token=event.token)  # type: ignore[attr-defined]  # the name is reused for the WeCom client
        await client.aclose()
        assert [m["msgid"] for m in page.msg_list] == ids
    finally:
        await stop_sim()
        await stop_ingress()
        await replay.aclose()


@pytest.mark.parametrize("mode", ["refused", "blackhole"])
async def test_callback_answers_fast_when_redis_is_down(mode: str) -> None:
    listener = _free_socket()
    port = listener.getsockname()[1]
    if mode == "blackhole":
        listener.listen(16)  # accepts TCP connections but never answers
    else:
        listener.close()  # nothing listening: connection refused
    replay = RedisReplayCache.from_settings(
        RedisSettings(url=f"redis://127.0.0.1:{port}/0", socket_timeout_s=3.0)
    )
    cancelled: list[str] = []  # replay checks our 0.3 s replay timeout gave up on
    first_seen = replay.first_seen

    async def watched(key: str, ttl_s: int) -> bool:
        try:
            return await first_seen(key, ttl_s)
        except asyncio.CancelledError:
            cancelled.append(key)
            raise

    replay.first_seen = watched  # type: ignore[method-assign]
    sink = ListSink()
    app = _callback_app(sink, replay, replay_timeout_s=0.3)
    state = WeComSimulatorState.from_settings(SETTINGS)
    before = REPLAY_CACHE_ERRORS.value()
    base, stop = await _serve(app)
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            params, body = state.build_callback(KF)
            resp = await client.post("/wecom/callback", params=params, content=body)
        assert resp.status_code == 200
        assert resp.text == "success"
        # Black hole: the check was abandoned at replay_timeout_s (cancelled by us), not
        # left to the 3 s socket timeout. Refused: failed at once or, while the client
        # retried the connection, abandoned the same way.
        assert len(cancelled) == 1 if mode == "blackhole" else len(cancelled) <= 1
        assert len(sink.events) == 1
        assert REPLAY_CACHE_ERRORS.value() == before + 1
    finally:
        await stop()
        listener.close()


async def test_token_cache_shared_by_replicas_in_redis(
    redis_settings: RedisSettings, redis_client: redis.Redis
) -> None:
    settings = SETTINGS.model_copy(update={"api_base": "http://sim/cgi-bin"})
    state = WeComSimulatorState.from_settings(settings)
    transport = httpx.ASGITransport(app=make_app(WeComSimulator(state)))
    a = WeComClient(
        settings, RedisTokenCache(make_async_redis(redis_settings)), transport=transport
    )
    b = WeComClient(
        settings, RedisTokenCache(make_async_redis(redis_settings)), transport=transport
    )
    try:
        token = await a.get_access_token()
        assert await b.get_access_token() == token
        assert state.stats.gettoken_calls == 1
        key = f"qywx:wecom:access_token:{settings.corp_id}"
        assert 7200 - 300 - 5 < redis_client.ttl(key) <= 7200 - 300
        state.revoke_access_tokens()  # WeCom invalidated it early: 40014
        state.add_messages(KF, "u", 1)
        assert len((await a.sync_msg(KF)).msg_list) == 1
        new_token = redis_client.get(key)
        assert new_token is not None
        assert new_token.decode() != token  # type: ignore[union-attr]  # redis-py: bytes | str
        await b.invalidate_token(token)  # a stale replica must not delete the new token
        assert redis_client.get(key) == new_token
        assert len((await b.sync_msg(KF)).msg_list) == 1
        assert state.stats.gettoken_calls == 2
    finally:
        await a.aclose()
        await b.aclose()


async def test_callback_retried_when_no_200_within_timeout() -> None:
    sink = ListSink()
    inner = _callback_app(sink, InMemoryReplayCache())
    slow_first = {"n": 0}

    @inner.middleware("http")
    async def slow(request: Request, call_next: Any) -> Any:
        slow_first["n"] += 1
        if slow_first["n"] == 1:
            await asyncio.sleep(1.5)
            return PlainTextResponse("too late")
        return await call_next(request)

    base, stop = await _serve(inner)
    state = WeComSimulatorState.from_settings(SETTINGS)
    sim = await WeComSimulator(
        state, callback_url=f"{base}/wecom/callback", callback_timeout_s=0.3
    ).start()
    try:
        state.add_messages(KF, "u", 1)
        await sim.idle(10)
        assert state.stats.callback_attempts == 2
        assert state.stats.callbacks_delivered == 1
        assert len(sink.events) == 1
    finally:
        await sim.stop()
        await stop()


async def _wait_http(url: str, deadline_s: float) -> httpx.Response:
    deadline = time.monotonic() + deadline_s
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            try:
                return await client.get(url)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.fixture
async def simulator_process() -> AsyncIterator[str]:
    sock = _free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns once forked; never waited on here
        [
            *(sys.executable, "-m", "qywx_ray.testing.wecomsim", "--port", str(port)),
            *("--users", "5", "--rate", "300/min", "--seed", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_simulator_runs_alone_from_the_command_line(simulator_process: str) -> None:
    base = simulator_process
    await _wait_http(f"{base}/sim/stats", 30)
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(base_url=base, timeout=5) as admin:
        while (await admin.get("/sim/stats")).json()["messages"] < 5:
            assert time.monotonic() < deadline, "population produced nothing"
            await asyncio.sleep(0.2)
        truth = (await admin.get("/sim/truth")).json()
    client = WeComClient(
        SETTINGS.model_copy(update={"api_base": f"{base}/cgi-bin"}),
        InMemoryTokenCache(),
    )
    try:
        (kf,) = truth["messages"]
        pulled = [m async for p in client.iter_sync(kf) for m in p.msg_list]
    finally:
        await client.aclose()
    per_user: dict[str, list[str]] = {}
    for m in pulled:
        user = m.get("external_userid") or m["event"]["external_userid"]
        per_user.setdefault(user, []).append(m["msgid"])
    for user, ids in truth["messages"][kf].items():
        assert per_user[user][: len(ids)] == ids  # same order as ground truth


async def test_client_times_out_and_retries_a_hanging_api_over_tcp() -> None:
    state = WeComSimulatorState.from_settings(SETTINGS)
    sim = WeComSimulator(state, hang_s=1.0)
    base, stop = await _serve(make_app(sim))
    settings = SETTINGS.model_copy(
        update={"api_base": f"{base}/cgi-bin", "http_timeout_s": 0.3, "retry_base_s": 0.01}
    )
    client = WeComClient(settings, InMemoryTokenCache())
    try:
        ids = state.add_messages(KF, "u", 5)
        state.add_fault(FaultRule(api="kf/sync_msg", kind="timeout", count=1))
        state.add_fault(FaultRule(api="kf/sync_msg", kind="latency", latency_s=0.1, count=1))
        retries_before = API_RETRIES.total()
        page = await client.sync_msg(KF)
        assert [m["msgid"] for m in page.msg_list] == ids
        # The hung call (1 s) was given up at the 0.3 s timeout and retried: waited out,
        # it would have answered and needed no retry.
        assert API_RETRIES.total() - retries_before == 1
        assert state.stats.faults_fired == 2
    finally:
        await client.aclose()
        await stop()
