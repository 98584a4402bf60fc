# ruff: noqa: E501  (verbatim source snippets)
"""Put one fixed consume defect back, to show the simulator finds it ("teeth");
8, 9 and 11 are per-user state defects; 10 is the one-call batch read's.

EDITS FILES IN PLACE: run it in a throwaway git worktree, never in your checkout:
    git worktree add /tmp/teeth HEAD && cd /tmp/teeth
    python tests/sim/reinject.py 4 && python -m tests.sim.run --seeds 0:3000 --list
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, from anywhere
from tests.simkit.runner import patch

UA = "qywx_ray/consume/user_actor.py"
LOT = "qywx_ray/consume/host_lot.py"
HR = "qywx_ray/consume/host_rules.py"
MM = "qywx_ray/consume/mailbox_machine.py"
IO = "qywx_ray/consume/host_io.py"
DL = "qywx_ray/consume/deadlines.py"
W = "tests/sim/world.py"
DD = "qywx_ray/consume/dedup.py"


d = sys.argv[1]
if d == "1":  # queue_full denied at ingest (its retry overtakes older queued messages)
    patch(
        HR,
        """            if not has_lot:
                plan.steps.append(Placing(Place.DENY_FULL, p, waited_on))""",
        """            if True:
                plan.steps.append(Placing(Place.DENY_FULL, p, waited_on))""",
    )
elif d == "2":  # the park does not hold the lane: admits race it, the rest stays queued
    patch(
        LOT,
        """        async with self.lane:
            park = self.machine.plan_park(mb, p)""",
        """        async with contextlib.AsyncExitStack():
            park = self.machine.plan_park(mb, p)""",
    )
    patch(
        MM,
        """        assert len(mb.queue) == 1 + len(park.later), "the queue changed under the lane\"""",
        """        rest = list(mb.queue)[1 + len(park.later):]""",
    )
    patch(
        MM,
        """        while len(mb.queue) > 1:
            mb.queue.pop()""",
        """        head = mb.queue[0]
        mb.queue.clear()
        mb.queue.append(head)
        mb.queue.extend(rest)""",
    )
    patch(LOT, "import asyncio\n", "import asyncio\nimport contextlib\n")
elif d == "3":
    print("defect 3 lives in the partition consumer tracker; the simulator models its own consumer")
    sys.exit(2)
elif d == "4":  # only WAITED_ON drains; a bypassed retry/token runs without a drain
    patch(
        HR,
        """        waited_on = has_lot and (code == WAITED_ON or is_retry)""",
        """        waited_on = has_lot and code == WAITED_ON""",
    )
    patch(
        IO,
        """        return [WAITED_ON if p.skip_handler else ADMITTED for p in items]""",
        """        return [ADMITTED for p in items]""",
    )
elif d == "5":  # a handler's own CancelledError propagates and kills the worker
    patch(
        DL,
        """            raise HandlerCancelled("handler raised CancelledError") from None""",
        """            raise""",
    )
    patch(
        UA,
        """            except BaseException as exc:
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and task and task.cancelling():
                    raise  # shutdown""",
        """            except Exception as exc:
                task = asyncio.current_task()""",
    )
elif d == "6":  # the drain holds the retry's record until the lot is empty
    patch(
        MM,
        """        return has_tokens and bool(owner.waiters)""",
        """        return False""",
    )
elif d == "7":  # the recovery releases by peek/produce/trim (old dlq/recovery.py)
    patch(
        W,
        """            if self.parking.flags.get(user) == mid:
                r = self.topic.produce(""",
        """            if self.parking.flags.get(user) == mid and old_release(self, user, mid):
                pass
            elif False:
                r = self.topic.produce(""",
    )
    s = Path(W).read_text()
    s += '''

def old_release(rec: "Recovery", user: str, mid: str) -> bool:
    """The old release: peek -> produce as retries -> trim by count -> unpark."""
    while True:
        batch = rec.parking.peek(user, 500)
        if not batch:
            if rec.parking.try_unpark(user):
                return True
            continue
        now = rec.clock()
        for value in batch:
            rec.topic.produce(user, mid_of(value), value, now, 0, True, "released")
        rec.parking.drop(user, len(batch))
'''
    Path(W).write_text(s)
elif d == "8":  # a failed attempt's state mutations leak into memory for the next message
    patch(
        UA,
        """            write, reason, error = states.write(mb, slot, ctx.state)
            return reason, error, write
        return reason, error, None""",
        """            write, reason, error = states.write(mb, slot, ctx.state)
            return reason, error, write
        if states is not None and slot is not None:
            slot.raw = states.spec.encode(ctx.state)
        return reason, error, None""",
    )
elif d == "9":  # the state change and the done-flag in two calls, not one atomic step
    patch(
        DD,
        """                return await self._reporting(self.store.commit(ids, writes, op_id))  # type: ignore[attr-defined]""",
        """                refused = await self._reporting(self.store.commit([], [(f"{m}#state", w) for m, w in writes], op_id))  # type: ignore[attr-defined]
                refused = {m.split("#")[0] for m in refused}
                await self._reporting(self.store.mark_done(ids + [m for m, _ in writes if m not in refused]))
                return refused""",
    )
elif d == "10":  # the batch read's parking flags ignored: a parked user's message runs
    patch(
        IO,
        """    if order is None or not at:
        return codes""",
        """    if True:
        return codes""",
    )
elif d == "11":  # a stateful handler's done-flag check bypassed (policy process)
    patch(
        UA,
        """            dedup.require_checks()  # never run a done message against a state holding it
""",
        "",
    )
else:
    raise SystemExit(f"no defect {d}")
