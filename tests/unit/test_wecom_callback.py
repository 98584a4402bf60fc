"""The callback router in-process: every status code, replay handling, fail-open, speed."""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from qywx_ray.ingress.callback import (
    CALLBACKS,
    REPLAY_CACHE_ERRORS,
    InMemoryReplayCache,
    make_callback_router,
)
from qywx_ray.testing.wecomsim import WeComSimulatorState, sim_encrypt, sim_sign
from qywx_ray.wecom.crypto import WeComCrypto
from qywx_ray.wecom.models import KfCallbackEvent

TOKEN = "cbtoken"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
CORP = "wwcallbacktest01"
NOW = 1_760_000_000.0
URL = "http://ingress/wecom/callback"


class ListSink:
    def __init__(self) -> None:
        self.events: list[KfCallbackEvent] = []

    def submit(self, event: KfCallbackEvent) -> None:
        self.events.append(event)


class BrokenReplay:
    """Redis down: refused at once, or (hang_s) a call that hangs until cancelled."""

    def __init__(self, hang_s: float = 0.0) -> None:
        self.hang_s = hang_s
        self.cancelled = 0  # calls our replay timeout gave up on

    async def first_seen(self, key: str, ttl_s: int) -> bool:
        if self.hang_s:
            try:
                await asyncio.sleep(self.hang_s)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        raise ConnectionError("redis down")

    async def forget(self, key: str) -> None:
        raise ConnectionError("redis down")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sim() -> WeComSimulatorState:
    return WeComSimulatorState(
        corp_id=CORP,
        kf_secret="s",
        callback_token=TOKEN,
        encoding_aes_key=AES_KEY,
        clock=lambda: NOW,
        rng=random.Random(7),
    )


def _app(sink: ListSink, replay: object | None = None, **kw: object) -> FastAPI:
    app = FastAPI()
    app.include_router(
        make_callback_router(
            WeComCrypto(TOKEN, AES_KEY, CORP),
            sink,
            replay or InMemoryReplayCache(),  # type: ignore[arg-type]
            clock=kw.pop("clock", Clock(NOW)),  # type: ignore[arg-type]
            **kw,  # type: ignore[arg-type]
        )
    )
    return app


@pytest.fixture
async def setup() -> AsyncIterator[tuple[httpx.AsyncClient, ListSink]]:
    sink = ListSink()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(sink))) as client:
        yield client, sink


def _signed_body(
    inner: str, *, ts: float = NOW, nonce: str = "12345", agent: bool = True
) -> tuple[dict[str, str], bytes]:
    enc = sim_encrypt(AES_KEY, CORP, inner, b"r" * 16)
    timestamp = str(int(ts))
    params = {
        "msg_signature": sim_sign(TOKEN, timestamp, nonce, enc),
        "timestamp": timestamp,
        "nonce": nonce,
    }
    agent_xml = "<AgentID><![CDATA[1000002]]></AgentID>" if agent else ""
    body = f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><Encrypt><![CDATA[{enc}]]></Encrypt>{agent_xml}</xml>"  # noqa: E501
    return params, body.encode()


INNER = (
    f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName><CreateTime>{int(NOW)}</CreateTime>"
    "<MsgType><![CDATA[event]]></MsgType><Event><![CDATA[kf_msg_or_event]]></Event>"
    "<Token><![CDATA[ENCsynctoken123]]></Token><OpenKfId><![CDATA[wkKF1]]></OpenKfId></xml>"
)


async def test_url_verification_returns_plain_echo_without_touching_the_pipeline(
    setup: tuple[httpx.AsyncClient, ListSink], sim: WeComSimulatorState
) -> None:
    """WeCom wants the echo within 1 s: the verification is answered from the request
    alone (nothing submitted downstream), which is what keeps it fast."""
    client, sink = setup
    params = sim.build_url_check("1616140317555161061")
    resp = await client.get(URL, params=params)
    assert resp.status_code == 200
    assert resp.content == b"1616140317555161061"  # no quotes, no newline
    assert resp.headers["content-type"].startswith("text/plain")
    assert sink.events == []


async def test_url_verification_rejects_bad_signature_and_missing_params(
    setup: tuple[httpx.AsyncClient, ListSink], sim: WeComSimulatorState
) -> None:
    client, _ = setup
    params = sim.build_url_check("echo")
    bad = {**params, "msg_signature": "0" * 40}
    resp = await client.get(URL, params=bad)
    assert resp.status_code == 401
    assert resp.text == "unauthorized"
    resp = await client.get(URL, params={k: v for k, v in params.items() if k != "echostr"})
    assert resp.status_code == 400


