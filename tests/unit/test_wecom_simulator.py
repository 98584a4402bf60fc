"""The simulator itself: retention, cursors, tokens, faults, callback pushing, HTTP admin."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from qywx_ray.ingress.callback import InMemoryReplayCache, make_callback_router
from qywx_ray.testing.wecomsim import (
    MESSAGE_TYPES,
    FaultRule,
    Population,
    PopulationConfig,
    WeComSimulator,
    WeComSimulatorState,
    make_app,
    parse_mix,
    parse_rate,
)
from qywx_ray.wecom.crypto import WeComCrypto
from qywx_ray.wecom.errcodes import ErrCode
from qywx_ray.wecom.models import KfCallbackEvent, parse_kf_message
from qywx_ray.wecom.settings import WeComSettings

KF = "wkSIMTEST"
SETTINGS = WeComSettings()


class Clock:
    def __init__(self, now: float = 1_760_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _state(clock: Clock | None = None) -> WeComSimulatorState:
    return WeComSimulatorState.from_settings(SETTINGS, clock=clock or Clock(), rng=random.Random(5))


def _token(state: WeComSimulatorState) -> str:
    result = state.gettoken(SETTINGS.corp_id, SETTINGS.kf_secret.get_secret_value())
    return str(result["access_token"])


def test_gettoken_checks_credentials_and_expiry() -> None:
    clock = Clock()
    state = _state(clock)
    assert state.gettoken("wrong", "x")["errcode"] == 40013
    assert state.gettoken(SETTINGS.corp_id, "x")["errcode"] == 40001
    ok = state.gettoken(SETTINGS.corp_id, SETTINGS.kf_secret.get_secret_value())
    assert ok["expires_in"] == 7200
    assert ok["errcode"] == 0
    token = ok["access_token"]
    assert state.sync_msg(token, {"open_kfid": KF})["errcode"] == 0
    assert state.sync_msg("nope", {"open_kfid": KF})["errcode"] == ErrCode.INVALID_TOKEN
    clock.now += 7201
    assert state.sync_msg(token, {"open_kfid": KF})["errcode"] == ErrCode.TOKEN_EXPIRED


def test_messages_have_real_ids_and_every_type_parses() -> None:
    state = _state()
    token = _token(state)
    for msgtype in MESSAGE_TYPES:
        state.add_messages(KF, "wmUSER", 1, msgtype=msgtype)
    page = state.sync_msg(token, {"open_kfid": KF})
    assert len(page["msg_list"]) == len(MESSAGE_TYPES)
    for raw in page["msg_list"]:
        assert len(raw["msgid"]) == 32
        msg = parse_kf_message(raw)
        assert type(msg).__name__ != "UnknownMessage"
        assert msg.open_kfid == KF
        assert msg.external_userid == "wmUSER"
        assert msg.model_dump() == raw
    assert len({m["msgid"] for m in page["msg_list"]}) == len(MESSAGE_TYPES)


def test_sync_validates_parameters() -> None:
    state = _state()
    token = _token(state)
    assert state.sync_msg(token, {})["errcode"] == ErrCode.INVALID_PARAM  # open_kfid required
    too_many = state.sync_msg(token, {"open_kfid": KF, "limit": 1001})
    assert too_many["errcode"] == ErrCode.INVALID_PARAM
    garbage = state.sync_msg(token, {"open_kfid": KF, "cursor": "garbage"})
    assert garbage["errcode"] == ErrCode.INVALID_PARAM
    state.add_messages("wkOTHER", "u", 1)
    other_cursor = state.sync_msg(token, {"open_kfid": "wkOTHER"})["next_cursor"]
    assert state.sync_msg(token, {"open_kfid": KF, "cursor": other_cursor})["errcode"] != 0


def test_invalidated_cursors_are_rejected_and_a_pull_without_one_starts_over() -> None:
    state = _state()
    token = _token(state)
    first = state.add_messages(KF, "u", 3)
    page = state.sync_msg(token, {"open_kfid": KF})
    cursor = page["next_cursor"]
    second = state.add_messages(KF, "u", 2)
    state.invalidate_cursors(KF)
    rejected = state.sync_msg(token, {"open_kfid": KF, "cursor": cursor})
    assert rejected["errcode"] == ErrCode.INVALID_PARAM
    assert "cursor" in rejected["errmsg"]
    again = state.sync_msg(token, {"open_kfid": KF})
    assert [m["msgid"] for m in again["msg_list"]] == first + second
    fresh = state.sync_msg(token, {"open_kfid": KF, "cursor": again["next_cursor"]})
    assert fresh["errcode"] == 0
    assert fresh["msg_list"] == []


def test_three_day_retention_prunes_sync_but_not_truth() -> None:
    clock = Clock()
    state = _state(clock)
    token = _token(state)
    old = state.add_messages(KF, "u", 3)
    clock.now += 2 * 86400
    new = state.add_messages(KF, "u", 2)
    clock.now += 86400 + 1  # the first three are now older than 3 days
    token = _token(state)
    page = state.sync_msg(token, {"open_kfid": KF})
    assert [m["msgid"] for m in page["msg_list"]] == new
    assert state.truth_view()["messages"][KF]["u"] == old + new


def test_sync_page_of_1000_1kib_messages_is_pre_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page is the messages' bytes encoded once when they were added, joined: serving
    1,000 messages encodes only the page head (what keeps a full page at ~2 ms)."""
    from qywx_ray.testing.wecomsim import state as simulator

    state = _state()
    token = _token(state)
    for i in range(10):
        state.add_messages(KF, f"u{i}", 200, size_bytes=1024)
    body = {"open_kfid": KF, "limit": 1000}
    encoded: list[object] = []
    real_json = simulator.json  # type: ignore[attr-defined]  # the module's own json import, patched

    class CountingJson:
        loads = staticmethod(real_json.loads)

        @staticmethod
        def dumps(obj: object, **kw: Any) -> str:
            encoded.append(obj)
            return real_json.dumps(obj, **kw)

    monkeypatch.setattr(simulator, "json", CountingJson)
    raw = state.sync_msg_bytes(token, body)
    assert len(raw) > 1000 * 1000
    assert len(encoded) == 1
    assert "msg_list" not in encoded[0]  # type: ignore[operator]  # a dict, recorded as object
    page = real_json.loads(raw)
    assert len(page["msg_list"]) == 1000
    assert page["has_more"] == 1


