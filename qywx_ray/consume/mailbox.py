"""One user's mailbox inside a host: its queue, lifecycle and drain state (no IO).

A `UserMailbox` holds its user's messages from admission until their outcome is
durable, in arrival order; the host runs only its head, one at a time. Only the head may
park the user (every older message has finished, so nothing can overtake it).
Lifecycle: active -> dying -> dead after the idle lifetime; a successor mailbox for the
same user starts only after its predecessor is dead.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from qywx_ray.consume.state import StateSlot
from qywx_ray.consume.types import Delivery
from qywx_ray.envelope import Envelope
from qywx_ray.protect.breaker import CircuitBreaker


class State(enum.Enum):
    ACTIVE = "active"
    DYING = "dying"
    DEAD = "dead"


@dataclass
class Pending:
    """One message id in this host, from ingest until its outcome is durable."""

    delivery: Delivery
    envelope: Envelope
    waiters: list[Delivery] = field(default_factory=list)  # every delivery of this id
    waited_on: bool = False  # the user is parked behind it: drain the lot after success
    skip_handler: bool = False  # a drain token (or a done retry): only drains the lot
    chunk_end: bool = False  # last of a drained chunk: take the next one after it
    denied: str | None = None  # denied at ingest by a parking reason: acted on at the head
    failed: bool = False  # its outcome is a dead letter
    succeeded: bool = False  # its handler succeeded here
    holds: bool = False  # a full mailbox's overflow waits in the lot behind it
    draining: bool = False  # settled, and its user's lot is draining behind it
    # A DLQ retry of this very message that arrived while this attempt was still running
    # (possible when a dead letter is written before its park): completed if this
    # attempt succeeds, ingested afresh if it fails; never completed with a failure.
    late_retries: list[Delivery] = field(default_factory=list)


class UserMailbox:
    def __init__(
        self,
        user: str,
        predecessor: UserMailbox | None,
        now_s: float,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.user = user
        self.breaker = breaker
        self.drain_owner: Pending | None = None  # the waited-on message while draining
        self.undropped = 0  # drained items still at the head of the parked list
        self.state = State.ACTIVE
        self.queue: deque[Pending] = deque()
        self.predecessor = predecessor
        self.dead = asyncio.Event()
        self.scheduled = False  # on the ready queue or being processed by a worker
        self.busy = False
        self.unfinished = 0  # queued + running + awaiting durability
        self.last_active_s = now_s
        self.processed = 0
        # The user's committed state (consume/state.py), loaded when the mailbox first
        # runs a stateful handler; dropped with the mailbox on idle expiry.
        self.user_state: StateSlot | None = None
        self.state_loading: asyncio.Future[StateSlot] | None = None  # started on activation

    def snapshot(self, now_s: float) -> dict[str, Any]:
        return {
            "user": self.user,
            "state": self.state.value,
            "queue_depth": len(self.queue),
            "busy": self.busy,
            "unfinished": self.unfinished,
            "idle_s": round(max(0.0, now_s - self.last_active_s), 3),
            "processed": self.processed,
            "draining": self.drain_owner is not None,
            "waiting_for_predecessor": self.predecessor is not None
            and not self.predecessor.dead.is_set(),
        }
