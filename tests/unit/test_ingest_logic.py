"""Pure ingest logic: breaker state machine, token validity, grouping, batch results."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from qywx_ray.envelope import Envelope
from qywx_ray.ingest.breaker import BreakerState, ProducerBreaker
from qywx_ray.ingest.producer import BatchResult, Delivery, ProduceError
from qywx_ray.ingest.settings import IngestSettings
from qywx_ray.ingest.spool import group_by_user
from qywx_ray.ingest.syncer import KfSyncer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def env(msgid: str, user: str) -> Envelope:
    return Envelope.from_wecom(
        {"msgid": msgid, "external_userid": user, "open_kfid": "kf", "msgtype": "text"}
    )


def test_breaker_opens_after_consecutive_failures_and_half_opens_after_cooldown() -> None:
    clock = Clock()
    b = ProducerBreaker(failure_threshold=10, cooldown_s=5, clock=clock)
    b.record(0, 6)
    assert b.allow()
    assert b.state is BreakerState.CLOSED
    b.record(3, 1)  # any success resets the run of failures
    b.record(0, 9)
    assert b.state is BreakerState.CLOSED
    b.record(0, 1)
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # one trial ...
    assert not b.allow()  # ... only one
    b.record(0, 1)  # the trial failed: open again for a full cooldown
    assert b.state is BreakerState.OPEN
    clock.now += 5.1
    assert b.allow()
    b.record(1, 0)
    assert b.state is BreakerState.CLOSED
    assert b.allow()
    assert b.allow()


def test_breaker_trial_that_never_reports_does_not_block_forever() -> None:
    clock = Clock()
    b = ProducerBreaker(failure_threshold=1, cooldown_s=2, clock=clock)
    b.record(0, 1)
    clock.now += 2
    assert b.allow()
    assert not b.allow()
    clock.now += 2
    assert b.allow()


def test_breaker_rejects_a_zero_threshold() -> None:
    with pytest.raises(ValueError, match="failure_threshold must be >= 1"):
        ProducerBreaker(failure_threshold=0)


def test_group_by_user_keeps_order_within_and_across_users() -> None:
    envs = [env("1", "b"), env("2", "a"), env("3", "b"), env("4", "c"), env("5", "a")]
    groups = group_by_user(envs)
    assert list(groups) == ["b", "a", "c"]
    assert [e.message_id for e in groups["b"]] == ["1", "3"]
    assert [e.message_id for e in groups["a"]] == ["2", "5"]


def test_batch_result_views() -> None:
    a, b, c = env("1", "u"), env("2", "u"), env("3", "v")
    err = ProduceError("boom")
    result = BatchResult([Delivery(a, None, 0, 1), Delivery(b, err), Delivery(c, None, 1, 7)])
    assert not result.ok
    assert len(result) == 3
    assert result.acked == [a, c]
    assert [d.envelope for d in result.failed] == [b]
    assert BatchResult([]).ok


def bare_syncer(settings: IngestSettings, clock: Callable[[], float] | None = None) -> KfSyncer:
    """A syncer without its stores: for its own bookkeeping and loop, no pull."""
    return KfSyncer(
        "kf",
        source=None,  # type: ignore[arg-type]
        producer=None,  # type: ignore[arg-type]
        locks=None,  # type: ignore[arg-type]
        cursors=None,  # type: ignore[arg-type]
        spool=None,  # type: ignore[arg-type]
        settings=settings,
        clock=clock or time.monotonic,
    )


async def test_callback_token_is_used_only_while_valid_and_requests_coalesce() -> None:
    clock = Clock()
    syncer = bare_syncer(IngestSettings(callback_token_valid_s=540), clock=clock)
    assert syncer.current_token() == ""
    assert not syncer.pull_requested
    for _ in range(100):
        syncer.request_pull("t1")
    assert syncer.pull_requested
    assert syncer.current_token() == "t1"
    syncer.request_pull(None)  # a sweep keeps the last token
    assert syncer.current_token() == "t1"
    clock.now += 539
    assert syncer.current_token() == "t1"
    clock.now += 2
    assert syncer.current_token() == ""
    syncer.request_pull("t2")
    assert syncer.current_token() == "t2"
    await asyncio.sleep(0)


async def test_a_cancel_that_meets_a_pull_request_ends_the_syncer_loop() -> None:
    """Python 3.11's `asyncio.wait_for` dropped a cancel when its inner wait had already
    finished: a pull request (the wake event) set in the same loop turn as the host's
    cancel made the loop pull again and wait on, instead of ending. Our own waits use
    `asyncio.timeout`, which runs the wait in the task itself and delivers the cancel."""
    from types import SimpleNamespace

    syncer = bare_syncer(IngestSettings())
    pulls = 0

    async def pull_once() -> SimpleNamespace:
        nonlocal pulls
        pulls += 1
        return SimpleNamespace(status="ok")

    syncer.pull_once = pull_once  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(syncer.run())
    for _ in range(5):
        await asyncio.sleep(0)
    assert pulls == 1  # the catch-up pull; now waiting for a request or the sweep
    syncer.request_pull("t")
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the cancel was swallowed: the loop is still running"
    assert task.cancelled()
    assert pulls == 1


def test_the_package_has_no_asyncio_wait_for() -> None:
    """See the test above: one lost cancel can hang a shutdown. A new use of
    `asyncio.wait_for` in the package fails here; use `asyncio.timeout`."""
    import ast
    from pathlib import Path

    import qywx_ray

    root = Path(qywx_ray.__file__).parent
    uses = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            named = (
                isinstance(node, ast.Attribute)
                and node.attr == "wait_for"
                and isinstance(node.value, ast.Name)
                and node.value.id == "asyncio"
            ) or (
                isinstance(node, ast.ImportFrom)
                and node.module == "asyncio"
                and any(a.name == "wait_for" for a in node.names)
            )
            if named:
                uses.append(f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}")
    assert uses == []


def test_message_id_is_the_wecom_msgid_on_every_pull() -> None:
    msg = {"msgid": "MSG-1", "external_userid": "u", "open_kfid": "kf", "msgtype": "text"}
    assert Envelope.from_wecom(msg).message_id == Envelope.from_wecom(dict(msg)).message_id


def test_a_wecom_message_with_a_msgid_is_enveloped_even_when_malformed() -> None:
    """Issue 19 item 5: `"origin": null` raised TypeError (not EnvelopeError), failing
    every pull of the page; a bad number raised EnvelopeError and the message was dropped
    while the cursor moved past it. A message with a msgid is never dropped: it is
    enveloped as pulled, flagged with what is wrong."""
    from qywx_ray.envelope import ingest_envelope

    base = {"msgid": "m1", "external_userid": "u", "open_kfid": "kf", "msgtype": "text"}
    ok = ingest_envelope({**base, "origin": 3, "send_time": 1_700_000_000})
    assert ok is not None
    assert ok.invalid == ""
    assert ok.origin == 3
    assert ("invalid", b"1") not in ok.headers()

    for bad in ({"origin": None}, {"send_time": "1700000000.5"}, {"origin": [3]}):
        msg = {**base, **bad}
        env = ingest_envelope(msg)
        assert env is not None
        assert env.message_id == "m1"
        assert env.raw == msg
        assert env.invalid, bad  # says what is wrong
        assert ("invalid", b"1") in env.headers()
        assert Envelope.from_bytes(env.to_bytes()) == env  # survives Kafka and the spool

    assert ingest_envelope({**base, "msgid": ""}) is None  # no msgid: cannot be addressed
    assert ingest_envelope({"msgtype": "text"}) is None
    assert ingest_envelope(None) is None  # type: ignore[arg-type]


def test_failing_users_go_last_and_a_success_clears_them() -> None:
    from qywx_ray.ingest.spool import FailingUsers, RoundOutcome, keep_going_after

    f = FailingUsers(max_tracked=3)
    f.failed("a")
    f.failed("a")
    f.failed("c")
    assert f.order(["a", "b", "c", "d"]) == ["b", "d", "c", "a"]  # fewest failures first
    f.succeeded("a")
    assert f.order(["a", "b", "c"]) == ["a", "b", "c"]
    f.failed("x")
    f.failed("y")
    f.failed("z")  # beyond max_tracked: not tracked, memory stays bounded
    assert "z" not in f
    assert len(f) == 3
    f.forget_except(["x"])
    assert len(f) == 1
    assert "x" in f

    assert keep_going_after(RoundOutcome(produced=5, failed=0))
    assert keep_going_after(RoundOutcome(produced=5, failed=1))  # one user's problem
    assert not keep_going_after(RoundOutcome(produced=0, failed=3))  # Kafka's problem
