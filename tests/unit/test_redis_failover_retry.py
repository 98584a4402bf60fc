"""Riding a Redis failover: which errors are transient, the time-bounded client retry, and
a handler's Redis outage retried in place by the host instead of dead-lettered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qywx_ray.consume.handlers import HandlerContext, is_infra_error
from qywx_ray.errors import InfraError
from qywx_ray.store.client import AsyncFailoverRetry, FailoverRetry, is_transient_redis_error
from tests.helpers.host_fakes import Letters, delivery, make_core, until

NOREPLICAS = "NOREPLICAS Not enough good replicas to write."


@pytest.mark.parametrize(
    "exc",
    [
        RedisConnectionError("The previous master is now a slave"),
        RedisTimeoutError("Timeout reading from socket"),
        ReadOnlyError("You can't write against a read only replica."),
        ResponseError(NOREPLICAS),
        ResponseError(NOREPLICAS + " script: 4b2c, on @user_script:2."),
    ],
)
def test_failover_errors_are_transient(exc: Exception) -> None:
    assert is_transient_redis_error(exc)
    assert is_infra_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ResponseError("ERR Error running script: attempt to compare nil with number"),
        ValueError("bad"),
    ],
)
def test_command_errors_are_not_transient(exc: Exception) -> None:
    assert not is_transient_redis_error(exc)


def test_infra_error_is_infra() -> None:
    assert is_infra_error(InfraError("redis down"))


class Flaky:
    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls = 0
        self.failed: list[Exception] = []

    def do(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    def fail(self, error: Exception) -> None:
        self.failed.append(error)


def test_retry_rides_transient_errors_then_succeeds() -> None:
    flaky = Flaky([RedisConnectionError("x"), ResponseError(NOREPLICAS), ReadOnlyError("ro")])
    retry = FailoverRetry(budget_s=5.0, base_s=0.001, cap_s=0.01)
    assert retry.call_with_retry(flaky.do, flaky.fail) == "ok"
    assert flaky.calls == 4
    assert len(flaky.failed) == 3


class FakeTime:
    """The store client's clock: sleeping moves it, so the test sees what it decided."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retry_gives_up_at_its_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from qywx_ray.store import client as store_client

    fake = FakeTime()
    monkeypatch.setattr(store_client, "time", fake)
    flaky = Flaky([RedisConnectionError("down")] * 10_000)
    retry = FailoverRetry(budget_s=0.3, base_s=0.01, cap_s=0.05)
    with pytest.raises(RedisConnectionError):
        retry.call_with_retry(flaky.do, flaky.fail)
    # It waited exactly its budget (the last pause cut to what was left), never past it,
    # each pause within the backoff cap, then gave up after one more attempt.
    assert sum(fake.sleeps) == pytest.approx(0.3)
    assert all(0 < s <= 0.05 for s in fake.sleeps)
    assert flaky.calls == len(fake.sleeps) + 1
    assert flaky.calls > 3


def test_retry_never_repeats_a_command_error() -> None:
    flaky = Flaky([ResponseError("WRONGTYPE nope")])
    retry = FailoverRetry(budget_s=5.0, base_s=0.001, cap_s=0.01)
    with pytest.raises(ResponseError):
        retry.call_with_retry(flaky.do, flaky.fail)
    assert flaky.calls == 1
    assert flaky.failed == []


async def test_async_retry_rides_transient_errors() -> None:
    errors: list[Exception] = [ResponseError(NOREPLICAS), RedisConnectionError("x")]
    failed: list[Exception] = []

    async def do() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    async def fail(error: Exception) -> None:
        failed.append(error)

    retry = AsyncFailoverRetry(budget_s=5.0, base_s=0.001, cap_s=0.01)
    assert await retry.call_with_retry(do, fail) == "ok"
    assert len(failed) == 2


