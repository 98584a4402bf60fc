"""A host's side of the parking lot: the await sequences of hold, park, settle and drain.

The decisions are the mailbox machine's (mailbox_machine.py: what to park, which chunk
to take, when a drain is over); this module carries them out against the lot
(`RetryOrder`, Redis in production) in the one order that keeps a user's messages in
Kafka order:
- Every lot call of a host goes through one lane (an asyncio lock held by the whole
  ingest, by a park and by each drain chunk): Redis applies them in the order the host
  decided them, and no drained message meets a half-ingested copy of itself.
- Only a mailbox HEAD parks its user (every older message has finished), with the
  queued later messages in front of the lot, BEFORE its dead letter.
- A park takes the flag over only from its own drain owner or held tail; an older
  blocker stays.
- A settled blocker drains the lot chunk by chunk; before each chunk a new drain token
  goes to the main topic and the records held so far complete, so a drain holds its
  partition's commit for one chunk, and a crash mid-drain resumes from the newest token.
Every write is retried with the same op id until it succeeds (a resend applies once).
"""

from __future__ import annotations

import asyncio
import functools
from typing import Protocol

from qywx_ray.consume.dedup import Deduplicator
from qywx_ray.consume.host_io import op_id, retry_durable
from qywx_ray.consume.host_report import HostReport
from qywx_ray.consume.host_rules import Settle, settle
from qywx_ray.consume.mailbox import Pending, UserMailbox
from qywx_ray.consume.mailbox_machine import DRAIN_MORE, Chunk, MailboxMachine, Park
from qywx_ray.consume.types import (
    Delivery,
    DrainTokenSink,
    HoldRequest,
    ParkRequest,
    RetryOrder,
)
from qywx_ray.obs.logging import get_logger
from qywx_ray.obs.metrics import counter

log = get_logger(__name__)

m_parked = counter("qywx_messages_parked_total", "Messages parked behind a user's retry")
m_unparked = counter("qywx_messages_unparked_total", "Parked messages taken back to process")


class Finishes(Protocol):
    """What the lot steps hand back to the host: a finished message, a durable record."""

    def finish(self, p: Pending, mb: UserMailbox | None) -> None: ...

    def complete(self, d: Delivery) -> None: ...


