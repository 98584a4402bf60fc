"""Messages ingest flagged `invalid` are dead-lettered as permanent `invalid_message`,
counted, and never handed to the business handler (the consume side of the flag)."""

from __future__ import annotations

from typing import Any

import pytest

from qywx_ray.consume.handlers import (
    INVALID_REFUSED,
    HandlerContext,
    PermanentError,
    classify,
    run_handler,
)
from qywx_ray.envelope import ingest_envelope
from qywx_ray.obs.logging import get_logger


def ctx_for(msg: dict[str, Any]) -> HandlerContext:
    env = ingest_envelope(msg, ingest_ts_ms=1)
    assert env is not None
    return HandlerContext(
        user_id=env.external_userid,
        open_kfid=env.open_kfid,
        message_id=env.message_id,
        envelope=env,
        attempt=0,
        log=get_logger("test"),
        redis=None,
        wecom=None,
        options={},
    )


GOOD = {"msgid": "m1", "open_kfid": "wk", "external_userid": "u", "msgtype": "text", "origin": 3}


@pytest.mark.parametrize(
    "bad",
    [{"origin": None}, {"send_time": "1700000000.5"}],
    ids=["origin-null", "send_time-float-text"],
)
async def test_an_invalid_message_is_refused_before_the_handler(bad: dict[str, Any]) -> None:
    calls: list[Any] = []

    async def handler(message: Any, ctx: HandlerContext) -> None:
        calls.append(message)

    ctx = ctx_for({**GOOD, **bad})
    assert ctx.envelope.invalid  # ingest kept it, flagged
    before = INVALID_REFUSED.value()
    with pytest.raises(PermanentError) as info:
        await run_handler(handler, ctx.envelope, ctx)
    assert calls == []
    assert INVALID_REFUSED.value() == before + 1
    assert classify(info.value) == ("invalid_message", False)  # dead letter, not retried


async def test_a_valid_message_reaches_the_handler() -> None:
    calls: list[Any] = []

    def handler(message: Any, ctx: HandlerContext) -> None:  # sync: the fallback pool
        calls.append(ctx.message_id)

    ctx = ctx_for(GOOD)
    assert not ctx.envelope.invalid
    before = INVALID_REFUSED.value()
    await run_handler(handler, ctx.envelope, ctx)
    assert calls == ["m1"]
    assert INVALID_REFUSED.value() == before
