"""Synchronous handlers run in their own bounded pool; hung threads end the host loudly.

A timed-out sync handler keeps its thread (Python cannot stop a thread). Before, such
threads piled up in the loop's default executor, which the dead-letter producer shares:
once it was full, dead-letter writes queued forever while the host still answered its
health probe. These tests block handlers on a threading.Event (released at the end), and
jam the default executor to prove the dead-letter path no longer depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from qywx_ray.consume.dedup import Deduplicator, MemoryDoneStore
from qywx_ray.consume.handler_threads import HUNG_THREADS, HandlerThreads
from qywx_ray.consume.handlers import HandlerContext, envelope_handler, run_handler
from qywx_ray.consume.user_actor import CoreOptions, HostCore
from qywx_ray.dlq.message import DeadLetterMessage, make_dead_letter
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings
from tests.helpers.host_fakes import Completions, Letters, delivery, until

WAIT_S = 10.0  # bounded waits only: nothing here waits this long unless it is broken


@contextlib.contextmanager
def jammed_default_executor(loop: asyncio.AbstractEventLoop) -> Iterator[threading.Event]:
    """The loop's default executor with its only thread blocked until the event is set."""
    release = threading.Event()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jammed-default")
    loop.set_default_executor(executor)
    executor.submit(release.wait)
    try:
        yield release
    finally:
        release.set()
        executor.shutdown(wait=True)


def dead_letters(n: int) -> list[DeadLetterMessage]:
    return [
        make_dead_letter(
            reason=FailureReason.DOWNSTREAM_ERROR,
            failure_time=1_700_000_000.0,
            settings=DLQSettings(),
            message_id=f"m{i}",
            user_id="u1",
        )
        for i in range(n)
    ]


def blocking_handler(gate: threading.Event, started: threading.Semaphore) -> Any:
    def handler(message: Any, ctx: Any) -> None:
        started.release()
        gate.wait()

    return handler


async def test_a_sync_handler_does_not_need_the_default_executor() -> None:
    calls: list[str] = []

    def handler(message: Any, ctx: Any) -> None:
        calls.append(str(message))

    with jammed_default_executor(asyncio.get_running_loop()):
        await asyncio.wait_for(run_handler(handler, "m1", None), WAIT_S)  # type: ignore[arg-type]
    assert calls == ["m1"]


