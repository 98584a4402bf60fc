"""KfSyncer against the WeCom simulator's state and the real Redis, with a fake producer.

Issue 19: a cursor WeCom rejects (item 3) and malformed WeCom messages (item 5). No
Kafka: the producer is a fake that records what it acknowledged.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import redis

from qywx_ray.errors import WeComError
from qywx_ray.ingest.cursor import CursorStore
from qywx_ray.ingest.locks import LockManager
from qywx_ray.ingest.settings import IngestSettings
from qywx_ray.ingest.spool import Spool
from qywx_ray.ingest.syncer import KfSyncer
from qywx_ray.obs import metrics
from qywx_ray.store.client import make_async_redis
from qywx_ray.store.settings import RedisSettings
from qywx_ray.wecom.errcodes import ErrCode
from qywx_ray.wecom.settings import WeComSettings
from qywx_ray.wecom.simulator import WeComSimulatorState
from tests.helpers.ingest import FakePage, FakeProducer, FakeSource

pytestmark = pytest.mark.integration

KF = "wkSIM"


@pytest.fixture
async def aredis(redis_url: str, redis_client: redis.Redis):
    client = make_async_redis(RedisSettings(url=redis_url))
    yield client
    await client.aclose()


class SimSource:
    """kf/sync_msg answered by the simulator's in-process state (no HTTP)."""

    def __init__(self, state: WeComSimulatorState, settings: WeComSettings) -> None:
        self.state = state
        got = state.gettoken(settings.corp_id, settings.kf_secret.get_secret_value())
        self.access_token = str(got["access_token"])
        self.cursors: list[str] = []

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> FakePage:
        self.cursors.append(cursor)
        body = {"open_kfid": open_kfid, "cursor": cursor, "limit": limit}
        data = self.state.sync_msg(self.access_token, body)
        return FakePage(
            errcode=int(data["errcode"]),
            errmsg=str(data.get("errmsg", "")),
            next_cursor=str(data.get("next_cursor", "")),
            has_more=bool(data.get("has_more")),
            msg_list=list(data.get("msg_list", [])),
        )


def make_syncer(aredis, source, producer: FakeProducer, **settings: object) -> KfSyncer:
    return KfSyncer(
        KF,
        source=source,
        producer=producer,
        locks=LockManager(aredis, ttl_s=5, extend_every_s=1),
        cursors=CursorStore(aredis),
        spool=Spool(aredis),
        settings=IngestSettings(sync_page_limit=2, **settings),  # type: ignore[arg-type]
    )


async def test_a_rejected_cursor_restarts_from_the_oldest_retained_message(aredis) -> None:
    """Issue 19 item 3. Before the fix a cursor WeCom rejects raised WeComError on every
    pull, for ever (the open_kfid stalled until retention dropped what was behind it)."""
    wecom = WeComSettings()
    state = WeComSimulatorState.from_settings(wecom, rng=random.Random(7))
    first = state.add_messages(KF, "u1", 3)
    source = SimSource(state, wecom)
    producer = FakeProducer()
    syncer = make_syncer(aredis, source, producer)
    assert (await syncer.pull_once()).produced == 3
    second = state.add_messages(KF, "u1", 2)
    state.invalidate_cursors(KF)
    resets = metrics.counter("qywx_sync_cursor_resets_total", "").value()

    result = await syncer.pull_once()

    assert metrics.counter("qywx_sync_cursor_resets_total", "").value() == resets + 1
    assert producer.acked == first + first + second  # duplicates, nothing skipped
    assert result.produced == 5
    # The new cursor is one WeCom accepts: the next pull goes on from it.
    assert source.cursors[-1] != ""
    assert await CursorStore(aredis).get(KF) == result.cursor
    third = state.add_messages(KF, "u1", 1)
    assert (await syncer.pull_once()).produced == 1
    assert producer.acked[-1:] == third


async def test_a_rejection_without_a_cursor_is_an_error_not_a_loop(aredis) -> None:
    source = FakeSource([])
    source.errors = [ErrCode.INVALID_PARAM, ErrCode.INVALID_PARAM]
    syncer = make_syncer(aredis, source, FakeProducer())
    with pytest.raises(WeComError):
        await syncer.pull_once()
    assert [c for _, c, _, _ in source.calls] == [""]  # asked once, no restart from ""


async def test_malformed_messages_with_a_msgid_reach_kafka_before_the_cursor_moves(
    aredis,
) -> None:
    """Issue 19 item 5, through the syncer: before the fix `"origin": null` failed every
    pull of the page (TypeError) and a bad send_time was dropped with the cursor moved."""
    good = {"msgid": "g1", "external_userid": "u1", "open_kfid": KF, "msgtype": "text"}
    page = [
        good,
        {**good, "msgid": "n1", "origin": None},
        {**good, "msgid": "b1", "send_time": "1700000000.5"},
        {**good, "msgid": "g2"},
    ]
    source = FakeSource([page])  # type: ignore[list-item]  # malformed on purpose
    producer = FakeProducer()
    syncer = make_syncer(aredis, source, producer)
    invalid_before = metrics.counter("qywx_sync_invalid_messages_total", "").value()

    result = await syncer.pull_once()

    assert producer.acked == ["g1", "n1", "b1", "g2"]  # in WeCom order, none dropped
    assert result.produced == 4
    assert await CursorStore(aredis).get(KF) == "1"
    assert metrics.counter("qywx_sync_invalid_messages_total", "").value() == invalid_before + 2


class RejectsEveryCursor:
    """A WeCom that answers a pull without a cursor and rejects every cursor it issued."""

    def __init__(self) -> None:
        self.cursors: list[str] = []

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> FakePage:
        self.cursors.append(cursor)
        if cursor:
            return FakePage(errcode=ErrCode.INVALID_PARAM, errmsg="invalid cursor")
        msg = {"msgid": f"r{len(self.cursors)}", "external_userid": "u", "msgtype": "text"}
        return FakePage(next_cursor="issued", has_more=True, msg_list=[msg])


async def test_a_wecom_that_keeps_rejecting_restarts_once_per_pull_then_backs_off(
    aredis,
) -> None:
    locks = LockManager(aredis, ttl_s=5, extend_every_s=1)
    lease = await locks.acquire(f"sync:{KF}")
    assert lease is not None
    assert await CursorStore(aredis).commit_cursor(KF, "stored", lease)
    await locks.release(lease)
    source = RejectsEveryCursor()
    syncer = make_syncer(aredis, source, FakeProducer())
    with pytest.raises(WeComError):
        await asyncio.wait_for(syncer.pull_once(), 10)
    assert source.cursors == ["stored", "", "issued"]