def test_fault_rules_count_and_probability() -> None:
    state = _state()
    state.add_fault(FaultRule(api="kf/sync_msg", errcode=-1, count=2))
    assert len(state.take_faults("kf/sync_msg")) == 1
    assert state.take_faults("kf/send_msg") == []
    assert len(state.take_faults("kf/sync_msg")) == 1
    assert state.take_faults("kf/sync_msg") == []  # spent
    state.add_fault(FaultRule(api="*", kind="latency", count=None, probability=0.3))
    fired = sum(len(state.take_faults("gettoken")) for _ in range(1000))
    assert 200 < fired < 400
    with pytest.raises(ValueError, match="unknown fault kind"):
        state.add_fault(FaultRule(kind="explode"))


def test_population_tick_is_rate_accurate() -> None:
    state = _state()
    pop = Population(
        state,
        PopulationConfig(users=100, rate_per_min=6, attackers=2, attacker_rate_per_min=60),
    )
    added = sum(pop.tick(1.0) for _ in range(60))  # one simulated minute
    assert 600 <= added - 120 <= 600 + 10 * 60  # bursts off: 600 + 120 attack messages
    truth = state.truth_view()["messages"]
    assert sum(len(v) for users in truth.values() for v in users.values()) == added


def test_rate_and_mix_parsing() -> None:
    assert parse_rate("2/min") == 2.0
    assert parse_rate("1/s") == 60.0
    assert parse_rate("30/h") == 0.5
    assert parse_mix("text=0.8,image=0.2") == {"text": 0.8, "image": 0.2}


