"""A small FAQ bot: the worked example of docs/handlers.md, run by a test through the real
pipeline (tests/integration/test_faq_bot.py).

It answers a customer's text message by keyword, keeps per-user state in Redis (how many
messages, how many answered, the last topic asked about) and replies through WeCom when
the deployment gives it a client (`consume.reply_enabled`). Plug it in with
`QYWX_CONSUME__HANDLER=examples.faq_bot:handle`.

What it shows a handler author:
- the framework calls it once per message, one message per user at a time, in the user's
  order; many users run concurrently;
- it must be idempotent: a crash between its side effect and the framework's done-flag
  runs the message again, so the state update is applied once per `msgid` (one Lua
  script: "seen" marker and counters together);
- `PermanentError` means "never retry" (dead letter `invalid_message`); any other
  exception is retried from the DLQ with backoff, in the user's order.
"""

from __future__ import annotations

from qywx_ray import (
    Envelope,
    EventMessage,
    HandlerContext,
    KfMessage,
    Origin,
    PermanentError,
    TextMessage,
    WeComError,
)

# keyword (lower case) -> (topic, answer). First match wins.
FAQ: list[tuple[tuple[str, ...], str, str]] = [
    (("hours", "open", "营业时间"), "hours", "We answer every day, 9:00-21:00 (UTC+8)."),
    (("price", "cost", "价格"), "price", "Plans start at 99 CNY a month: see /pricing."),
    (("refund", "退款"), "refund", "Refunds are possible within 7 days of purchase."),
]
FALLBACK = "Sorry, I do not know that one yet: a colleague will answer soon."

STATE_KEY = "faq:user:{}:{}"  # hash per (open_kfid, external_userid)
SEEN_KEY = "faq:seen:{}"  # per msgid: the state update was applied
REPLIED_KEY = "faq:replied:{}"  # per msgid: the answer was sent
SEEN_TTL_S = 86_400  # as long as the framework's own done-flags
REPLY_WINDOW_CLOSED = 95026  # WeCom: no customer message within 48 h / too many replies

# Applies one message to the user's state exactly once (KEYS: state, seen marker;
# ARGV: counter field, topic or '', marker ttl). Returns 1 if applied, 0 if seen before.
_APPLY_ONCE = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'messages', 1)
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'last_topic', ARGV[2]) end
return 1
"""


def answer_for(text: str) -> tuple[str, str] | None:
    """(topic, answer) for a question, or None. Pure, so it is unit tested on its own."""
    lowered = text.lower()
    for keywords, topic, answer in FAQ:
        if any(k in lowered for k in keywords):
            return topic, answer
    return None


async def handle(message: KfMessage | Envelope, ctx: HandlerContext) -> None:
    """The handler: `consume.handler = "examples.faq_bot:handle"`."""
    if isinstance(message, Envelope):
        # The raw WeCom item did not parse into a typed message: nothing to answer, and
        # retrying cannot change that.
        raise PermanentError(f"message {ctx.message_id} has no typed form")
    if isinstance(message, EventMessage) or message.origin != Origin.CUSTOMER:
        field, topic, reply = "other", "", None  # events, servicer and system messages
    elif isinstance(message, TextMessage) and message.text is not None:
        found = answer_for(message.text.content)
        field, topic, reply = ("answered", *found) if found else ("unanswered", "", FALLBACK)
    else:
        field, topic, reply = "other", "", None  # images, voice, ...: a human looks
    if ctx.redis is None:
        raise RuntimeError("the FAQ bot needs Redis")  # retryable: configuration, not data
    await ctx.redis.eval(
        _APPLY_ONCE,
        2,
        STATE_KEY.format(ctx.open_kfid, ctx.user_id),
        SEEN_KEY.format(ctx.message_id),
        field,
        topic,
        SEEN_TTL_S,
    )
    if reply is None or ctx.wecom is None:
        return
    replied = REPLIED_KEY.format(ctx.message_id)
    if await ctx.redis.exists(replied):
        return  # a re-run after the reply went out
    try:
        await ctx.wecom.send_text(
            ctx.user_id, ctx.open_kfid, reply, msgid=f"faq-{ctx.message_id}"[:32]
        )
    except WeComError as exc:
        if exc.errcode != REPLY_WINDOW_CLOSED:
            raise  # retried from the DLQ; the state update above will not repeat
        ctx.log.info("faq.reply_window_closed", user=ctx.user_id)
    # A crash between the send and this line replies twice on the re-run: the one window
    # left, as with any side effect outside Redis.
    await ctx.redis.set(replied, "1", ex=SEEN_TTL_S)
