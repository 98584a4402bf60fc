"""Per-user state on a host's mailboxes, for a handler declared `@stateful` (consume/state.py).

Loaded when a mailbox first runs (one round trip for every mailbox a delivery batch
activates), kept on the mailbox and dropped with it. Each attempt gets a fresh copy, so
a failed attempt's changes are never kept; a success's change becomes a `StateWrite`
that rides with its done-flag in one version-checked commit (consume/dedup.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from qywx_ray.consume.mailbox import UserMailbox
from qywx_ray.consume.state import (
    REASON_STATE_TOO_LARGE,
    StateLoader,
    StateSlot,
    StateSpec,
    StateStore,
    StateTooLarge,
    StateWrite,
    m_state_conflicts,
    m_state_too_large,
    next_write,
)
from qywx_ray.consume.types import REASON_INVALID
from qywx_ray.obs.logging import get_logger

log = get_logger(__name__)


class HostStates:
    """The state side of one host: loads, fresh copies per attempt, commits, refusals."""

    def __init__(
        self,
        spec: StateSpec,
        store: StateStore,
        *,
        host: str,
        max_bytes: int,
        retry_max_s: float,
        on_fatal: Callable[[str], None] | None,
    ) -> None:
        self.spec = spec
        self.loader = StateLoader(store, retry_max_s)
        self.host = host
        self.max_bytes = max_bytes
        self.on_fatal = on_fatal

    def activated(self, mailboxes: Sequence[UserMailbox]) -> None:
        """Mailboxes that just got work: their state in one round trip, started now so
        no handler slot waits for it (a mailbox's future dies with it)."""
        cold = [mb for mb in mailboxes if mb.user_state is None and mb.state_loading is None]
        if cold:
            loading = self.loader.load_now([mb.user for mb in cold])
            for mb in cold:
                mb.state_loading = loading[mb.user]

    async def slot(self, mb: UserMailbox) -> StateSlot:
        """The mailbox's state: the load its activation started, else loaded now
        (coalesced with the same tick's asks)."""
        if mb.user_state is None:
            loading, mb.state_loading = mb.state_loading, None
            if loading is not None:
                mb.user_state = await asyncio.shield(loading)
            else:
                mb.user_state = await self.loader.get(mb.user)
        return mb.user_state

    def fresh(self, slot: StateSlot) -> Callable[[], Any]:
        """What an attempt's `ctx.state` is built from: a fresh copy each time."""
        spec = self.spec
        return lambda: slot.take(spec)

    def write(
        self, mb: UserMailbox, slot: StateSlot, value: Any
    ) -> tuple[StateWrite | None, str | None, str]:
        """The successful attempt's commit (the slot moves to the new state), or a failure:
        too large (dead letter `state_too_large`, old state kept), or not the declared
        type (`invalid_message`)."""
        try:
            write = next_write(self.spec, slot, mb.user, value, self.max_bytes)
        except StateTooLarge as exc:
            m_state_too_large.inc()
            return None, REASON_STATE_TOO_LARGE, str(exc)
        except (TypeError, ValueError) as exc:
            return None, REASON_INVALID, f"ctx.state: {exc}"
        return write, None, ""

    def refused(self, mb: UserMailbox, message_id: str) -> None:
        """The store refused a state commit: another writer moved the user's state, or the
        message was already applied. Nothing of it was written and it is never completed;
        crash-only: the host restarts, the message is re-delivered and re-run against the
        stored state (never a lost update, never a second application)."""
        m_state_conflicts.inc()
        mb.user_state = None
        log.error("state.commit_refused", user=mb.user, message_id=message_id, host=self.host)
        if self.on_fatal is not None:
            self.on_fatal("state commit refused")
