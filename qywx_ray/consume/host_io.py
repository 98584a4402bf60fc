"""HostCore's calls to the outside world, each with its failure policy (no mailbox state).

The mailbox machine (mailbox_machine.py) decides; HostCore (user_actor.py) awaits these.
What each must never do:
- the batch read (done-flags, parking flags and the rate limiter in one call: see
  `batch_read`) under policy `stop` retries like each of the calls it replaces; under
  `process` a failed batch read falls back to those separate calls, each with its own
  policy, so each part behaves as it did without it;
- protection (rate limit, the lot's admit) under policy `stop` never admits past a
  Redis outage: it retries with backoff, so the batch waits and nothing commits; under
  `process` it admits unchecked and says so (`bypassed`);
- an order-critical write (park, hold, advance, drain token) is retried until it
  succeeds whatever the policy, with the same op id, so a resend is applied once;
- a dead letter is retried until it is durable: nothing completes before;
- only infrastructure errors are retried by protection: any other error is a bug, and
  retrying a call that may have recorded state would count the batch twice;
- a handler that fails because our Redis is down is retried in place for a while (the
  user's next message waits, nothing commits past it) before it becomes a dead letter.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from qywx_ray.consume.batch_reads import BatchAnswer, BatchReads
from qywx_ray.consume.deadlines import HandlerDeadlines
from qywx_ray.consume.handlers import (
    Handler,
    HandlerContext,
    classify,
    is_infra_error,
    run_handler,
    typed_message,
)
from qywx_ray.consume.host_rules import BatchReadPlan
from qywx_ray.consume.mailbox import Pending
from qywx_ray.consume.types import (
    ADMITTED,
    REASON_TIMEOUT,
    RETRYABLE_REASONS,
    WAITED_ON,
    Admission,
    DeadLetter,
    DeadLetterSink,
    Delivery,
    RetryOrder,
)
from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter
from qywx_ray.retry import capped_exponential, retry_async, spread

log = get_logger(__name__)

# Store unreachable (the limiter wraps RedisError in InfraError; parking raises RedisError).
INFRA_ERRORS = (InfraError, RedisError, OSError, TimeoutError)

m_bypassed = counter(
    "qywx_admission_bypassed_total", "Messages admitted unchecked: Redis down, policy process"
)
m_handler_infra_retries = counter(
    "qywx_handler_infra_retries_total", "Handler runs retried in place: our Redis unreachable"
)

# (what, call, n) -> the call's answer, or None when bypassed (policy process)
PolicyCall = Callable[[str, Callable[[], Awaitable[Any]], int], Awaitable[Any]]


def op_id() -> str:
    """Idempotency key of one parking write, reused by its retries: a retry after a lost
    reply or a timeout (the write may have happened) must not drop or push twice."""
    return uuid.uuid4().hex


async def with_policy(
    what: str,
    call: Callable[[], Awaitable[Any]],
    n: int,
    *,
    policy: str,
    retry_max_s: float,
    bypassed: Callable[[int], None],
) -> Any:
    """Redis-backed protection: policy stop retries with backoff (the batch waits, so
    nothing completes and commits do not advance); policy process admits, reports
    `bypassed(n)` and returns None. Only infrastructure errors are retried: any other
    error propagates (crash-only: the host restarts)."""
    if policy == "process":
        try:
            return await call()
        except INFRA_ERRORS as exc:
            bypassed(n)
            m_bypassed.inc(n)
            log.warning("host.admission_bypassed", what=what, n=n, error=str(exc))
            return None

    def on_retry(exc: BaseException, _attempt: int, delay_s: float) -> None:
        log.warning("host.admission_retry", what=what, delay_s=delay_s, error=str(exc))

    return await retry_async(
        call, retry_on=INFRA_ERRORS, wait=capped_exponential(0.05, retry_max_s), on_retry=on_retry
    )


async def batch_read(
    reads: BatchReads,
    plan: BatchReadPlan,
    *,
    policy: str,
    retry_max_s: float,
    unreachable: Callable[[], None] = lambda: None,
) -> BatchAnswer | None:
    """The batch's one read (consume/batch_reads.py). Policy stop: retried with backoff,
    as each of the separate calls it replaces would be. Policy process: None at the
    first infrastructure error, and the caller makes the separate calls, each under its
    own policy (dedup, rate limit, parking: each bypassed on its own), so every part
    behaves as without the batch read, at the cost of one more failing call per batch
    during an outage. A lost reply after the script ran means its rate-limit counts
    were recorded; the separate limiter call then counts those messages again (as a
    policy-stop retry of a lost limiter reply always did). `unreachable` is told of
    every failed attempt (the dedup's `redis_ok`, which the host reports)."""
    if policy == "process":
        try:
            return await reads.read(plan)
        except INFRA_ERRORS as exc:
            unreachable()
            log.warning("host.batch_read_failed", error=str(exc))
            return None

    def on_retry(exc: BaseException, _attempt: int, delay_s: float) -> None:
        unreachable()  # the host's health report says so while we wait
        log.warning("host.batch_read_retry", delay_s=delay_s, error=str(exc))

    return await retry_async(
        lambda: reads.read(plan),
        retry_on=INFRA_ERRORS,
        wait=capped_exponential(0.05, retry_max_s),
        on_retry=on_retry,
    )


async def retry_durable(
    what: str,
    call: Callable[[], Awaitable[Any]],
    retry_max_s: float,
    errors: tuple[type[BaseException], ...] = INFRA_ERRORS,
) -> Any:
    """Order-critical writes (parking lot, drain tokens): retried until they succeed,
    whatever the policy; each carries its op id, so a resend is applied once."""

    def on_retry(exc: BaseException, _attempt: int, delay_s: float) -> None:
        log.warning("host.write_retry", what=what, delay_s=delay_s, error=str(exc))

    return await retry_async(
        call, retry_on=errors, wait=capped_exponential(0.05, retry_max_s), on_retry=on_retry
    )


async def rate_limit(
    admission: Admission, items: list[Pending], policy: PolicyCall
) -> dict[str, str]:
    """Denial reason by message id (one round trip, each message at its send time);
    policy applies if Redis is down."""
    if not items:
        return {}
    times: dict[str, list[float]] = {}
    for p in items:
        t = p.envelope.send_time or p.delivery.timestamp_ms / 1000.0
        times.setdefault(p.envelope.external_userid, []).append(float(t))
    timed = getattr(admission, "admit_at", None)

    async def ask() -> dict[str, list[str | None]]:
        if timed is not None:
            return await timed(list(times.items()))  # type: ignore[no-any-return]
        return await admission.admit([(u, len(ts)) for u, ts in times.items()])

    decisions = await policy("admission", ask, len(items))
    if decisions is None:
        return {}
    cursor: dict[str, int] = {}
    out: dict[str, str] = {}
    for p in items:
        user = p.envelope.external_userid
        i = cursor.get(user, 0)
        cursor[user] = i + 1
        got = decisions.get(user) or []
        reason = got[i] if i < len(got) else None
        if reason is not None:
            out[p.envelope.message_id] = reason
    return out


async def admit_parking(
    order: RetryOrder | None, items: list[Pending], policy: PolicyCall
) -> list[int]:
    """The lot's admit code per item (PARKED / ADMITTED / WAITED_ON). Bypassed (policy
    process): everything is admitted, but a token still asks the lot itself when it
    runs (WAITED_ON), and a retry drains after it (plan_placement): no user stays
    parked behind a blocker that ran without a drain (tests/unit/test_consume_order_defects.py)."""
    if not items:
        return []
    if order is None:
        return [ADMITTED] * len(items)
    return await _admit(order.admit, items, policy)


async def admit_flagged(
    order: RetryOrder | None, items: list[Pending], flagged: set[str], policy: PolicyCall
) -> list[int]:
    """`admit_parking` after a batch read (consume/batch_reads.py): only the items of
    `flagged` users (parking flag set at the read) go to the lot, a round trip only
    then; the others are ADMITTED, as the lot's own flag read would have answered
    (dlq/parking.py `AsyncParkingLot.admit`). A lot without `admit_flagged` reads the
    flags again itself."""
    codes = [ADMITTED] * len(items)
    at = [i for i, p in enumerate(items) if p.envelope.external_userid in flagged]
    if order is None or not at:
        return codes
    ask = getattr(order, "admit_flagged", None) or order.admit
    answers = await _admit(ask, [items[i] for i in at], policy)
    for i, code in zip(at, answers, strict=True):
        codes[i] = code
    return codes


async def _admit(
    ask: Callable[[list[Any]], Awaitable[list[int]]], items: list[Pending], policy: PolicyCall
) -> list[int]:
    request = [
        (
            p.envelope.external_userid,
            p.envelope.message_id,
            p.delivery.value,
            p.delivery.is_retry or p.skip_handler,
            p.delivery.partition,
            p.delivery.offset,
        )
        for p in items
    ]

    async def call() -> list[int]:
        return await ask(request)

    codes = await policy("parking", call, len(items))
    if codes is None:  # bypassed (policy process): a token still asks the lot itself
        return [WAITED_ON if p.skip_handler else ADMITTED for p in items]
    return codes  # type: ignore[no-any-return]


def dead_letter(d: Delivery, env: Envelope | None, reason: str, error: str) -> DeadLetter:
    """The dead letter of delivery `d` (`env` None: it did not parse)."""
    return DeadLetter(
        reason=reason,
        error=error[:2000],
        message_id=env.message_id if env else (d.msg_id or "{}:{}:{}".format(*d.tpo)),
        user=env.external_userid if env else d.key,
        open_kfid=env.open_kfid if env else "",
        topic=d.topic,
        partition=d.partition,
        offset=d.offset,
        timestamp_ms=d.timestamp_ms,
        value=d.value,
        retryable=reason in RETRYABLE_REASONS,
        attempt=d.retry_count + 1,  # so dlq.max_retries bounds a message's retries
    )


async def durable_dead_letter(
    sink: DeadLetterSink, letters: Sequence[DeadLetter], host: str
) -> None:
    """Retried (jittered backoff) until the sink says durable: never complete a message
    whose letter is not."""

    def on_retry(exc: BaseException, _attempt: int, delay_s: float) -> None:
        log.error("dlq.write_retry", host=host, error=str(exc), delay_s=delay_s)

    async def write() -> None:
        await sink.dead_letter(letters)

    # Exception: a dead letter is retried until durable, whatever failed.
    await retry_async(
        write,
        retry_on=(Exception,),
        wait=capped_exponential(0.05, 5.0, jitter=spread()),
        on_retry=on_retry,
    )


async def run_head(
    handler: Handler,
    typed: bool,
    deadlines: HandlerDeadlines,
    env: Envelope,
    ctx: HandlerContext,
    *,
    clock: Callable[[], float],
    infra_retry_s: float,
    retry_max_s: float,
    fresh_state: Callable[[], Any] | None = None,
) -> tuple[str | None, str]:
    """Run the handler on one head: (None, "") on success, else (reason, error). A
    handler that fails because our Redis is unreachable or failing over is retried in
    place (short backoff, up to `infra_retry_s`): the user's next message waits and
    nothing commits past it, as with policy stop elsewhere; only a longer outage makes
    it a dead letter. `typed`: the handler takes a typed message, else the Envelope.
    `fresh_state`: each attempt gets its own copy of the user's state in `ctx.state`, so
    an attempt that failed half-way leaves nothing behind for the next one."""
    deadline_s = clock() + infra_retry_s

    async def attempt() -> None:
        message = typed_message(env) if typed else env
        if fresh_state is not None:
            ctx.state = fresh_state()
        await deadlines.run(run_handler(handler, message, ctx))

    def in_place(exc: BaseException) -> bool:
        return not isinstance(exc, TimeoutError) and is_infra_error(exc)

    def on_retry(exc: BaseException, _attempt: int, delay_s: float) -> None:
        m_handler_infra_retries.inc()
        error = f"{type(exc).__name__}: {exc}"
        log.warning("handler.infra_retry", message_id=env.message_id, delay_s=delay_s, error=error)

    try:
        await retry_async(
            attempt,
            retry_on=in_place,
            wait=capped_exponential(0.05, retry_max_s),
            on_retry=on_retry,
            until=lambda: clock() >= deadline_s,
        )
    except TimeoutError:
        return REASON_TIMEOUT, f"handler exceeded {deadlines.timeout_s}s"
    except Exception as exc:  # noqa: BLE001 - classified: a failure with its reason
        reason, _ = classify(exc)
        return reason, f"{type(exc).__name__}: {exc}"
    return None, ""
