"""Business handlers: the plugin point where a customer's message is finally acted on.

`settings.consume.handler = "package.module:function"`; the function takes the typed
message (a `qywx_ray.wecom.models.KfMessage` when that parser is present, else the
Envelope; with `@envelope_handler` always the Envelope, and no typed parse is paid) and
a HandlerContext, and may be sync (run in the host's bounded handler thread pool,
`consume.handler_threads`; see handler_threads.py) or async. Raise
`PermanentError` (or let a ValueError escape) for a message that can never succeed
(dead letter `invalid_message`); any other exception is retryable (`downstream_error`).
A message ingest flagged `invalid` (a WeCom message with a msgid but malformed fields,
kept rather than dropped) never reaches the handler: it is dead-lettered the same way,
permanently, and counted (`qywx_invalid_messages_refused_total`), so an operator reviews
it instead of every handler having to guard against defaulted fields.
Handlers must be idempotent for side effects outside Redis done-flags: a crash between
the side effect and the done-flag write replays the message once more. Changes to
`ctx.state` (a handler declared `@stateful`, consume/state.py) are the exception: they
are committed with the done-flag, exactly once.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from qywx_ray.consume.state import counts_messages, stateful
from qywx_ray.envelope import Envelope
from qywx_ray.errors import EnvelopeError, InfraError, QywxError
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import StructLogger, get_logger
from qywx_ray.store.client import is_transient_redis_error

Handler = Callable[[Any, "HandlerContext"], Awaitable[None] | None]

INVALID_REFUSED = metrics.counter(
    "qywx_invalid_messages_refused_total",
    "Messages ingest flagged invalid, dead-lettered as invalid_message without a handler call",
)


class PermanentError(QywxError):
    """The handler says this message can never be processed (not retryable)."""


@dataclass
class HandlerContext:
    user_id: str
    open_kfid: str
    message_id: str
    envelope: Envelope
    attempt: int
    log: StructLogger
    redis: Any  # redis.asyncio.Redis or None
    wecom: Any  # a WeCom API client or None
    options: dict[str, Any]  # consume settings as a dict (record_key, transcript_max_len, ...)
    # The user's state, for a handler declared `@stateful(...)` (consume/state.py): a
    # fresh copy per attempt, kept only if the handler succeeds. None otherwise.
    state: Any = None


def load_handler(spec: str) -> Handler:
    """Import "package.module:function"; a clear error when it does not exist."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise QywxError(f"handler {spec!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise QywxError(f"handler {spec!r} cannot be imported: {exc}") from exc
    if not callable(fn):
        raise QywxError(f"handler {spec!r} is not callable")
    return fn  # type: ignore[no-any-return]


def typed_message(envelope: Envelope) -> Any:
    """The WeCom model of the message when the raw item parses, else the Envelope.

    The models module (~35 ms of imports: hundreds of pydantic classes) is imported at
    the first typed message, not with this module: every dedicated user actor is a new
    process importing this, and one whose handler reads only the Envelope never needs
    it (bench/bench_actor_start.py; tests/unit/test_lean_actor_imports.py)."""
    if not envelope.raw:
        return envelope
    from qywx_ray.wecom.models import parse_kf_message  # a dict lookup after the first

    try:
        return parse_kf_message(envelope.raw)
    except (ValidationError, ValueError, KeyError, TypeError):
        return envelope


_AnyHandler = TypeVar("_AnyHandler", bound=Handler)


def envelope_handler(fn: _AnyHandler) -> _AnyHandler:
    """Mark a handler that reads only `ctx.envelope`: it gets the Envelope as `message`
    and the host skips the typed WeCom parse (a pydantic model per message). Returns the
    function itself, its type unchanged."""
    fn.__qywx_message__ = "envelope"  # type: ignore[attr-defined]
    return fn


def wants_typed_message(handler: Handler) -> bool:
    return getattr(handler, "__qywx_message__", "typed") != "envelope"


def is_infra_error(exc: BaseException) -> bool:
    """Our own stores unreachable (Redis down, or failing over: READONLY, NOREPLICAS, no
    master yet): not the message's fault, so the host retries it in place with a short
    backoff (`consume.handler_infra_retry_s`) instead of dead-lettering it."""
    return isinstance(exc, InfraError) or is_transient_redis_error(exc)


def classify(exc: BaseException) -> tuple[str, bool]:
    """Failure reason and whether a retry can help."""
    if isinstance(exc, PermanentError | EnvelopeError | ValidationError | ValueError | TypeError):
        return "invalid_message", False
    return "downstream_error", True


_is_async: dict[Any, bool] = {}


async def run_handler(handler: Handler, message: Any, ctx: HandlerContext) -> None:
    """Call a sync or async handler. Host shells wrap sync handlers in their own
    `HandlerThreads` (bounded, hung threads end the host); an unwrapped sync handler runs
    in a shared bounded fallback pool, never in the loop's default executor, which the
    dead-letter path must always find free.

    A message ingest flagged `invalid` raises PermanentError instead (dead letter
    `invalid_message`, not retried): its fields hold defaults where WeCom's values were
    unusable, and a handler acting on them would act on something the customer never sent.
    """
    envelope = getattr(ctx, "envelope", None)
    if envelope is not None and envelope.invalid:
        INVALID_REFUSED.inc()
        raise PermanentError(f"ingest flagged the message invalid: {envelope.invalid[:300]}")
    is_async = _is_async.get(handler)
    if is_async is None:
        is_async = _is_async[handler] = inspect.iscoroutinefunction(handler)
    if is_async:
        await handler(message, ctx)  # type: ignore[misc]
        return
    from qywx_ray.consume.handler_threads import fallback_threads  # imports this module

    result = await fallback_threads().run(handler, message, ctx)
    if inspect.isawaitable(result):
        await result


# ---------------------------------------------------------------- bundled handlers

TRANSCRIPT_KEY = "qywx:transcript:{}:{}"


@counts_messages
@stateful()
@envelope_handler
async def default_handler(message: Any, ctx: HandlerContext) -> None:
    """Append the message to the user's transcript in Redis (capped list) and count it in
    the user's state (`messages`, `last_msgid`: applied exactly once, which the demo's
    audit checks against WeCom's record).

    With `consume.reply_enabled` and a WeCom client, replies with a short text (msgid
    derived from the message's; a re-run after a crash may reply twice).
    """
    env = ctx.envelope
    ctx.state["messages"] = int(ctx.state.get("messages", 0)) + 1
    ctx.state["last_msgid"] = env.message_id
    entry = json.dumps(
        {
            "msgid": env.message_id,
            "msgtype": env.msgtype,
            "origin": env.origin,
            "send_time": env.send_time,
            "raw": env.raw,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )
    if ctx.redis is not None:
        key = TRANSCRIPT_KEY.format(ctx.open_kfid, ctx.user_id)
        cap = int(ctx.options.get("transcript_max_len", 200))
        async with ctx.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, entry)
            pipe.ltrim(key, -cap, -1)
            await pipe.execute()
    if ctx.options.get("reply_enabled") and ctx.wecom is not None and env.origin == 3:
        send = getattr(ctx.wecom, "send_text", None)
        if send is not None:
            result = send(ctx.user_id, ctx.open_kfid, "received", msgid=f"r{env.message_id}"[:32])
            if inspect.isawaitable(result):
                await result


@envelope_handler
async def noop_handler(message: Any, ctx: HandlerContext) -> None:
    """Benchmark handler: does nothing."""
    return None


@envelope_handler
async def bench_handler(message: Any, ctx: HandlerContext) -> None:
    """Benchmark handler: trivial, or `raw.sleep_ms` of awaited I/O (one pipeline serves
    every bench case)."""
    sleep_ms = ctx.envelope.raw.get("sleep_ms")
    if sleep_ms:
        await asyncio.sleep(float(sleep_ms) / 1000.0)


@stateful()
@envelope_handler
async def bench_state_handler(message: Any, ctx: HandlerContext) -> None:
    """Benchmark handler: bench_handler's trivial case with per-user state that changes on
    every message (a counter beside `raw.state_bytes` of padding): each message pays a
    version-checked write of the whole state with its done-flag (the worst case)."""
    pad = int(ctx.envelope.raw.get("state_bytes", 0))
    if len(ctx.state.get("pad", "")) != pad:
        ctx.state["pad"] = "x" * pad
    ctx.state["n"] = int(ctx.state.get("n", 0)) + 1


@envelope_handler
async def sleep_5ms_handler(message: Any, ctx: HandlerContext) -> None:
    """Benchmark handler: 5 ms of awaited I/O."""
    await asyncio.sleep(0.005)


def sync_sleep_handler(message: Any, ctx: HandlerContext) -> None:
    """A synchronous handler (runs in a thread), for tests."""
    time.sleep(0.001)


def make_context_logger() -> StructLogger:
    return get_logger("qywx_ray.handler")