def test_retry_takes_redis_pys_options_as_redis_py_passes_them() -> None:
    """redis-py calls `call_with_retry(do, fail, is_retryable=..., with_failure_count=...)`
    (asyncio/cluster.py, connection.py); both pass through to the shared bookkeeping."""
    counted: list[tuple[Any, ...]] = []
    flaky = Flaky([RedisConnectionError("x"), RedisConnectionError("y")])
    retry = FailoverRetry(budget_s=5.0, base_s=0.001, cap_s=0.01)
    out = retry.call_with_retry(
        flaky.do, lambda *a: counted.append(a), is_retryable=None, with_failure_count=True
    )
    assert out == "ok"
    assert [n for _, n in counted] == [1, 2]
    refused = Flaky([RedisConnectionError("x")])
    with pytest.raises(RedisConnectionError):
        retry.call_with_retry(refused.do, refused.fail, is_retryable=lambda e: False)
    assert (refused.calls, refused.failed) == (1, [])


async def test_async_retry_takes_redis_pys_options() -> None:
    errors: list[Exception] = [RedisConnectionError("x")]
    counted: list[tuple[Any, ...]] = []

    async def do() -> str:
        if errors:
            raise errors.pop(0)
        return "ok"

    async def fail(*args: Any) -> None:
        counted.append(args)

    retry = AsyncFailoverRetry(budget_s=5.0, base_s=0.001, cap_s=0.01)
    assert await retry.call_with_retry(do, fail, with_failure_count=True) == "ok"
    assert [n for _, n in counted] == [1]


# ---------------------------------------------------------------- the host's handler path


def _flaky_handler(failures: dict[str, int]) -> Any:
    async def handler(message: Any, ctx: HandlerContext) -> None:
        left = failures.get(ctx.message_id, 0)
        if left:
            failures[ctx.message_id] = left - 1
            raise RedisConnectionError("The previous master is now a slave")
        ctx.options["calls"].append((ctx.user_id, ctx.message_id))

    return handler


async def test_handler_redis_outage_is_retried_in_place_in_order() -> None:
    letters = Letters()
    core, done, opts = make_core(letters=letters, redis_retry_max_s=0.02)
    core.handler = _flaky_handler({"A-m0": 3})
    core.accept([delivery("A", i, i) for i in range(3)])
    await until(lambda: len(done.done) == 3)
    assert letters.letters == []  # not dead-lettered, not parked behind a DLQ backoff
    assert opts["calls"] == [("A", "A-m0"), ("A", "A-m1"), ("A", "A-m2")]


async def test_completion_waits_while_the_handler_retries() -> None:
    core, done, opts = make_core(redis_retry_max_s=0.02)
    core.handler = _flaky_handler({"A-m0": 1_000_000})
    core.accept([delivery("A", 0, 0)])
    await asyncio.sleep(0.2)
    assert done.done == []
    assert opts["calls"] == []


async def test_handler_outage_longer_than_the_bound_becomes_a_dead_letter() -> None:
    letters = Letters()
    core, done, _ = make_core(letters=letters, handler_infra_retry_s=0.0)
    core.handler = _flaky_handler({"A-m0": 1_000_000})
    core.accept([delivery("A", 0, 0)])
    await until(lambda: len(done.done) == 1)
    assert [(x.reason, x.retryable) for x in letters.letters] == [("downstream_error", True)]


async def test_a_handler_timeout_is_never_retried_in_place() -> None:
    """TimeoutError is also what a socket timeout raises (an infra error for our Redis),
    but a handler past its deadline is a failure with its own reason, at once."""
    letters = Letters()
    core, done, _ = make_core(
        letters=letters, handler_timeout_s=0.05, handler_infra_retry_s=60.0, redis_retry_max_s=0.02
    )
    runs: list[str] = []

    async def slow(message: Any, ctx: HandlerContext) -> None:
        runs.append(ctx.message_id)
        await asyncio.sleep(10)

    core.handler = slow
    core.accept([delivery("A", 0, 0)])
    await until(lambda: len(done.done) == 1)
    assert runs == ["A-m0"]  # one run: not retried in place for 60 s
    assert [x.reason for x in letters.letters] == ["process_timeout"]
