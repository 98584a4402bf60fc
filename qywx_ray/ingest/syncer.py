"""KfSyncer: pulls kf/sync_msg for one open_kfid and hands every message to Kafka or the spool.

One plain object per open_kfid (the lead wraps it in a Ray actor). Callbacks only call
`request_pull(token)`, which returns at once; bursts coalesce into one more pull. A
pull takes the open_kfid's Redis lock (skips if another node holds it), reads the
cursor, and for each page: envelopes (message_id = WeCom msgid, stable across re-pulls),
spooled users' messages appended behind their spool, the rest produced as one confirmed
batch, anything not acked spooled - and only then the fenced cursor commit.
Must never: advance the cursor past a message that is neither acked by Kafka nor
durably spooled. If both Kafka and Redis fail, the cursor stays and the pull retries
with backoff (WeCom keeps messages 3 days). A periodic sweep catches lost callbacks.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qywx_ray.envelope import Envelope, ingest_envelope
from qywx_ray.errors import InfraError, WeComError
from qywx_ray.ingest.breaker import BreakerState, ProducerBreaker
from qywx_ray.ingest.cursor import CursorStore
from qywx_ray.ingest.locks import LockLease, LockLostError, LockManager
from qywx_ray.ingest.loops import loop_failed, wait_set
from qywx_ray.ingest.producer import BatchProducer, HeldBehind
from qywx_ray.ingest.settings import IngestSettings
from qywx_ray.ingest.spool import KAFKA_FAILURES, Spool
from qywx_ray.obs import metrics
from qywx_ray.obs.logging import get_logger
from qywx_ray.wecom.errcodes import SYNC_BACKOFF

log = get_logger(__name__)

SYNC_PULLS = metrics.counter("qywx_sync_pulls_total", "sync_msg pull runs", ("outcome",))
SYNC_PAGES = metrics.counter("qywx_sync_pages_total", "sync_msg pages fetched")
SYNC_MESSAGES = metrics.counter("qywx_sync_messages_total", "Messages pulled from sync_msg")
SYNC_ERRORS = metrics.counter("qywx_sync_errors_total", "Failed pulls", ("errcode",))
SYNC_INVALID = metrics.counter(
    "qywx_sync_invalid_messages_total",
    "Pulled messages with a msgid but malformed fields, sent on flagged in `invalid`",
)
CURSOR_RESETS = metrics.counter(
    "qywx_sync_cursor_resets_total",
    "Cursors WeCom rejected: the pull restarted from the oldest retained message",
)


def restart_after_rejection(errcode: int, cursor: str, invalid_codes: Collection[int]) -> bool:
    """Should a pull whose cursor WeCom answered with `errcode` start over without one?

    Yes for an invalid-cursor errcode while a cursor was sent: retrying the same cursor
    would stall the open_kfid until WeCom's 3-day retention dropped everything behind it,
    whereas no cursor means "from the oldest retained message" - duplicates (deduplicated
    by message_id downstream), never a gap. Without a cursor there is nothing to reset:
    the error is raised and the pull backs off.
    """
    return bool(cursor) and errcode in invalid_codes


class SyncPage(Protocol):
    """The shape of one kf/sync_msg page (qywx_ray.wecom's SyncMsgPage fits it)."""

    @property
    def errcode(self) -> int: ...
    @property
    def errmsg(self) -> str: ...
    @property
    def next_cursor(self) -> str: ...
    @property
    def has_more(self) -> bool: ...
    @property
    def msg_list(self) -> list[dict[str, Any]]: ...


class SyncSource(Protocol):
    """Where pages come from: the WeCom client, or a fake in tests."""

    async def sync_msg(self, open_kfid: str, cursor: str, token: str, limit: int) -> SyncPage: ...


@dataclass
class PullResult:
    status: str  # "done" | "busy" (another holder has the lock)
    pages: int = 0
    messages: int = 0
    produced: int = 0
    spooled: int = 0
    cursor: str = ""


class KfSyncer:
    """Pull loop for one open_kfid. All methods run on one asyncio loop."""

    def __init__(
        self,
        open_kfid: str,
        *,
        source: SyncSource,
        producer: BatchProducer,
        locks: LockManager,
        cursors: CursorStore,
        spool: Spool,
        breaker: ProducerBreaker | None = None,
        settings: IngestSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.open_kfid = open_kfid
        self.source = source
        self.producer = producer
        self.locks = locks
        self.cursors = cursors
        self.spool = spool
        self.breaker = breaker
        self.settings = settings or IngestSettings()
        self.clock = clock
        self.rng = rng
        self._sleep = sleep
        self._token = ""
        self._token_at = 0.0
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.lock_name = f"sync:{open_kfid}"

    # ------------------------------------------------------------------ requests
    def request_pull(self, token: str | None = None) -> None:
        """Ask for a pull (a callback arrived). Returns at once; bursts coalesce."""
        if token:
            self._token = token
            self._token_at = self.clock()
        self._wake.set()

    @property
    def pull_requested(self) -> bool:
        return self._wake.is_set()

    def current_token(self) -> str:
        """The callback token while it is still valid, else "" (pull without it)."""
        if self._token and self.clock() - self._token_at < self.settings.callback_token_valid_s:
            return self._token
        return ""

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # ------------------------------------------------------------------ one pull
    async def pull_once(self) -> PullResult:
        """Pull every page available now. Raises WeComError/InfraError/LockLostError."""
        lease = await self.locks.acquire(self.lock_name)
        if lease is None:
            SYNC_PULLS.inc(outcome="busy")
            return PullResult("busy")
        try:
            result = await self.locks.run_locked(lease, lambda: self._pull_pages(lease))
        except BaseException:
            SYNC_PULLS.inc(outcome="error")
            raise
        SYNC_PULLS.inc(outcome="done")
        return result

    async def _pull_pages(self, lease: LockLease) -> PullResult:
        cursor = await self.cursors.get(self.open_kfid)
        result = PullResult("done", cursor=cursor)
        restarted = False  # at most once per pull: a WeCom that keeps rejecting backs off
        while True:
            try:
                page = await self._fetch(cursor)
            except WeComError as exc:
                codes = self.settings.invalid_cursor_errcodes
                if restarted or not restart_after_rejection(exc.errcode, cursor, codes):
                    raise
                restarted = True
                await self._restart_from_oldest(cursor, exc, lease)
                cursor = result.cursor = ""
                continue
            result.pages += 1
            SYNC_PAGES.inc()
            envelopes = self._envelopes(page.msg_list)
            result.messages += len(page.msg_list)
            SYNC_MESSAGES.inc(len(page.msg_list))
            produced, spooled = await self._deliver(envelopes)
            result.produced += produced
            result.spooled += spooled
            # Every message of the page is now acked by Kafka or in the spool.
            next_cursor = page.next_cursor or cursor
            if next_cursor != cursor:
                if not await self.cursors.commit_cursor(self.open_kfid, next_cursor, lease):
                    raise LockLostError(
                        f"cursor commit for {self.open_kfid} refused: lock "
                        f"(fence {lease.fence}) no longer held"
                    )
                cursor = next_cursor
                result.cursor = cursor
            elif page.has_more and not page.msg_list:
                break  # no progress possible now; the next request or sweep retries
            if not page.has_more:
                break
        return result

    async def _restart_from_oldest(self, cursor: str, exc: WeComError, lease: LockLease) -> None:
        """WeCom rejected `cursor`: store "" (fenced, like any commit) so that this pull and,
        if it fails, the next one start from the oldest retained message. Counted and
        logged at ERROR: messages that left the 3-day retention behind a cursor we could
        not use are gone, so an operator should look."""
        if not await self.cursors.commit_cursor(self.open_kfid, "", lease):
            raise LockLostError(
                f"cursor reset for {self.open_kfid} refused: lock (fence {lease.fence}) "
                "no longer held"
            )
        CURSOR_RESETS.inc()
        SYNC_ERRORS.inc(errcode=str(exc.errcode))
        log.error(
            "sync.cursor_rejected_restarting",
            open_kfid=self.open_kfid,
            errcode=exc.errcode,
            errmsg=exc.errmsg[:200],
            cursor=cursor[:100],
        )

    async def _fetch(self, cursor: str) -> SyncPage:
        page = await self.source.sync_msg(
            self.open_kfid, cursor, self.current_token(), self.settings.sync_page_limit
        )
        if page.errcode != 0:
            raise WeComError(page.errcode, page.errmsg, api="kf/sync_msg")
        return page

    def _envelopes(self, msg_list: Sequence[dict[str, Any]]) -> list[Envelope]:
        """Every message with a msgid, in page order; malformed ones flagged, not dropped
        (the cursor moves past them only once they are in Kafka or the spool)."""
        out = []
        ingest_ts_ms = int(time.time() * 1000)
        for msg in msg_list:
            env = ingest_envelope(msg, ingest_ts_ms=ingest_ts_ms)
            if env is None:
                # Without a msgid a message cannot be deduplicated or addressed anywhere.
                SYNC_ERRORS.inc(errcode="envelope")
                log.error(
                    "sync.message_without_msgid", open_kfid=self.open_kfid, msg=str(msg)[:500]
                )
                continue
            if env.invalid:
                SYNC_INVALID.inc()
                log.warning(
                    "sync.invalid_message_flagged",
                    open_kfid=self.open_kfid,
                    message_id=env.message_id,
                    error=env.invalid[:300],
                )
            out.append(env)
        return out

    async def _deliver(self, envelopes: list[Envelope]) -> tuple[int, int]:
        """Kafka for users without a spool, the spool for the rest and for failures.

        Returns (produced, spooled). Raises InfraError when a message could be neither
        produced nor spooled: the caller must then not move the cursor.
        """
        if not envelopes:
            return 0, 0
        behind = await self.spool.append_if_spooled(envelopes)
        spooled = sum(1 for e in envelopes if e.external_userid in behind)
        rest = [e for e in envelopes if e.external_userid not in behind]
        failed: list[Envelope] = []
        reason = ""
        if rest:
            probe = self.breaker is not None and self.breaker.state is not BreakerState.CLOSED
            if self.breaker is None or self.breaker.allow():
                failed, reason = await self._produce(rest, probe=probe)
            else:
                failed = rest
                reason = "producer circuit breaker open"
        if failed:
            KAFKA_FAILURES.inc()
            await self.spool.append(failed, reason=reason, open_kfid=self.open_kfid)
        return len(rest) - len(failed), spooled + len(failed)

    async def _produce(
        self, envelopes: list[Envelope], *, probe: bool
    ) -> tuple[list[Envelope], str]:
        """Produce confirmed; returns (not acked, reason). A probe (the breaker's trial)
        sends one message first and spools the rest if it fails: a failed attempt stays
        queued in librdkafka and is delivered again later, so a whole page per trial would
        multiply duplicates over a long outage."""
        if probe and len(envelopes) > 1:
            head_failed, reason = await self._produce(envelopes[:1], probe=False)
            if head_failed:
                return list(envelopes), reason  # all of them, in order, to the spool
            return await self._produce(envelopes[1:], probe=False)
        outcome = await self.producer.produce_batch(envelopes)
        bad = outcome.failed
        if self.breaker is not None:  # records held behind a failed one say nothing of Kafka
            kafka_bad = sum(1 for d in bad if not isinstance(d.error, HeldBehind))
            self.breaker.record(len(envelopes) - len(bad), kafka_bad)
        return [d.envelope for d in bad], str(bad[0].error) if bad else ""

    # ------------------------------------------------------------------ loop
    async def _pause(self, delay_s: float) -> None:
        if self._sleep is not None:
            await self._sleep(delay_s)
            return
        await wait_set(self._stop, delay_s)

    async def run(self) -> None:
        """Pull on request, at least every sweep_interval_s; back off on failure. Until stop()."""
        s = self.settings
        backoff_s = s.backoff_initial_s
        self._wake.set()  # catch up on start
        while not self._stop.is_set():
            await wait_set(self._wake, s.sweep_interval_s)
            if self._stop.is_set():
                break
            self._wake.clear()  # requests arriving during the pull cause one more pull
            try:
                result = await self.pull_once()
                backoff_s = s.backoff_initial_s
                if result.status == "busy":
                    # Another node is pulling and may already be past our message: retry
                    # soon rather than at the next sweep.
                    await self._pause(s.busy_retry_s)
                    self._wake.set()
                continue
            except WeComError as exc:
                SYNC_ERRORS.inc(errcode=str(exc.errcode))
                if exc.errcode not in SYNC_BACKOFF:
                    self._token = ""  # e.g. a rejected token: next try goes without it
                log.warning("sync.wecom_error", open_kfid=self.open_kfid, errcode=exc.errcode)
            except LockLostError as exc:
                SYNC_ERRORS.inc(errcode="lock_lost")
                log.warning("sync.lock_lost", open_kfid=self.open_kfid, error=str(exc))
            except InfraError as exc:
                SYNC_ERRORS.inc(errcode="infra")
                log.warning("sync.infra_error", open_kfid=self.open_kfid, error=str(exc))
            except Exception as exc:  # noqa: BLE001 - a bug must not kill the loop of this open_kfid
                SYNC_ERRORS.inc(errcode="unexpected")
                loop_failed("sync", exc, open_kfid=self.open_kfid)
            delay_s = backoff_s * (0.5 + self.rng())
            backoff_s = min(backoff_s * 2, s.backoff_max_s)
            await self._pause(delay_s)
            self._wake.set()  # retry after the backoff