class LotSteps:
    """Hold, park, settle and drain for the mailboxes of one host."""

    def __init__(
        self,
        *,
        lot: RetryOrder | None,
        machine: MailboxMachine,
        dedup: Deduplicator,
        lane: asyncio.Lock,
        report: HostReport,
        host: Finishes,
        drain_tokens: DrainTokenSink | None,
        drain_chunk: int,
        retry_max_s: float,
    ) -> None:
        self.lot = lot  # None: no parking lot; only settle's plain finish is reachable
        self.machine = machine
        self.dedup = dedup
        self.lane = lane
        self.report = report
        self.host = host
        self.drain_tokens = drain_tokens
        self.drain_chunk = drain_chunk
        self.retry_max_s = retry_max_s

    def parks(self, reason: str) -> bool:
        """Does a failure or denial for `reason` park its user (there is a lot)?"""
        return self.lot is not None and self.lot.parks(reason)

    def report_parked(self, n: int) -> None:
        self.report.counts["parked"] += n
        m_parked.inc(n)

    # ------------------------------------------------------------ a full mailbox

    async def hold(self, user: str, tail: Pending, held: list[Pending]) -> None:
        """A full mailbox's overflow goes to the lot behind its newest queued message
        `tail` (with its Kafka position, so older redelivered records still run). The
        caller holds the lane."""
        assert self.lot is not None
        values = [q.delivery.value for q in held]
        position = (tail.delivery.partition, tail.delivery.offset)
        mid = tail.envelope.message_id
        request = HoldRequest(user, mid, values, op_id(), position)
        await retry_durable("hold", functools.partial(self.lot.hold, request), self.retry_max_s)
        self.report_parked(len(held))
        for q in held:
            self.host.finish(q, None)

    # ------------------------------------------------------------ a failed head

    async def park_behind(self, mb: UserMailbox, p: Pending) -> Pending | None:
        """Park the user behind its head `p` BEFORE p's dead letter is written: the queued
        later messages go, in order, to the front of the lot (minus a drained chunk still
        at the list head). Under the lane: no admit runs meanwhile, so the snapshot is
        the whole queue and everything admitted after it sees the flag. A drained chunk's
        earlier messages that succeeded leave the lot with the drop: their done-flags
        must be durable first. Returns the drain owner that held p's place, if any."""
        if mb.undropped:
            await self.dedup.flushed()
        async with self.lane:
            park = self.machine.plan_park(mb, p)
            call = functools.partial(self._park, park, op_id())
            status = await retry_durable("park", call, self.retry_max_s)
            out = self.machine.parked(mb, park, status)
            if out.foreign:
                log.warning(
                    "host.park_behind_older_blocker", user=mb.user, message_id=p.envelope.message_id
                )
                return None
            if out.parked:
                self.report_parked(len(out.parked))
            for q in out.parked:
                self.host.finish(q, mb)
        return out.owner

    async def _park(self, park: Park, op_id: str) -> int:
        assert self.lot is not None
        values = [q.delivery.value for q in park.later]
        mid = park.blocker.envelope.message_id
        request = ParkRequest(park.user, mid, park.drop_first, values, op_id, park.replaces)
        return await self.lot.park(request)

    # ------------------------------------------------------------ a settled head

    async def settle(self, mb: UserMailbox, p: Pending) -> None:
        """After the head's durable outcome: release the user, take the next drained
        chunk, or just finish, as `settle` decides from the flags as they are NOW (a hold
        may have made p waited on during the await)."""
        then = settle(waited_on=p.waited_on, chunk_end=p.chunk_end)
        if then is Settle.RELEASE:
            await self._release(mb, p)
            return
        self.host.finish(p, mb)
        if then is Settle.NEXT_CHUNK:
            await self._drain_next(mb)

    async def _release(self, mb: UserMailbox, p: Pending) -> None:
        """`p` (maybe the user's blocker) is settled: drain the lot behind it if the user
        waits on it; finish p either way. A drained chunk whose last item was p goes on."""
        continues = self.machine.continues_drain(mb, p)
        await self.drain(mb, p, 0)
        if continues:
            await self._drain_next(mb)

    async def _drain_next(self, mb: UserMailbox) -> None:
        owner = mb.drain_owner
        if owner is not None:
            await self.drain(mb, owner, mb.undropped)

    async def drain(self, mb: UserMailbox, owner: Pending, drop_n: int) -> None:
        """Feed the next parked messages into the mailbox, right after the current one
        (before anything new); finish `owner` once the lot is empty and the user free.

        While draining, the owner's Kafka record (the retry, then drain tokens) is what a
        crash would redeliver to resume the drain. With a token sink, each chunk first
        puts a fresh token on the main topic and then completes the records held so far:
        the partition's commit is held for one chunk at a time, not the whole drain."""
        while True:
            if drop_n:
                # The drop removes the previous chunk from the lot, and the owner may then
                # complete: every item of it must be durably done first, whatever ended
                # the chunk (a success awaited its own flag; a permanent failure did not).
                await self.dedup.flushed()
            # Under the lane from the lot's answer until the chunk is registered as
            # pending: an ingest cannot slip a redelivered copy of a chunk message in
            # between (it would be skipped here and parked behind newer ones).
            async with self.lane:
                status, chunk = await self._next_chunk(mb, owner, drop_n)
            if status != DRAIN_MORE:  # 2: drained and unparked; 0: no longer waiting on it
                self.machine.drain_over(mb, owner)
                self.host.finish(owner, mb)
                if status == 2:
                    log.info("host.unparked", user=mb.user, after=owner.envelope.message_id)
                return
            if not chunk.take:
                drop_n = chunk.n_raw
                continue
            self.report.counts["unparked"] += len(chunk.take)
            m_unparked.inc(len(chunk.take))
            self.machine.chunk_begins(mb, owner, chunk)
            await self._hand_over_hold(owner)
            self.machine.chunk_runs(mb, chunk)
            return

    async def _next_chunk(self, mb: UserMailbox, owner: Pending, drop_n: int) -> tuple[int, Chunk]:
        """(status, chunk) of one `advance`: drop what the previous chunk consumed, read
        the next, skip what is done or already here (registered as pending before
        returning). The caller holds the lane."""
        assert self.lot is not None
        user, mid = mb.user, owner.envelope.message_id
        advance = functools.partial(self.lot.advance, user, mid, drop_n, self.drain_chunk, op_id())
        status, raw = await retry_durable("advance", advance, self.retry_max_s)
        if status != DRAIN_MORE:
            return status, Chunk([], 0)
        items, unreadable = self.machine.parse_chunk(owner, raw)
        for _ in range(unreadable):
            log.error("host.parked_unreadable", user=user)
        ids = self.machine.ids_to_ask(items)
        done = await self.dedup.already_done(ids) if ids else set()
        return status, self.machine.chunk_read(items, done, self.dedup.recent, len(raw), mb)

    async def _hand_over_hold(self, owner: Pending) -> None:
        """Put a new drain token on the main topic, then complete the records the drain
        held so far (the retry, earlier tokens that came back). Nothing to do while the
        previous token is still on its way: it holds the place."""
        if not self.machine.hand_over(owner, self.drain_tokens is not None):
            return
        assert self.drain_tokens is not None
        env = owner.envelope
        token = functools.partial(
            self.drain_tokens.drain_token, env.external_userid, env.message_id, env.open_kfid
        )
        await retry_durable("drain_token", token, self.retry_max_s, (Exception,))
        for w in self.machine.handed_over(owner):
            self.host.complete(w)