async def test_post_valid_callback_reaches_sink(
    setup: tuple[httpx.AsyncClient, ListSink], sim: WeComSimulatorState
) -> None:
    client, sink = setup
    before = CALLBACKS.value(result="ok")
    params, body = sim.build_callback("wkSIMKF")
    resp = await client.post(URL, params=params, content=body)
    assert resp.status_code == 200
    assert resp.text == "success"
    assert len(sink.events) == 1
    event = sink.events[0]
    assert event.open_kfid == "wkSIMKF"
    assert event.to_user_name == CORP
    assert event.token in sim.sync_tokens  # the simulator's sync token made it through
    assert CALLBACKS.value(result="ok") == before + 1


async def test_post_without_agent_id_is_accepted(setup: tuple[httpx.AsyncClient, ListSink]) -> None:
    client, sink = setup
    params, body = _signed_body(INNER, agent=False)
    resp = await client.post(URL, params=params, content=body)
    assert resp.status_code == 200
    assert sink.events[0].token == "ENCsynctoken123"


async def test_bad_signature_is_401_with_generic_body(
    setup: tuple[httpx.AsyncClient, ListSink],
) -> None:
    client, sink = setup
    params, body = _signed_body(INNER)
    resp = await client.post(URL, params={**params, "nonce": "999"}, content=body)
    assert resp.status_code == 401
    assert resp.text == "unauthorized"
    assert TOKEN not in resp.text
    assert "signature" not in resp.text
    assert sink.events == []


@pytest.mark.parametrize(
    "body",
    [
        b"<xml><ToUserName>x</ToUserName>",  # truncated
        b"not xml at all",
        b"<xml><ToUserName>x</ToUserName></xml>",  # no Encrypt
        b"",
    ],
)
async def test_malformed_xml_is_400(setup: tuple[httpx.AsyncClient, ListSink], body: bytes) -> None:
    client, sink = setup
    params = {"msg_signature": "a" * 40, "timestamp": str(int(NOW)), "nonce": "1"}
    resp = await client.post(URL, params=params, content=body)
    assert resp.status_code == 400
    assert sink.events == []


async def test_entities_and_dtd_are_refused(setup: tuple[httpx.AsyncClient, ListSink]) -> None:
    client, _ = setup
    bomb = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;">]><xml><Encrypt>&lol2;</Encrypt></xml>'
    )
    params = {"msg_signature": "a" * 40, "timestamp": str(int(NOW)), "nonce": "1"}
    resp = await client.post(URL, params=params, content=bomb)
    assert resp.status_code == 400


async def test_missing_query_params_is_400(setup: tuple[httpx.AsyncClient, ListSink]) -> None:
    client, _ = setup
    _, body = _signed_body(INNER)
    resp = await client.post(URL, params={"timestamp": str(int(NOW))}, content=body)
    assert resp.status_code == 400


async def test_inner_xml_missing_fields_is_400(setup: tuple[httpx.AsyncClient, ListSink]) -> None:
    client, sink = setup
    inner = INNER.replace("<OpenKfId><![CDATA[wkKF1]]></OpenKfId>", "")
    params, body = _signed_body(inner)
    resp = await client.post(URL, params=params, content=body)
    assert resp.status_code == 400
    assert sink.events == []
    params, body = _signed_body("<xml><MsgType>event</")  # authentic but malformed inner XML
    assert (await client.post(URL, params=params, content=body)).status_code == 400


async def test_other_events_are_acked_but_not_submitted(
    setup: tuple[httpx.AsyncClient, ListSink],
) -> None:
    client, sink = setup
    inner = INNER.replace("kf_msg_or_event", "change_contact")
    params, body = _signed_body(inner)
    resp = await client.post(URL, params=params, content=body)
    assert resp.status_code == 200
    assert resp.text == "success"
    assert sink.events == []


