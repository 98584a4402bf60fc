"""What a seed decides for the ingest simulator: sizes, settings, fault windows and events.

A window is a span of virtual time in which one kind of fault may strike (on one node or
on all); an event happens once. Anything inside a window counts as "unhealthy" time for
the stall invariant; events do not (the code must get over them on its own). Kinds can be
switched off by name (`run.py --without pause,redis_flaky`) to narrow a failing seed down.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WINDOW_KINDS = (
    "redis_down",  # every Redis round trip fails (all nodes)
    "redis_partition",  # one node cannot reach Redis
    "redis_slow",  # some round trips take up to 2 lock TTLs (retries, failover): a holder's
    # extend can arrive after its lease expired while its other calls still go through
    "lock_loss",  # a round trip may find every lock key gone (DEL qywx:lock:*, or a failover
    # to a replica that had not got them yet): another node can take a lock still in use
    "redis_flaky",  # blips (not applied), lost replies (applied, caller sees an error), resends
    "pause",  # one node's process stops (GC, VM pause): its leases can expire meanwhile
    "stalls",  # one node's IO calls may each start such a pause (lands between IO steps)
    "kafka_down",  # every produce fails; some records delivered but reported failed
    "kafka_flaky",  # per-record failures (the rest of that partition in the batch too), timeouts
    "kafka_fatal",  # a producer's sends and produces may hit a fatal error: that instance
    # refuses everything from then on, until the producer is rebuilt (one node or all)
    "wecom_errors",  # sync_msg answers 45009 / -1 / other errcodes
    "wecom_pages",  # short and empty pages with has_more
)
EVENT_KINDS = (
    "cursor_invalidate",  # WeCom stops accepting every cursor issued so far for a kfid
    "fence_lost",  # the lock fence counters disappear (eviction, restore)
    "locks_deleted",  # an operator's DEL qywx:lock:* (locks and fence counters)
    "cursor_lost",  # a kfid's cursor hash is gone (restore from an old backup)
    "malformed",  # some messages have bad fields (origin null, send_time "1700000000.5")
)
KINDS = WINDOW_KINDS + EVENT_KINDS
NODE_KINDS = ("redis_partition", "redis_slow", "pause", "stalls", "kafka_fatal")
NODES = (0, 1)


@dataclass(frozen=True)
class Window:
    kind: str
    start: float
    end: float
    node: int | None  # None: all nodes
    p: float  # how often it strikes inside the window

    def __str__(self) -> str:
        where = "all" if self.node is None else f"n{self.node}"
        return f"{self.kind}[{where}] {self.start:.1f}-{self.end:.1f}s p={self.p:.2f}"


@dataclass(frozen=True)
class Event:
    t: float
    kind: str
    arg: str = ""


@dataclass
class Scenario:
    seed: int
    kfids: list[str]
    users: dict[str, list[str]]
    messages: int
    active_s: float
    page_limit: int
    ttl_s: float
    extend_s: float
    retention_s: float
    breaker_threshold: int
    replay_per_user: int
    replay_batch: int
    malformed_p: float
    no_msgid_p: float
    callback_loss_p: float
    windows: list[Window] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def summary(self) -> str:
        parts = [
            f"kfids={len(self.kfids)} users={sum(len(u) for u in self.users.values())} "
            f"messages={self.messages} active={self.active_s:.0f}s page={self.page_limit} "
            f"ttl={self.ttl_s}/{self.extend_s}s retention={self.retention_s:.0f}s "
            f"breaker={self.breaker_threshold} replay={self.replay_per_user}/{self.replay_batch} "
            f"malformed={self.malformed_p:.2f} callback_loss={self.callback_loss_p:.2f}"
        ]
        parts += [str(w) for w in self.windows]
        parts += [f"{e.kind}({e.arg})@{e.t:.1f}s" for e in self.events]
        return "; ".join(parts)


def draw(seed: int, without: frozenset[str] = frozenset()) -> Scenario:
    r = random.Random(seed)
    # A third of the seeds are dense: few users, many messages, many long fault windows
    # (what it takes for races such as a paused replayer's late trim to meet new spooling).
    dense = r.random() < 0.35
    nk = r.choice((1, 1, 2))
    kfids = [f"wk{i}" for i in range(nk)]
    users = {k: [f"{k}u{j}" for j in range(r.randint(1, 2 if dense else 5))] for k in kfids}
    active_s = r.uniform(60, 300)
    ttl_s, extend_s = r.choice(((3.0, 1.0), (10.0, 3.0), (30.0, 10.0)))
    sc = Scenario(
        seed=seed,
        kfids=kfids,
        users=users,
        messages=r.randint(60, 200) if dense else r.randint(10, 80),
        active_s=active_s,
        page_limit=r.choice((2, 5, 10, 100)),
        ttl_s=ttl_s,
        extend_s=extend_s,
        retention_s=r.uniform(1500, 3000),  # WeCom's 3 days, scaled to the run
        breaker_threshold=r.choice((1, 3, 50)),
        replay_per_user=r.choice((1, 2)) if dense else r.choice((1, 2, 5, 200)),
        replay_batch=r.choice((2, 10, 2000)),
        malformed_p=0.0 if "malformed" in without else r.choice((0.0, 0.05, 0.2)),
        no_msgid_p=r.choice((0.0, 0.02)),
        callback_loss_p=r.choice((0.0, 0.1, 0.5)),
    )
    kinds = [k for k in WINDOW_KINDS if k not in without]
    # Dense seeds favour what makes replays race: partial Kafka failures and stalls.
    favoured = ("kafka_flaky", "stalls", "redis_slow", "lock_loss")
    weights = [(5 if k == "kafka_flaky" else 3) if dense and k in favoured else 1 for k in kinds]
    for _ in range((r.randint(3, 8) if dense else r.randint(0, 5)) if kinds else 0):
        kind = r.choices(kinds, weights)[0]
        start = r.uniform(0, active_s)
        if kind == "pause":
            length = r.uniform(0.5, 2.5) * ttl_s
        else:
            length = r.uniform(10, 120) if dense else r.uniform(2, 60)
        node = r.choice(NODES) if kind in NODE_KINDS else None
        if kind == "redis_flaky" and r.random() < 0.5:
            node = r.choice(NODES)
        if kind == "kafka_fatal" and r.random() < 0.3:
            node = None  # e.g. an unclean leader election: every producer out of sequence
        p = r.uniform(0.01, 0.1) if kind in ("stalls", "lock_loss") else r.uniform(0.05, 0.4)
        if dense and kind == "kafka_flaky":
            p = r.uniform(0.2, 0.6)
        sc.windows.append(Window(kind, start, start + length, node, p))
    events = [k for k in EVENT_KINDS if k not in without and k != "malformed"]
    for _ in range((r.randint(1, 5) if dense else r.randint(0, 3)) if events else 0):
        kind = r.choice(events)
        sc.events.append(Event(r.uniform(0, active_s), kind, r.choice(kfids)))
    sc.windows.sort(key=lambda w: w.start)
    sc.events.sort(key=lambda e: e.t)
    return sc
