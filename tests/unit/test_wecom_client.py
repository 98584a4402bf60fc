"""WeComClient against the in-process simulator: tokens, retries, paging, cursors, sends."""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from qywx_ray.errors import WeComError
from qywx_ray.testing.wecomsim import (
    FaultRule,
    WeComSimulator,
    WeComSimulatorState,
    make_app,
)
from qywx_ray.wecom.client import (
    InMemoryTokenCache,
    WeComClient,
    WeComTokenError,
    WeComTransientError,
)
from qywx_ray.wecom.errcodes import ErrCode
from qywx_ray.wecom.settings import WeComSettings

KF = "wkCLIENTTEST"


class Clock:
    def __init__(self, now: float = 1_760_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    state: WeComSimulatorState
    client: WeComClient
    sleeps: list[float]
    clock: Clock
    settings: WeComSettings


def _settings(**kw: object) -> WeComSettings:
    base: dict[str, object] = {
        "api_base": "http://sim/cgi-bin",
        "max_retries": 3,
        "retry_base_s": 0.2,
        "retry_max_s": 1.0,
    }
    return WeComSettings.model_validate({**base, **kw})


async def _make_env(
    settings: WeComSettings, transport: httpx.AsyncBaseTransport | None = None
) -> tuple[Env, WeComSimulator]:
    clock = Clock()
    state = WeComSimulatorState.from_settings(settings, clock=clock, rng=random.Random(1))
    sim = WeComSimulator(state)
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    client = WeComClient(
        settings,
        InMemoryTokenCache(clock=clock),
        transport=transport or httpx.ASGITransport(app=make_app(sim)),
        clock=clock,
        sleep=fake_sleep,
        rng=random.Random(3),
    )
    return Env(state, client, sleeps, clock, settings), sim


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e, _ = await _make_env(_settings())
    yield e
    await e.client.aclose()


async def test_token_is_cached(env: Env) -> None:
    t1 = await env.client.get_access_token()
    await env.client.sync_msg(KF)
    await env.client.sync_msg(KF)
    assert await env.client.get_access_token() == t1
    assert env.state.stats.gettoken_calls == 1


async def test_token_refreshed_before_expiry(env: Env) -> None:
    t1 = await env.client.get_access_token()
    env.clock.now += 7200 - 300 + 1  # within the refresh margin
    t2 = await env.client.get_access_token()
    assert t2 != t1
    assert env.state.stats.gettoken_calls == 2


async def test_refresh_on_40014_invalid_token(env: Env) -> None:
    env.state.add_messages(KF, "u1", 3)
    t1 = await env.client.get_access_token()
    env.state.revoke_access_tokens()  # next call answers 40014
    page = await env.client.sync_msg(KF)
    assert len(page.msg_list) == 3
    assert env.state.stats.gettoken_calls == 2
    assert await env.client.get_access_token() != t1


async def test_refresh_on_42001_expired_token(env: Env) -> None:
    await env.client.get_access_token()
    env.state.expire_access_tokens()  # next call answers 42001
    env.state.add_messages(KF, "u1", 1)
    page = await env.client.sync_msg(KF)
    assert len(page.msg_list) == 1
    assert env.state.stats.gettoken_calls == 2


async def test_token_error_twice_raises_after_one_refresh(env: Env) -> None:
    env.state.add_fault(FaultRule(api="kf/sync_msg", errcode=40014, count=2))
    with pytest.raises(WeComTokenError) as info:
        await env.client.sync_msg(KF)
    assert info.value.errcode == 40014
    assert env.state.stats.gettoken_calls == 2  # initial + exactly one refresh
    assert env.sleeps == []


async def test_bad_credentials_raise_without_retry() -> None:
    e, _ = await _make_env(_settings(kf_secret="right"))
    e.state.kf_secret = "something-else"
    with pytest.raises(WeComError) as info:
        await e.client.sync_msg(KF)
    assert info.value.errcode == ErrCode.INVALID_SECRET
    assert e.sleeps == []
    await e.client.aclose()


@pytest.mark.parametrize("errcode", [-1, 45009, 45033])
async def test_retryable_errcode_retried_with_bounded_backoff(env: Env, errcode: int) -> None:
    env.state.add_messages(KF, "u1", 2)
    await env.client.get_access_token()
    env.state.add_fault(FaultRule(api="kf/sync_msg", errcode=errcode, count=3))
    page = await env.client.sync_msg(KF)
    assert len(page.msg_list) == 2
    assert len(env.sleeps) == 3
    for attempt, delay in enumerate(env.sleeps):
        cap = min(env.settings.retry_max_s, env.settings.retry_base_s * 2**attempt)
        assert cap * 0.5 <= delay <= cap


async def test_retries_are_bounded_then_transient_error(env: Env) -> None:
    env.state.add_fault(FaultRule(api="kf/sync_msg", errcode=-1, count=None))
    await env.client.get_access_token()
    with pytest.raises(WeComTransientError) as info:
        await env.client.sync_msg(KF)
    assert info.value.errcode == -1
    assert info.value.api == "kf/sync_msg"
    assert len(env.sleeps) == env.settings.max_retries
    assert all(d <= env.settings.retry_max_s for d in env.sleeps)
    assert sum(env.sleeps) <= env.settings.max_retries * env.settings.retry_max_s


async def test_backoff_grows_then_caps() -> None:
    e, _ = await _make_env(_settings(max_retries=8, retry_base_s=0.1, retry_max_s=2.0))
    delays = [e.client.backoff_s(i) for i in range(8)]
    assert max(delays) <= 2.0
    assert delays[0] <= 0.1
    assert delays[-1] >= 1.0
    await e.client.aclose()


async def test_http_500_is_retried(env: Env) -> None:
    await env.client.get_access_token()
    env.state.add_fault(FaultRule(api="kf/sync_msg", kind="http_500", count=2))
    page = await env.client.sync_msg(KF)
    assert page.errcode == 0
    assert len(env.sleeps) == 2


async def test_non_retryable_errcode_raises_immediately(env: Env) -> None:
    await env.client.get_access_token()
    env.state.add_fault(FaultRule(api="kf/sync_msg", errcode=95026, count=1))
    with pytest.raises(WeComError) as info:
        await env.client.sync_msg(KF)
    assert info.value.errcode == 95026
    assert not isinstance(info.value, WeComTransientError)
    assert env.sleeps == []


class FlakyTransport(httpx.AsyncBaseTransport):
    """Raises timeouts / connection errors for the first N requests, then forwards."""

    def __init__(self, inner: httpx.AsyncBaseTransport, errors: list[Exception]) -> None:
        self.inner = inner
        self.errors = errors
        self.calls = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return await self.inner.handle_async_request(request)


async def test_timeouts_and_connection_errors_are_retried() -> None:
    settings = _settings()
    clock = Clock()
    state = WeComSimulatorState.from_settings(settings, clock=clock)
    flaky = FlakyTransport(
        httpx.ASGITransport(app=make_app(WeComSimulator(state))),
        [httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), httpx.ConnectTimeout("x")],
    )
    sleeps: list[float] = []

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    client = WeComClient(settings, InMemoryTokenCache(clock), transport=flaky, sleep=fake_sleep)
    state.add_messages(KF, "u", 1)
    page = await client.sync_msg(KF)
    assert len(page.msg_list) == 1
    assert len(sleeps) == 3
    assert flaky.calls == 5
    flaky.errors = [httpx.ReadTimeout("slow")] * 10
    with pytest.raises(WeComTransientError):
        await client.sync_msg(KF)
    await client.aclose()