async def test_abandoned_threads_are_counted_and_exhaustion_is_reported(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()
    started = threading.Semaphore(0)
    exhausted: list[int] = []
    threads = HandlerThreads(2, name="h-test", on_exhausted=exhausted.append)
    handler = threads.wrap(blocking_handler(gate, started))
    caplog.set_level(logging.ERROR, logger="qywx_ray")
    try:
        first = asyncio.ensure_future(handler("a", None))  # type: ignore[arg-type]
        assert await asyncio.to_thread(started.acquire, True, WAIT_S)
        first.cancel()  # what the host's handler timeout does
        with pytest.raises(asyncio.CancelledError):
            await first
        assert threads.hung == 1
        assert not threads.exhausted
        assert exhausted == []
        assert HUNG_THREADS.value(host="h-test") == 1

        # A job still queued behind busy threads is dropped, not counted as hung.
        second = asyncio.ensure_future(handler("b", None))  # type: ignore[arg-type]
        assert await asyncio.to_thread(started.acquire, True, WAIT_S)
        third = asyncio.ensure_future(handler("c", None))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # let it submit
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        assert threads.hung == 1

        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert threads.hung == 2
        assert threads.exhausted
        assert exhausted == [2]  # once, when the last thread hung
        assert HUNG_THREADS.value(host="h-test") == 2
        events = [r.getMessage() for r in caplog.records]
        assert "handler.threads_exhausted" in events
        assert events.count("handler.thread_hung") == 2
    finally:
        gate.set()
        threads.shutdown(wait=True)
    assert threads.hung == 0
    assert not threads.exhausted
    assert HUNG_THREADS.value(host="h-test") == 0


async def test_wrap_keeps_async_handlers_and_the_envelope_marker() -> None:
    threads = HandlerThreads(1, name="h-wrap")

    async def coro_handler(message: Any, ctx: HandlerContext) -> None:
        return None

    @envelope_handler  # type: ignore[type-var]  # returns a value: wrap must pass it on
    def sync_handler(message: Any, ctx: HandlerContext) -> str:
        return f"got {message}"

    try:
        assert threads.wrap(coro_handler) is coro_handler
        wrapped = threads.wrap(sync_handler)  # type: ignore[arg-type]
        assert wrapped.__qywx_message__ == "envelope"  # type: ignore[attr-defined]
        assert asyncio.iscoroutinefunction(wrapped)
        assert await wrapped("x", None) == "got x"  # type: ignore[arg-type,func-returns-value]
    finally:
        threads.shutdown(wait=True)


async def test_host_core_timeouts_exhaust_the_pool_and_dead_letters_still_flow() -> None:
    """The defect end to end inside one host: hung handlers must not stop dead letters,
    and once they hold every thread the host is told to end itself."""
    gate = threading.Event()
    started = threading.Semaphore(0)
    exhausted = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_exhausted(hung: int) -> None:
        loop.call_soon_threadsafe(exhausted.set)

    threads = HandlerThreads(2, name="h-core", on_exhausted=on_exhausted)
    letters = Letters()
    completions = Completions()
    core = HostCore(
        name="h-core",
        handler=threads.wrap(blocking_handler(gate, started)),
        dedup=Deduplicator(MemoryDoneStore(), policy="stop", retry_max_s=0.05),
        completions=completions,
        dead_letters=letters,
        options=CoreOptions(completion_flush_ms=1.0, handler_timeout_s=0.05),
    )
    try:
        with jammed_default_executor(loop):
            core.accept([delivery("A", 0, 0), delivery("B", 0, 1)])
            await asyncio.wait_for(exhausted.wait(), WAIT_S)
            assert threads.hung == 2
            # Both timed out and were dead-lettered although every handler thread is stuck.
            await until(lambda: len(completions.done) == 2, WAIT_S)
            assert sorted(lt.reason for lt in letters.letters) == ["process_timeout"] * 2
    finally:
        gate.set()
        threads.shutdown(wait=True)


async def test_dlq_producer_sends_without_the_default_executor(tmp_path: Path) -> None:
    """Breaker open: the letters go to the emergency file, from the producer's own threads."""
    from qywx_ray.dlq.producer import DLQProducer

    settings = Settings(
        data_dir=str(tmp_path),
        kafka={"bootstrap_servers": "127.0.0.1:1"},  # type: ignore[arg-type]
        dlq={"breaker_failure_threshold": 1},  # type: ignore[arg-type]
    )
    producer = DLQProducer(settings)
    producer.breaker.on_failure()  # open: no Kafka attempt
    try:
        with jammed_default_executor(asyncio.get_running_loop()):
            await asyncio.wait_for(producer.send_many(dead_letters(3)), WAIT_S)
    finally:
        producer.close(timeout_s=0.1)
    assert len(list(settings.dlq_emergency_dir.glob("dlq_emergency_*.jsonl"))) == 1


async def test_json_sink_sends_without_the_default_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from qywx_ray.consume.types import DeadLetter
    from qywx_ray.testing import sinks

    sent: list[int] = []
    monkeypatch.setattr(
        sinks.KafkaDeadLetterSink, "_send_blocking", lambda self, letters: sent.append(len(letters))
    )
    sink = sinks.KafkaDeadLetterSink(
        Settings(kafka={"bootstrap_servers": "127.0.0.1:1"})  # type: ignore[arg-type]
    )
    letter = DeadLetter("downstream_error", "x", "m1", "u1", "kf", "t", 0, 0, 0, b"{}")
    with jammed_default_executor(asyncio.get_running_loop()):
        await asyncio.wait_for(sink.dead_letter([letter]), WAIT_S)
    assert sent == [1]
