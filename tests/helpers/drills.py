"""What the drills share: the protection rule they run under, chatting, and the audit.

Fixtures stay in tests/drills/conftest.py; tests import these from here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from qywx_ray.devstack.pipeline import RECORD_KEY, AuditResult, LocalPipeline
from qywx_ray.devstack.procs import wait_until
from qywx_ray.errors import InfraError

# The drills chat at machine speed (10 messages per customer in a few seconds), far above
# the default rule's 5 per 10 s: with that rule they would test the rate limiter, not the
# faults they inject. The limiter still runs on every batch, with a rule sized to them.
DRILL_PROTECT = {
    "protect": {
        "default": {
            "window_seconds": 10,
            "max_messages": 1000,
            "penalty_threshold": 1000,
            "block_hours": 0.0,
        }
    }
}


def chat(
    p: LocalPipeline, kfids: list[str], users: int, rounds: int, per_round: int = 2, **kw: Any
) -> int:
    """Customers chat in interleaved rounds, so per-user order is meaningful."""
    assert p.sim is not None
    total = 0
    for _ in range(rounds):
        for kfid in kfids:
            for u in range(users):
                p.sim.inject(kfid, f"{kfid}-u{u}", per_round, **kw)
                total += per_round
    return total


def finish(
    p: LocalPipeline, expected: int, timeout_s: float = 120.0, processed: int | None = None
) -> AuditResult:
    try:
        p.wait_drained(expected, timeout_s=timeout_s, processed=processed)
    except InfraError:  # not drained in time: say what is missing before failing
        print(f"\ndrill audit at the drain timeout: {p.audit().line()}")
        print(evidence(p))
        raise
    result = p.audit()
    print(f"\ndrill audit: {result.line()}")
    if not result.ok:
        print(evidence(p))
    assert result.ok, result.details[:10]
    return result


def evidence(p: LocalPipeline) -> str:
    """What a failed audit needs to be diagnosed: per user, the order in which side
    effects were recorded and the handler calls, as positions in the simulator's truth
    (e.g. `0 1 3 2`), plus where Ray keeps the workers' logs."""
    assert p.sim is not None
    client = p.redis_client()
    truth = p.sim.truth()
    records = [x.decode().partition("|") for x in client.lrange(RECORD_KEY, 0, -1)]
    calls = [x.decode().partition("|") for x in client.lrange(f"{RECORD_KEY}:calls", 0, -1)]
    lines = []
    for users in truth.values():
        for user, ids in users.items():
            pos = {m: i for i, m in enumerate(ids)}
            got = [pos.get(m, -1) for u, _, m in records if u == user]
            called = [pos.get(m, -1) for u, _, m in calls if u == user]
            if got != sorted(got) or len(called) != len(set(called)) or len(got) < len(ids):
                lines.append(f"user {user} ({len(ids)} msgs)")
                lines.append(f"  effects: {' '.join(map(str, got))}")
                lines.append(f"  calls:   {' '.join(map(str, called))}")
    lines.extend(_pipeline_state(p))
    try:
        from ray._private.worker import global_worker

        node: Any = global_worker.node
        lines.append(f"ray logs: {node.get_session_dir_path()}/logs")
    except Exception as exc:  # evidence is best effort; the audit already failed
        lines.append(f"ray logs: unknown ({exc!r})")
    return "\n".join(["drill evidence:", *lines])


def _pipeline_state(p: LocalPipeline) -> list[str]:
    """Where each stage stands: the consumers' partitions, in-flight work and errors,
    each host's counts and its unfinished mailboxes, the recovery actor's view, the
    indexed dead letters and the main topic's lag. Each part is best effort: a stage
    that does not answer says so instead of hiding the others."""
    import ray

    lines: list[str] = []

    def part(name: str, read: Callable[[], object]) -> None:
        try:
            lines.append(f"{name}: {read()}")
        except Exception as exc:  # evidence only; a dead stage is evidence too
            lines.append(f"{name}: no answer ({type(exc).__name__}: {str(exc)[:200]})")

    if p.consume is None or p.settings is None:
        return ["pipeline not started"]
    for i, c in enumerate(p.consume.consumers):

        def consumer_view(c: Any = c) -> object:
            s = ray.get(c.snapshot.remote(), timeout=10)
            keep = ("assigned", "inflight", "paused", "committed", "stats", "error", "running")
            return {k: s.get(k) for k in keep}

        part(f"consumer {i}", consumer_view)
    for i, h in enumerate(p.consume.hosts):

        def host_view(h: Any = h) -> object:
            s = ray.get(h.snapshot.remote(), timeout=10)
            stuck = [m for m in s.get("mailboxes", []) if m.get("unfinished")]
            return {"counts": s.get("counts"), "pending": s.get("pending"), "unfinished": stuck}

        part(f"host {i}", host_view)
    name, namespace = p.settings.dlq.recovery_actor_name, p.settings.ray_namespace
    part(
        "dlq recovery",
        lambda: ray.get(ray.get_actor(name, namespace=namespace).stats.remote(), timeout=10),
    )
    part("dead letters indexed", lambda: p.dead_letter_count(p.redis_client()))
    part("main topic lag", p.lag)
    return lines


def wait_or_explain(
    p: LocalPipeline, predicate: Callable[[], bool], *, timeout_s: float, what: str
) -> None:
    """`wait_until`, and on a timeout print the audit and the evidence before failing:
    a drill that times out in CI must say which stage held the message."""
    try:
        wait_until(predicate, timeout_s=timeout_s, what=what)
    except InfraError:
        try:
            print(f"\ndrill audit at the timeout: {p.audit().line()}")
            print(evidence(p))
        except Exception as exc:  # the timeout is the failure; never bury it
            print(f"\ndrill evidence failed: {exc!r}")
        raise


class Chatter:
    """Customers chatting in the background for the length of a fault."""

    def __init__(self, p: LocalPipeline, kfids: list[str], users: int) -> None:
        self.p, self.kfids, self.users = p, kfids, users
        self.total = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.total += chat(self.p, self.kfids, self.users, rounds=1, per_round=1)
                self._stop.wait(0.2)
        except BaseException as exc:  # surfaced in __exit__: a silent stop would hide it
            self.error = exc

    def __enter__(self) -> Chatter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "the chatter did not stop within 30 s"
        if self.error is not None:
            raise AssertionError(f"the chatter failed: {self.error!r}") from self.error
        print(f"\ndrill: {self.total} messages injected")
