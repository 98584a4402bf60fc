"""Test handlers, named by spec: consume.handler =
"qywx_ray.testing.handlers:recording_handler" (or state_recording_handler).

They record what they saw in Redis so tests can check order, dedup and state, and take
faults from the message content. Never a default handler.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from qywx_ray.consume.dedup import DONE_KEY
from qywx_ray.consume.handlers import HandlerContext, PermanentError, envelope_handler
from qywx_ray.consume.state import stateful

_RECORD_LUA = """
redis.call('RPUSH', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('RPUSH', KEYS[5], ARGV[1])
end
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
return 1
"""


@envelope_handler
async def recording_handler(message: Any, ctx: HandlerContext) -> None:
    """Test handler: records "user|message_id" in order.

    `{record_key}:calls` gets every invocation; `{record_key}` gets the side effect once
    per message id (an idempotent side effect, as handlers should have);
    `{record_key}:after_done` gets every invocation that started after the message's
    done-flag was durable — a dedup failure, unlike a re-run after a crash or a lost
    reply, which at-least-once delivery allows. Message content
    drives faults: raw `hold` = a Redis key to wait for before finishing (bounded by the
    handler timeout), raw `fail` = "permanent" or "retryable" to raise, raw `fail_until`
    = a Redis key: retryable failure until it exists (each failure is logged to
    `{record_key}:fails` as "message_id|attempt|unix_ms"), raw `track_latency` = record
    ms from the envelope's ingest time to this call in hash `{record_key}:latency_ms`.
    """
    env = ctx.envelope
    record_key = str(ctx.options.get("record_key", "qywx:test:record"))
    hold = env.raw.get("hold")
    if hold:
        while not await ctx.redis.exists(hold):  # noqa: ASYNC110 - polls Redis, not a local flag
            await asyncio.sleep(0.02)
    fail_until = env.raw.get("fail_until")
    if fail_until and not await ctx.redis.exists(fail_until):
        entry = f"{ctx.message_id}|{ctx.attempt}|{int(time.time() * 1000)}"
        await ctx.redis.rpush(f"{record_key}:fails", entry)
        raise RuntimeError(f"asked to fail until {fail_until} exists")
    if env.raw.get("track_latency"):
        latency_ms = int(time.time() * 1000) - env.ingest_ts_ms
        await ctx.redis.hset(f"{record_key}:latency_ms", ctx.message_id, latency_ms)
    fail = env.raw.get("fail")
    if fail == "permanent":
        raise PermanentError("asked to fail permanently")
    if fail == "retryable":
        raise RuntimeError("asked to fail (retryable)")
    value = f"{ctx.user_id}|{ctx.message_id}"
    await ctx.redis.eval(
        _RECORD_LUA,
        5,
        f"{record_key}:effect:{ctx.message_id}",
        record_key,
        f"{record_key}:calls",
        DONE_KEY.format(ctx.message_id),
        f"{record_key}:after_done",
        value,
    )


@stateful()
@envelope_handler
async def state_recording_handler(message: Any, ctx: HandlerContext) -> None:
    """Test handler with per-user state: appends the message id to `ctx.state["seen"]`
    (a fold whose result shows every application, in order), each invocation to
    `{record_key}:calls` and the state it was given to `{record_key}:saw`
    ("message_id|attempt|seen,..."). Raw `fail` = "retryable" fails after the mutation (which must
    not survive); raw `pause_writes_ms` = the FIRST invocation of this message pauses
    Redis writes (CLIENT PAUSE WRITE) as its last step, so its state commit cannot happen
    until a test kills the host: the crash window between handler end and commit."""
    env = ctx.envelope
    record_key = str(ctx.options.get("record_key", "qywx:test:record"))
    seen = ctx.state.setdefault("seen", [])
    saw = f"{ctx.message_id}|{ctx.attempt}|{','.join(seen)}"  # the state this attempt got
    seen.append(ctx.message_id)
    await ctx.redis.rpush(f"{record_key}:calls", f"{ctx.user_id}|{ctx.message_id}")
    await ctx.redis.rpush(f"{record_key}:saw", saw)
    if env.raw.get("fail") == "retryable" and ctx.attempt == 1:
        raise RuntimeError("asked to fail (retryable) after mutating the state")
    pause_ms = env.raw.get("pause_writes_ms")
    if pause_ms and await ctx.redis.set(f"{record_key}:paused:{ctx.message_id}", "1", nx=True):
        await ctx.redis.execute_command("CLIENT", "PAUSE", int(pause_ms), "WRITE")