async def test_body_too_large_by_content_length_is_413() -> None:
    sink = ListSink()
    app = _app(sink, max_body_bytes=1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        params, body = _signed_body(INNER)
        resp = await client.post(URL, params=params, content=body + b" " * 2000)
        assert resp.status_code == 413
        assert sink.events == []


async def test_body_too_large_without_content_length_is_413() -> None:
    sink = ListSink()
    app = _app(sink, max_body_bytes=1024)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"<" * 300

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        params, _ = _signed_body(INNER)
        req = client.build_request("POST", URL, params=params, content=chunks())
        assert "content-length" not in req.headers  # chunked: only the actual read can tell
        resp = await client.send(req)
        assert resp.status_code == 413
        assert sink.events == []


@pytest.mark.parametrize("skew_s", [-301, 301, 10_000])
async def test_stale_timestamp_is_403(
    setup: tuple[httpx.AsyncClient, ListSink], skew_s: int
) -> None:
    client, sink = setup
    params, body = _signed_body(INNER, ts=NOW + skew_s)
    resp = await client.post(URL, params=params, content=body)
    assert resp.status_code == 403
    assert sink.events == []


async def test_timestamp_within_skew_is_accepted(
    setup: tuple[httpx.AsyncClient, ListSink],
) -> None:
    client, sink = setup
    params, body = _signed_body(INNER, ts=NOW - 299)
    assert (await client.post(URL, params=params, content=body)).status_code == 200
    assert len(sink.events) == 1


async def test_replay_is_acked_but_not_resubmitted(
    setup: tuple[httpx.AsyncClient, ListSink],
) -> None:
    client, sink = setup
    params, body = _signed_body(INNER)
    before = CALLBACKS.value(result="duplicate")
    for _ in range(3):
        resp = await client.post(URL, params=params, content=body)
        assert resp.status_code == 200
        assert resp.text == "success"
    assert len(sink.events) == 1
    assert CALLBACKS.value(result="duplicate") == before + 2
    params2, body2 = _signed_body(INNER, nonce="67890")  # a new callback is not a replay
    assert (await client.post(URL, params=params2, content=body2)).status_code == 200
    assert len(sink.events) == 2


async def test_in_memory_replay_cache_expires_by_clock() -> None:
    clock = Clock(100.0)
    cache = InMemoryReplayCache(clock=clock)
    assert await cache.first_seen("k", 10) is True
    assert await cache.first_seen("k", 10) is False
    clock.now = 109.9
    assert await cache.first_seen("k", 10) is False
    clock.now = 110.1
    assert await cache.first_seen("k", 10) is True


@pytest.mark.parametrize("hang_s", [0.0, 600.0])
async def test_replay_cache_down_fails_open_fast(hang_s: float) -> None:
    """A hanging replay check is abandoned at replay_timeout_s (cancelled by us, not
    waited out): the hang here is 600 s, so an answer at all means we gave up on it."""
    sink = ListSink()
    replay = BrokenReplay(hang_s)
    app = _app(sink, replay, replay_timeout_s=0.2)
    before = REPLAY_CACHE_ERRORS.value()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        params, body = _signed_body(INNER)
        resp = await client.post(URL, params=params, content=body)
    assert resp.status_code == 200
    assert resp.text == "success"
    assert len(sink.events) == 1  # processed: a duplicate pull is harmless, a lost one is not
    assert REPLAY_CACHE_ERRORS.value() == before + 1
    assert replay.cancelled == (1 if hang_s else 0)


async def test_post_answers_before_any_downstream_work(sim: WeComSimulatorState) -> None:
    """The callback's latency budget is WeCom's 5 s; it holds because the route only
    verifies, records the event and answers: the pull itself happens later. A sink that
    never lets its downstream run proves every answer came before any of it."""

    class HeldSink(ListSink):
        def __init__(self) -> None:
            super().__init__()
            self.downstream_ran = 0
            self.release = asyncio.Event()
            self.tasks: set[asyncio.Task[None]] = set()

        def submit(self, event: KfCallbackEvent) -> None:
            super().submit(event)
            self.tasks.add(asyncio.get_running_loop().create_task(self._downstream()))

        async def _downstream(self) -> None:
            await self.release.wait()
            self.downstream_ran += 1

    sink = HeldSink()
    requests = [sim.build_callback(f"wk{i}") for i in range(200)]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(sink))) as client:
        for params, body in requests:
            resp = await client.post(URL, params=params, content=body)
            assert resp.status_code == 200
            assert resp.text == "success"
    assert len(sink.events) == 200
    assert sink.downstream_ran == 0
    sink.release.set()
    await asyncio.gather(*sink.tasks)
    assert sink.downstream_ran == 200


class FailingOnceSink(ListSink):
    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    def submit(self, event: KfCallbackEvent) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("queue full")
        super().submit(event)


async def test_sink_failure_is_not_acked_and_the_retry_gets_through() -> None:
    sink = FailingOnceSink()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(sink))) as client:
        params, body = _signed_body(INNER)
        first = await client.post(URL, params=params, content=body)
        assert first.status_code == 503  # WeCom will retry ...
        retry = await client.post(URL, params=params, content=body)
        assert retry.status_code == 200
        assert retry.text == "success"
        assert len(sink.events) == 1  # ... and the retry is not mistaken for a replay


async def test_replayed_request_with_bad_ciphertext_stays_400(
    setup: tuple[httpx.AsyncClient, ListSink],
) -> None:
    client, _ = setup
    enc = base64.b64encode(b"x" * 32).decode()  # signed, but not a valid ciphertext
    ts = str(int(NOW))
    params = {"msg_signature": sim_sign(TOKEN, ts, "1", enc), "timestamp": ts, "nonce": "1"}
    body = f"<xml><Encrypt><![CDATA[{enc}]]></Encrypt></xml>".encode()
    for _ in range(2):
        assert (await client.post(URL, params=params, content=body)).status_code == 400
