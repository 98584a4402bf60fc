"""qywx_ray.retry: the one retry policy (tenacity under a fast path)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from qywx_ray.retry import capped_exponential, retry_async, retry_sync, spread


class Flaky:
    """Fails with `errors` in order, then returns "ok"; counts calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def call_async(self) -> str:
        return self()


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.retries: list[tuple[str, int, float]] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)

    async def sleep_async(self, s: float) -> None:
        self.sleeps.append(s)

    def on_retry(self, exc: BaseException, attempt: int, delay: float) -> None:
        self.retries.append((type(exc).__name__, attempt, delay))


def run(flaky: Flaky, rec: Recorder, *, is_async: bool, **kw: object) -> str:
    wait = capped_exponential(0.05, 0.15)
    if is_async:
        import asyncio

        return asyncio.run(
            retry_async(
                flaky.call_async,
                retry_on=(OSError,),
                wait=wait,
                on_retry=rec.on_retry,
                sleep=rec.sleep_async,
                **kw,  # type: ignore[arg-type]
            )
        )
    return retry_sync(
        flaky,
        retry_on=(OSError,),
        wait=wait,
        on_retry=rec.on_retry,
        sleep=rec.sleep,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("is_async", [False, True])
def test_first_success_costs_one_call_and_no_sleep(is_async: bool) -> None:
    flaky, rec = Flaky(), Recorder()
    assert run(flaky, rec, is_async=is_async) == "ok"
    assert (flaky.calls, rec.sleeps, rec.retries) == (1, [], [])


@pytest.mark.parametrize("is_async", [False, True])
def test_transient_errors_back_off_exponentially_capped_then_succeed(is_async: bool) -> None:
    flaky, rec = Flaky(*(OSError("down") for _ in range(4))), Recorder()
    assert run(flaky, rec, is_async=is_async) == "ok"
    assert flaky.calls == 5
    assert rec.sleeps == [0.05, 0.1, 0.15, 0.15]
    assert rec.retries == [
        ("OSError", 1, 0.05),
        ("OSError", 2, 0.1),
        ("OSError", 3, 0.15),
        ("OSError", 4, 0.15),
    ]


@pytest.mark.parametrize("is_async", [False, True])
def test_other_errors_propagate_at_once(is_async: bool) -> None:
    flaky, rec = Flaky(OSError("down"), KeyError("bug")), Recorder()
    with pytest.raises(KeyError, match="bug"):
        run(flaky, rec, is_async=is_async)
    assert (flaky.calls, rec.sleeps) == (2, [0.05])


@pytest.mark.parametrize("is_async", [False, True])
def test_gives_up_after_attempts_with_the_last_error(is_async: bool) -> None:
    flaky, rec = Flaky(OSError("a"), OSError("b"), OSError("c"), OSError("d")), Recorder()
    with pytest.raises(OSError, match="c"):
        run(flaky, rec, is_async=is_async, attempts=3)
    assert (flaky.calls, rec.sleeps) == (3, [0.05, 0.1])


@pytest.mark.parametrize("is_async", [False, True])
def test_gives_up_once_until_holds(is_async: bool) -> None:
    flaky, rec = Flaky(*(OSError(str(i)) for i in range(10))), Recorder()
    until: Callable[[], bool] = lambda: len(rec.sleeps) >= 2  # noqa: E731 - a clock stand-in
    with pytest.raises(OSError, match="2"):
        run(flaky, rec, is_async=is_async, until=until)
    assert flaky.calls == 3


def test_a_predicate_decides_what_is_retried() -> None:
    flaky, rec = Flaky(OSError("transient"), OSError("fatal")), Recorder()
    with pytest.raises(OSError, match="fatal"):
        retry_sync(
            flaky,
            retry_on=lambda exc: "transient" in str(exc),
            wait=capped_exponential(0.05, 1.0),
            sleep=rec.sleep,
        )
    assert (flaky.calls, rec.sleeps) == (2, [0.05])


def test_jitter_spreads_each_delay_within_its_factor() -> None:
    factor = spread(1.0, 2.0, random.Random(7))
    flaky, rec = Flaky(*(OSError() for _ in range(50))), Recorder()
    retry_sync(
        flaky,
        retry_on=(OSError,),
        wait=capped_exponential(0.05, 0.05, jitter=factor),
        sleep=rec.sleep,
    )
    assert all(0.05 <= s < 0.1 for s in rec.sleeps)
    assert len(set(rec.sleeps)) > 40  # actually spread


def test_a_first_call_that_fails_for_good_costs_no_sleep() -> None:
    flaky, rec = Flaky(KeyError("bug")), Recorder()
    with pytest.raises(KeyError, match="bug"):
        run(flaky, rec, is_async=False)
    assert (flaky.calls, rec.sleeps, rec.retries) == (1, [], [])


def test_attempts_and_until_together_stop_at_the_first_that_holds() -> None:
    flaky, rec = Flaky(*(OSError(str(i)) for i in range(10))), Recorder()
    with pytest.raises(OSError, match="1"):
        run(flaky, rec, is_async=False, attempts=2, until=lambda: False)
    assert flaky.calls == 2
    flaky, rec = Flaky(*(OSError(str(i)) for i in range(10))), Recorder()
    with pytest.raises(OSError, match="0"):
        run(flaky, rec, is_async=False, attempts=5, until=lambda: True)
    assert flaky.calls == 1


def test_a_cancellation_is_never_retried_even_by_a_loose_predicate() -> None:
    import asyncio

    flaky, rec = Flaky(asyncio.CancelledError()), Recorder()
    with pytest.raises(asyncio.CancelledError):
        retry_sync(
            flaky, retry_on=lambda exc: True, wait=capped_exponential(0.05, 1.0), sleep=rec.sleep
        )
    assert (flaky.calls, rec.sleeps) == (1, [])