class CallbackApp:
    """A real callback router plus knobs: fail the first N requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.events: list[KfCallbackEvent] = []
        self.fail_first = fail_first
        self.requests = 0
        self.app = FastAPI()

        @self.app.middleware("http")
        async def failer(request: Request, call_next):  # type: ignore[no-untyped-def]
            self.requests += 1
            if self.requests <= self.fail_first:
                return PlainTextResponse("busy", status_code=503)
            return await call_next(request)

        crypto = WeComCrypto(
            SETTINGS.token.get_secret_value(),
            SETTINGS.encoding_aes_key.get_secret_value(),
            SETTINGS.corp_id,
        )
        self.app.include_router(make_callback_router(crypto, self, InMemoryReplayCache()))

    def submit(self, event: KfCallbackEvent) -> None:
        self.events.append(event)


async def _sim_with(cb: CallbackApp, **kw: object) -> WeComSimulator:
    state = WeComSimulatorState.from_settings(SETTINGS, rng=random.Random(9))
    return await WeComSimulator(
        state,
        callback_url="http://ingress/wecom/callback",
        callback_transport=httpx.ASGITransport(app=cb.app),
        **kw,  # type: ignore[arg-type]
    ).start()


async def test_callbacks_are_pushed_encrypted_and_token_works() -> None:
    cb = CallbackApp()
    sim = await _sim_with(cb)
    try:
        ids = sim.state.add_messages(KF, "u1", 3)
        await sim.idle(5)
        assert len(cb.events) == 1
        assert cb.events[0].open_kfid == KF
        token = _token(sim.state)
        page = sim.state.sync_msg(token, {"open_kfid": KF, "token": cb.events[0].token})
        assert [m["msgid"] for m in page["msg_list"]] == ids
        assert sim.state.stats.callbacks_delivered == 1
    finally:
        await sim.stop()


async def test_callback_retried_up_to_three_tries() -> None:
    cb = CallbackApp(fail_first=2)
    sim = await _sim_with(cb)
    try:
        sim.state.add_messages(KF, "u1", 1)
        await sim.idle(5)
        assert cb.requests == 3
        assert len(cb.events) == 1
        cb.fail_first, cb.requests = 100, 0
        sim.state.add_messages(KF, "u1", 1)
        await sim.idle(5)
        assert cb.requests == 3
        assert sim.state.stats.callbacks_failed == 1
    finally:
        await sim.stop()


async def test_drop_and_duplicate_faults() -> None:
    cb = CallbackApp()
    sim = await _sim_with(cb)
    try:
        sim.state.add_fault(FaultRule(api="callback", kind="drop", count=1))
        sim.state.add_messages(KF, "u1", 1)
        await sim.idle(5)
        assert cb.requests == 0
        assert sim.state.stats.callbacks_dropped == 1
        sim.state.add_fault(FaultRule(api="callback", kind="duplicate", count=1))
        sim.state.add_messages(KF, "u1", 1)
        await sim.idle(5)
        assert cb.requests == 2  # the same signed request twice ...
        assert len(cb.events) == 1  # ... and the replay cache kept the sink to one
    finally:
        await sim.stop()


@pytest.fixture
async def http() -> AsyncIterator[tuple[httpx.AsyncClient, WeComSimulator]]:
    sim = WeComSimulator(_state())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=make_app(sim)), base_url="http://sim"
    ) as client:
        yield client, sim


async def test_http_admin_endpoints(http: tuple[httpx.AsyncClient, WeComSimulator]) -> None:
    client, _ = http
    resp = await client.post(
        "/sim/messages",
        json={"open_kfid": KF, "external_userid": "u9", "count": 4, "size_bytes": 512},
    )
    ids = resp.json()["msgids"]
    assert len(ids) == 4
    truth = (await client.get("/sim/truth")).json()
    assert truth["messages"][KF]["u9"] == ids
    assert truth["total"] == 4
    resp = await client.post("/sim/faults", json={"api": "gettoken", "errcode": 45009, "count": 1})
    assert resp.status_code == 200
    assert len(resp.json()["faults"]) == 1
    params = {"corpid": SETTINGS.corp_id, "corpsecret": SETTINGS.kf_secret.get_secret_value()}
    assert (await client.get("/cgi-bin/gettoken", params=params)).json()["errcode"] == 45009
    token = (await client.get("/cgi-bin/gettoken", params=params)).json()["access_token"]
    page = await client.post(
        "/cgi-bin/kf/sync_msg", params={"access_token": token}, json={"open_kfid": KF}
    )
    assert [m["msgid"] for m in page.json()["msg_list"]] == ids
    assert (await client.post("/sim/faults", json={"kind": "nope"})).status_code == 400
    assert (await client.delete("/sim/faults")).json() == {"faults": []}
    assert (await client.post("/sim/tokens/expire")).json()["expired"] == 1
    resp = await client.post(
        "/cgi-bin/kf/sync_msg", params={"access_token": token}, json={"open_kfid": KF}
    )
    assert resp.json()["errcode"] == ErrCode.TOKEN_EXPIRED
    assert (await client.get("/sim/replies")).json() == []
    assert (await client.get("/sim/stats")).json()["messages"] == 4


def test_stored_messages_are_the_bytes_the_stdlib_writes() -> None:
    """The simulator encodes with orjson for speed; what it stores (and serves from
    kf/sync_msg) must stay byte for byte what json.dumps(ensure_ascii=False, compact)
    writes: for every message type, non-ASCII text, and `extra` values orjson spells
    differently (1e-07, NaN) or refuses (an int beyond 64 bits)."""
    import json

    from qywx_ray.testing.wecomsim.state import MESSAGE_TYPES, WeComSimulatorState

    state = WeComSimulatorState.from_settings(
        WeComSettings(), clock=lambda: 1_700_000_000.0, rng=random.Random(3)
    )
    kf = "wkSIMKF000000000000000001"
    extras: list[dict[str, Any] | None] = [
        None,
        {"note": "中文 ☃", "n": 7},
        {"big": 2**70},
        {"tiny": 1e-7, "nan": float("nan")},
    ]
    sent: list[dict[str, Any] | None] = []
    for i, msgtype in enumerate(MESSAGE_TYPES):
        extra = extras[i % len(extras)]
        state.add_messages(kf, f"wmU{i}", 1, msgtype, size_bytes=300, extra=extra)
        sent.append(extra)
    stored = state.logs[kf].messages
    assert len(stored) == len(MESSAGE_TYPES)
    for m, extra in zip(stored, sent, strict=True):
        decoded = json.loads(m.data)
        decoded.update(extra or {})  # the values as sent (NaN does not survive a round trip)
        assert m.data == json.dumps(decoded, ensure_ascii=False, separators=(",", ":")).encode()
    assert any(b'"tiny":1e-07,"nan":NaN' in m.data for m in stored)


def test_the_simulator_freezes_its_heap_every_so_many_messages() -> None:
    """A stress run's millions of kept messages must not be walked by the collector's
    full passes (0.4-0.8 s stalls of every simulator answer): every FREEZE_EVERY messages
    what exists is frozen out of its sight."""
    import gc

    from qywx_ray.testing.wecomsim.runtime import FREEZE_EVERY

    sim = WeComSimulator(_state())
    sim.state.stats.messages = FREEZE_EVERY - 1
    assert not sim._freeze_if_due()
    before = gc.get_freeze_count()
    sim.state.stats.messages = FREEZE_EVERY
    try:
        assert sim._freeze_if_due()
        assert gc.get_freeze_count() > before
        sim.state.stats.messages = 2 * FREEZE_EVERY - 1
        assert not sim._freeze_if_due()  # counted from the last freeze
    finally:
        gc.unfreeze()
