"""A small FAQ/menu bot: the worked example of docs/handlers.md, run by a test through the
real pipeline (tests/integration/test_faq_bot.py).

It answers a customer's text message by keyword, keeps per-customer state in `ctx.state`
(which menu step the customer is at, whether a human took over, counters, the last topic)
and replies through WeCom when the deployment gives it a client (`consume.reply_enabled`).
Plug it in with `QYWX_CONSUME__HANDLER=examples.faq_bot:handle`.

What it shows a handler author:
- the framework calls it once per message, one message per user at a time, in the user's
  order; many users run concurrently;
- `@stateful(FaqState)`: the framework loads the customer's state before the handler and
  commits the changed state together with the message's done-flag, so each message
  changes the state exactly once even if it runs twice after a crash, and a failed
  attempt changes nothing;
- a reply is a side effect outside the state: at-least-once, so it carries a msgid
  derived from the input message and a per-message marker skips a second send;
- `PermanentError` means "never retry" (dead letter `invalid_message`); any other
  exception is retried from the DLQ with backoff, in the user's order.
"""

from __future__ import annotations

from pydantic import BaseModel

from qywx_ray import (
    Envelope,
    HandlerContext,
    KfMessage,
    Origin,
    PermanentError,
    TextMessage,
    WeComError,
    counts_messages,
    stateful,
)

# keyword (lower case) -> (topic, answer). First match wins.
FAQ: list[tuple[tuple[str, ...], str, str]] = [
    (("hours", "open", "营业时间"), "hours", "We answer every day, 9:00-21:00 (UTC+8)."),
    (("price", "cost", "价格"), "price", "Plans start at 99 CNY a month: see /pricing."),
    (("refund", "退款"), "refund", "Refunds are possible within 7 days of purchase."),
]
FALLBACK = "Sorry, I do not know that one yet: a colleague will answer soon."
HUMAN_WORDS = ("human", "agent", "人工")
HANDED_OVER = "A colleague takes over from here."

REPLIED_KEY = "faq:replied:{}"  # per msgid: the answer was sent
REPLIED_TTL_S = 86_400  # as long as the framework's own done-flags
REPLY_WINDOW_CLOSED = 95026  # WeCom: no customer message within 48 h / too many replies


class FaqState(BaseModel):
    """One customer's conversation with the bot (`ctx.state`)."""

    step: str = "new"  # new -> menu (the bot answers) -> human (a colleague took over)
    messages: int = 0
    answered: int = 0
    unanswered: int = 0
    last_topic: str = ""
    last_msgid: str = ""


def answer_for(text: str) -> tuple[str, str] | None:
    """(topic, answer) for a question, or None. Pure, so it is unit tested on its own."""
    lowered = text.lower()
    for keywords, topic, answer in FAQ:
        if any(k in lowered for k in keywords):
            return topic, answer
    return None


@counts_messages
@stateful(FaqState)
async def handle(message: KfMessage | Envelope, ctx: HandlerContext) -> None:
    """The handler: `consume.handler = "examples.faq_bot:handle"`."""
    if isinstance(message, Envelope):
        # The raw WeCom item did not parse into a typed message: nothing to answer, and
        # retrying cannot change that.
        raise PermanentError(f"message {ctx.message_id} has no typed form")
    state: FaqState = ctx.state
    state.messages += 1
    state.last_msgid = ctx.message_id
    reply = None
    text = None  # a customer's text; events, servicer/system messages, images: None
    if isinstance(message, TextMessage) and message.text is not None:
        text = message.text.content if message.origin == Origin.CUSTOMER else None
    if text is None or state.step == "human":
        pass  # nothing for the bot to answer, or a colleague took over: stay quiet
    elif any(w in text.lower() for w in HUMAN_WORDS):
        state.step, reply = "human", HANDED_OVER
    else:
        found = answer_for(text)
        state.step = "menu"
        if found:
            state.answered += 1
            state.last_topic, reply = found
        else:
            state.unanswered += 1
            reply = FALLBACK
    if reply is not None and ctx.wecom is not None:
        await send_once(ctx, reply)


async def send_once(ctx: HandlerContext, reply: str) -> None:
    """Reply through WeCom at most once per input message (barring a crash between the
    send and the marker): the state above needs no such care, the framework commits it."""
    replied = REPLIED_KEY.format(ctx.message_id)
    if await ctx.redis.exists(replied):
        return  # a re-run after the reply went out
    try:
        await ctx.wecom.send_text(
            ctx.user_id, ctx.open_kfid, reply, msgid=f"faq-{ctx.message_id}"[:32]
        )
    except WeComError as exc:
        if exc.errcode != REPLY_WINDOW_CLOSED:
            raise  # retried from the DLQ; this attempt's state change is discarded
        ctx.log.info("faq.reply_window_closed", user=ctx.user_id)
    await ctx.redis.set(replied, "1", ex=REPLIED_TTL_S)