async def test_iter_sync_follows_has_more_through_empty_pages(env: Env) -> None:
    ids = env.state.add_messages(KF, "u1", 25)
    env.state.add_fault(FaultRule(api="kf/sync_msg", kind="empty_page", count=2))
    pages = [p async for p in env.client.iter_sync(KF, limit=10)]
    assert [len(p.msg_list) for p in pages] == [0, 0, 10, 10, 5]
    assert all(p.has_more for p in pages[:-1])
    assert not pages[-1].has_more
    assert [m["msgid"] for p in pages for m in p.msg_list] == ids


async def test_cursor_continuity_across_calls(env: Env) -> None:
    first = env.state.add_messages(KF, "u1", 1500) + env.state.add_messages(KF, "u2", 700)
    seen: list[str] = []
    cursor = ""
    async for page in env.client.iter_sync(KF, cursor):
        seen += [m["msgid"] for m in page.msg_list]
        cursor = page.next_cursor
    assert seen == first
    later = env.state.add_messages(KF, "u1", 3)
    page = await env.client.sync_msg(KF, cursor)
    assert [m["msgid"] for m in page.msg_list] == later
    assert not page.has_more
    again = await env.client.sync_msg(KF, page.next_cursor)
    assert again.msg_list == []
    assert not again.has_more
    truth = env.state.truth_view()["messages"][KF]
    assert truth["u1"] == first[:1500] + later


async def test_limit_is_capped_at_1000(env: Env) -> None:
    env.state.add_messages(KF, "u", 1200)
    page = await env.client.sync_msg(KF, limit=5000)
    assert len(page.msg_list) == 1000
    assert page.has_more


async def test_sync_with_callback_token(env: Env) -> None:
    env.state.add_messages(KF, "u", 2)
    token = env.state.issue_sync_token(KF)
    assert len((await env.client.sync_msg(KF, token=token)).msg_list) == 2
    assert env.state.stats.sync_calls == 1
    # A bogus or expired (> 10 min) callback token: the pull falls back to no token.
    assert len((await env.client.sync_msg(KF, token="ENCbogus")).msg_list) == 2
    env.clock.now += 601
    env.state.access_tokens = {t: e + 601 for t, e in env.state.access_tokens.items()}
    assert len((await env.client.sync_msg(KF, token=token)).msg_list) == 2
    assert env.state.stats.sync_calls == 5  # each rejected token cost exactly one extra call
    body = {"open_kfid": KF, "token": token}
    assert env.state.sync_msg(await env.client.get_access_token(), body)["errcode"] == (
        ErrCode.INVALID_SYNC_TOKEN
    )


async def test_send_msg_allows_five_replies_per_customer_message(env: Env) -> None:
    with pytest.raises(WeComError) as info:  # no customer message yet
        await env.client.send_msg("u1", KF, "text", {"content": "hi"})
    assert info.value.errcode == ErrCode.SEND_LIMIT
    env.state.add_messages(KF, "u1", 1)
    sent = [await env.client.send_msg("u1", KF, "text", {"content": f"r{i}"}) for i in range(5)]
    assert len(set(sent)) == 5
    with pytest.raises(WeComError):
        await env.client.send_msg("u1", KF, "text", {"content": "sixth"})
    env.state.add_messages(KF, "u1", 1)  # the customer writes again: the window reopens
    assert await env.client.send_msg("u1", KF, "text", {"content": "ok"}, msgid="my_id-1")
    env.clock.now += 48 * 3600 + 1
    with pytest.raises(WeComError):
        await env.client.send_msg("u1", KF, "text", {"content": "too late"})
    replies = env.state.replies
    assert [r["content"]["content"] for r in replies] == [f"r{i}" for i in range(5)] + ["ok"]
    assert replies[-1]["msgid"] == "my_id-1"


@pytest.mark.parametrize("msgid", ["x" * 33, "has space", "中文", "trailing\n"])
async def test_send_msg_rejects_bad_msgid(env: Env, msgid: str) -> None:
    env.state.add_messages(KF, "u1", 1)
    with pytest.raises(WeComError) as info:
        await env.client.send_msg("u1", KF, "text", {"content": "hi"}, msgid=msgid)
    assert info.value.errcode == ErrCode.INVALID_PARAM


async def test_send_msg_on_event_with_welcome_code(env: Env) -> None:
    env.state.add_messages(KF, "u1", 1, msgtype="event")
    page = await env.client.sync_msg(KF)
    code = page.msg_list[0]["event"]["welcome_code"]
    assert await env.client.send_msg_on_event(code, "text", {"content": "欢迎"})
    with pytest.raises(WeComError):  # a code answers once
        await env.client.send_msg_on_event(code, "text", {"content": "again"})
    assert env.state.replies[0]["api"] == "send_msg_on_event"


async def test_secrets_and_tokens_never_logged(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    logging.getLogger("qywx_ray").propagate = True
    token = await env.client.get_access_token()
    env.state.add_fault(FaultRule(api="kf/sync_msg", errcode=-1, count=2))
    env.state.expire_access_tokens()
    await env.client.sync_msg(KF)
    env.state.add_fault(FaultRule(api="kf/sync_msg", errcode=48002, count=1))
    with pytest.raises(WeComError) as refused:
        await env.client.sync_msg(KF)
    assert token not in str(refused.value)
    text = caplog.text + repr([r.__dict__ for r in caplog.records])
    assert "wecom.retry" in text
    assert "access_token=***" in text  # httpx's request log line is redacted, not dropped
    assert token not in text
    assert env.settings.kf_secret.get_secret_value() not in text


class DownCache:
    async def get(self, corp_id: str) -> str | None:
        raise ConnectionError("redis down")

    async def set(self, corp_id: str, token: str, ttl_s: int) -> None:
        raise ConnectionError("redis down")

    async def invalidate(self, corp_id: str, token: str) -> None:
        raise ConnectionError("redis down")


async def test_token_cache_down_falls_back_to_a_local_token() -> None:
    settings = _settings()
    state = WeComSimulatorState.from_settings(settings)
    client = WeComClient(
        settings, DownCache(), transport=httpx.ASGITransport(app=make_app(WeComSimulator(state)))
    )
    state.add_messages(KF, "u", 1)
    for _ in range(3):
        assert len((await client.sync_msg(KF)).msg_list) == 1
    assert state.stats.gettoken_calls == 1  # no gettoken storm while Redis is down
    state.revoke_access_tokens()
    assert len((await client.sync_msg(KF)).msg_list) == 1
    assert state.stats.gettoken_calls == 2
    await client.aclose()


async def test_send_text_shortcut(env: Env) -> None:
    env.state.add_messages(KF, "u1", 1)
    await env.client.send_text("u1", KF, "收到", msgid="r1")
    assert env.state.replies[-1]["content"] == {"content": "收到"}
