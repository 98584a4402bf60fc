"""Per-user state (consume/state.py) in HostCore, over in-memory fakes (no Redis, no Ray).

Each test asserts what the runtime decided: what a handler saw in `ctx.state`, what the
store holds, how many loads and commits it took, what was completed or dead-lettered.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from qywx_ray.consume.dedup import Deduplicator
from qywx_ray.consume.handlers import HandlerContext
from qywx_ray.consume.state import (
    MemoryStateStore,
    StateSlot,
    StateSpec,
    StateWrite,
    WriteGroup,
    commit_args,
    group_args,
    group_writes,
    next_write,
    pack_state,
    parse_loaded,
    stateful,
)
from qywx_ray.consume.types import Delivery
from qywx_ray.consume.user_actor import CoreOptions, HostCore
from qywx_ray.envelope import Envelope
from qywx_ray.errors import InfraError
from tests.helpers.host_fakes import Clock, Completions, Letters, until


def delivery(user: str, n: int, offset: int, **raw: Any) -> Delivery:
    env = Envelope(
        message_id=f"{user}-m{n}", open_kfid="kf1", external_userid=user, msgtype="text", raw=raw
    )
    return Delivery("t", 0, offset, int(time.time() * 1000), user, env.to_bytes(), "", "c0")


@stateful()
async def folding(message: Any, ctx: HandlerContext) -> None:
    """Appends the message id to state["seen"] (a fold whose result shows every
    application, in order), then fails if the message asks to: mutations first."""
    runs = ctx.options["runs"]
    runs[ctx.message_id] = runs.get(ctx.message_id, 0) + 1
    ctx.options["saw"].append((ctx.message_id, list(ctx.state.get("seen", []))))
    ctx.state.setdefault("seen", []).append(ctx.message_id)
    if ctx.envelope.raw.get("pad"):
        ctx.state["pad"] = "x" * int(ctx.envelope.raw["pad"])
    fail = ctx.envelope.raw.get("fail")
    if fail == "retryable":
        raise RuntimeError("downstream")
    if fail == "infra_once" and runs[ctx.message_id] == 1:
        raise InfraError("redis blip")


async def stateless(message: Any, ctx: HandlerContext) -> None:
    ctx.options["runs"][ctx.message_id] = 1
    assert ctx.state is None


def make_core(
    store: MemoryStateStore,
    *,
    handler: Any = folding,
    clock: Clock | None = None,
    fatal: list[str] | None = None,
    letters: Letters | None = None,
    **opts: Any,
) -> tuple[HostCore, Completions, dict[str, Any]]:
    options: dict[str, Any] = {"runs": {}, "saw": []}
    completions = Completions()
    core = HostCore(
        name="h0",
        handler=handler,
        dedup=Deduplicator(store, retry_max_s=0.05),
        completions=completions,
        dead_letters=letters or Letters(),
        options=CoreOptions(completion_flush_ms=1.0, handler_options=options, **opts),
        clock=clock or Clock(),
        on_fatal=(fatal.append if fatal is not None else None),
        state_store=store,
    )
    return core, completions, options


def seen(store: MemoryStateStore, user: str) -> list[str]:
    raw = store.states[user].raw
    return list(json.loads(raw)["seen"]) if raw else []


async def test_state_folds_each_message_once_and_new_users_load_in_one_round_trip() -> None:
    store = MemoryStateStore()
    core, done, _ = make_core(store)
    batch = [delivery(u, i, 10 * k + i) for i in range(4) for k, u in enumerate("ABC")]
    core.accept(batch)
    await until(lambda: len(done.done) == 12)
    for u in "ABC":
        assert seen(store, u) == [f"{u}-m{i}" for i in range(4)]
        assert store.states[u].version == 4
    assert len(store.loads) == 1
    assert sorted(store.loads[0]) == ["A", "B", "C"]
    assert store.done == {f"{u}-m{i}" for u in "ABC" for i in range(4)}


async def test_a_failed_attempt_leaves_no_mutation_behind() -> None:
    store = MemoryStateStore()
    letters = Letters()
    core, done, opts = make_core(store, letters=letters)
    core.accept([delivery("A", 0, 0), delivery("A", 1, 1, fail="retryable"), delivery("A", 2, 2)])
    await until(lambda: len(done.done) == 3)
    assert [x.reason for x in letters.letters] == ["downstream_error"]
    # m1 appended itself then failed: m2 saw (and the store holds) only m0's change.
    assert dict(opts["saw"])["A-m2"] == ["A-m0"]
    assert seen(store, "A") == ["A-m0", "A-m2"]


async def test_an_infra_retry_in_place_starts_from_a_fresh_copy() -> None:
    store = MemoryStateStore()
    core, done, opts = make_core(store, handler_infra_retry_s=10.0, redis_retry_max_s=0.01)
    core.accept([delivery("A", 0, 0, fail="infra_once")])
    await until(lambda: len(done.done) == 1)
    assert opts["runs"]["A-m0"] == 2
    assert [s for m, s in opts["saw"]] == [[], []]  # the retry did not see the first's append
    assert seen(store, "A") == ["A-m0"]


async def test_crash_between_handler_end_and_commit_reruns_but_applies_once() -> None:
    store = MemoryStateStore()
    fatal: list[str] = []
    first, done1, opts1 = make_core(store, fatal=fatal)
    batch = [delivery("A", i, i) for i in range(3)]
    first.accept([batch[0]])
    await until(lambda: len(done1.done) == 1)  # m0 committed
    store.fail_commits = True  # every commit now fails: handlers end, nothing is durable
    first.accept(batch[1:])
    await until(lambda: opts1["runs"].get("A-m2") == 1)
    assert len(done1.done) == 1  # m1, m2 ran but were not completed
    # "kill -9": the first host is gone (its tasks cancelled); the consumer re-delivers.
    tasks = [*first._bg, *first._workers, first.dedup._flusher, first._ingest_task]
    for t in tasks:
        if t is not None:
            t.cancel()  # its pending commit (retrying) dies with it
    store.fail_commits = False
    second, done2, opts2 = make_core(store, fatal=fatal)
    second.accept(batch)  # m0 again (its commit was durable) and m1, m2
    await until(lambda: len(done2.done) == 3)
    runs = {m: opts1["runs"].get(m, 0) + opts2["runs"].get(m, 0) for m in ("A-m0", "A-m1", "A-m2")}
    assert runs == {"A-m0": 1, "A-m1": 2, "A-m2": 2}  # handler re-ran m1, m2 ...
    assert seen(store, "A") == ["A-m0", "A-m1", "A-m2"]  # ... their changes applied once
    assert dict(opts2["saw"])["A-m1"] == ["A-m0"]  # re-run against the OLD state
    assert fatal == []


async def test_crash_after_commit_skips_the_message() -> None:
    store = MemoryStateStore()
    first, done1, _ = make_core(store)
    first.accept([delivery("A", 0, 0)])
    await until(lambda: len(done1.done) == 1)
    second, done2, opts2 = make_core(store)
    second.accept([delivery("A", 0, 0), delivery("A", 1, 1)])
    await until(lambda: len(done2.done) == 2)
    assert opts2["runs"] == {"A-m1": 1}
    assert seen(store, "A") == ["A-m0", "A-m1"]
    assert dict(opts2["saw"])["A-m1"] == ["A-m0"]  # loaded on activation


async def test_stale_writer_is_refused_and_never_completes() -> None:
    """Two hosts race on one user (a rebalance): the second commit on the same version is
    refused, nothing of it is written, the message is not completed, the host restarts."""
    store = MemoryStateStore()
    fatal: list[str] = []
    a, done_a, _ = make_core(store, fatal=fatal)
    b, done_b, _ = make_core(store, fatal=fatal)
    gate = asyncio.Event()
    store_load = store.load

    async def slow_load(users: Any) -> dict[str, StateSlot]:
        got = await store_load(users)
        await gate.wait()
        return got

    store.load = slow_load  # type: ignore[method-assign]
    a.accept([delivery("A", 0, 0)])
    b.accept([delivery("A", 1, 1)])
    await until(lambda: len(store.loads) == 2)  # both loaded version 0
    gate.set()
    await until(lambda: len(done_a.done) + len(done_b.done) == 1 and fatal != [])
    assert fatal == ["state commit refused"]
    assert store.states["A"].version == 1
    assert len(seen(store, "A")) == 1
    assert len(store.refused) == 1
    assert store.refused[0] not in store.done


async def test_state_too_large_is_a_dead_letter_and_the_old_state_stays() -> None:
    store = MemoryStateStore()
    letters = Letters()
    core, done, _ = make_core(store, letters=letters, state_max_bytes=200)
    core.accept([delivery("A", 0, 0), delivery("A", 1, 1, pad=500), delivery("A", 2, 2)])
    await until(lambda: len(done.done) == 3)
    assert [(x.reason, x.retryable, x.message_id) for x in letters.letters] == [
        ("state_too_large", False, "A-m1")
    ]
    assert "exceeds the limit of 200" in letters.letters[0].error
    assert seen(store, "A") == ["A-m0", "A-m2"]
    assert "A-m1" not in store.done


async def test_idle_expiry_drops_the_state_and_the_next_activation_reloads_it() -> None:
    store = MemoryStateStore()
    clock = Clock()
    core, done, opts = make_core(store, clock=clock, idle_lifetime_s=60.0)
    core.accept([delivery("A", 0, 0)])
    await until(lambda: len(done.done) == 1)
    clock.t += 61
    assert core.sweep() == ["A"]
    await until(lambda: "A" not in core.mailboxes)
    core.accept([delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    assert store.loads == [["A"], ["A"]]
    assert dict(opts["saw"])["A-m1"] == ["A-m0"]
    assert seen(store, "A") == ["A-m0", "A-m1"]


async def test_stateless_handler_costs_no_load_and_no_state_commit() -> None:
    store = MemoryStateStore()
    core, done, _ = make_core(store, handler=stateless)
    core.accept([delivery("A", i, i) for i in range(5)])
    await until(lambda: len(done.done) == 5)
    assert store.loads == []
    assert store.commits == 0
    assert store.states == {}


async def test_redis_down_policy_process_still_waits_for_the_state_commit() -> None:
    store = MemoryStateStore()
    core, done, opts = make_core(store, redis_down_policy="process")
    core.dedup.policy = "process"
    core.accept([delivery("A", 0, 0)])
    await until(lambda: len(done.done) == 1)
    store.fail_commits = True  # Redis goes down after the check: only the commit fails
    core.accept([delivery("A", 1, 1)])
    await until(lambda: opts["runs"].get("A-m1") == 1)
    await asyncio.sleep(0.1)
    assert len(done.done) == 1  # a state change is never bypassed
    store.fail_commits = False
    await until(lambda: len(done.done) == 2)
    assert seen(store, "A") == ["A-m0", "A-m1"]


async def test_policy_process_redelivered_done_message_never_runs_on_a_state_holding_it() -> None:
    """Simulator seed 106340: a host crashes after a commit (state and done-flag durable)
    but before its offset commits; Redis is down when the new host takes the re-delivery.
    Policy process used to bypass the done-flag check, so the done message ran against a
    state loaded with its change in it, and the user's next message started from that
    doubled state (its commit refused only later). A stateful handler's dedup check
    waits for Redis instead, like its state load."""
    store = MemoryStateStore()
    first, done1, _ = make_core(store)
    first.accept([delivery("A", 0, 0)])
    await until(lambda: len(done1.done) == 1)  # m0: state and done-flag durable
    fatal: list[str] = []
    second, done2, opts = make_core(store, fatal=fatal, redis_down_policy="process")
    second.dedup.policy = "process"
    store.down = True
    second.accept([delivery("A", 0, 0), delivery("A", 1, 1)])  # re-delivered from offset 0
    await until(lambda: not second.dedup.redis_ok)  # the intake's check met the outage
    store.down = False
    await until(lambda: "A-m1" in opts["runs"] or bool(fatal))
    assert "A-m0" not in opts["runs"]  # done: skipped, not re-run
    assert dict(opts["saw"])["A-m1"] == ["A-m0"]  # m0 applied once in what m1 starts from
    await until(lambda: len(done2.done) == 2)
    assert fatal == []
    assert seen(store, "A") == ["A-m0", "A-m1"]


class Menu(BaseModel):
    step: str = "start"
    turns: int = 0


async def test_pydantic_model_state() -> None:
    @stateful(Menu)
    async def bot(message: Any, ctx: HandlerContext) -> None:
        assert isinstance(ctx.state, Menu)
        ctx.state.turns += 1
        ctx.state.step = ctx.envelope.raw.get("go", ctx.state.step)

    store = MemoryStateStore()
    core, done, _ = make_core(store, handler=bot)
    core.accept([delivery("A", 0, 0, go="faq"), delivery("A", 1, 1)])
    await until(lambda: len(done.done) == 2)
    assert Menu.model_validate_json(store.states["A"].raw) == Menu(step="faq", turns=2)


def test_next_write_unchanged_keeps_the_version_and_a_resend_is_answered_as_applied() -> None:
    spec = StateSpec()
    slot = StateSlot(3, b'{"a":1}')
    same = next_write(spec, slot, "A", {"a": 1}, 100)
    assert same == StateWrite("A", 3, None)
    assert slot.version == 3
    changed = next_write(spec, slot, "A", {"a": 2}, 100)
    assert changed == StateWrite("A", 3, b'{"a":2}')
    assert slot.version == 4

    store = MemoryStateStore()
    store.states["A"] = StateSlot(3, b'{"a":1}')
    assert asyncio.run(store.commit([], [("m", changed)], "op1")) == set()
    assert asyncio.run(store.commit([], [("m", changed)], "op1")) == set()  # lost reply, resent
    assert store.states["A"] == StateSlot(4, b'{"a":2}')
    assert store.commits == 1
    assert asyncio.run(store.commit([], [("m2", changed)], "op2")) == {"m2"}  # stale: refused


def test_group_writes_merges_a_users_chain_and_splits_on_a_break() -> None:
    from qywx_ray.consume.state import StateWrite, WriteGroup, group_writes

    writes = [
        ("a1", StateWrite("A", 3, b"1")),
        ("b1", StateWrite("B", 0, None)),
        ("a2", StateWrite("A", 4, None)),  # unchanged: chains, no bump
        ("a3", StateWrite("A", 4, b"3")),
        ("b2", StateWrite("B", 0, b"x")),
        ("a4", StateWrite("A", 9, b"9")),  # a reload in between: a new group of A
    ]
    assert group_writes(writes) == [
        WriteGroup("A", 3, 5, b"3", ["a1", "a2", "a3"]),
        WriteGroup("B", 0, 1, b"x", ["b1", "b2"]),
        WriteGroup("A", 9, 10, b"9", ["a4"]),
    ]


def test_the_stored_layout_is_a_padded_version_then_the_state() -> None:
    """One string per user: the commit script reads the version as its first 20 bytes
    and the client sends the new version padded to them (consume/state.py: Versions)."""
    assert pack_state(12, b'{"n":1}') == b"00000000000000000012" + b'{"n":1}'
    got = [b"00000000000000000012", b'{"n":1}', "0", ""]  # as LOAD_LUA answers
    assert parse_loaded(["a", "b"], got) == {"a": StateSlot(12, b'{"n":1}'), "b": StateSlot(0, b"")}
    group = WriteGroup("a", 12, 13, b'{"n":2}', ["m1"])
    keys, argv = group_args("op", [], [group], "d:{}".format, 60, 600)
    assert keys == [b"qywx:state-commit:op", b"qywx:state:a", b"d:m1"]
    assert argv[3:] == [b"12 1", pack_state(13, b'{"n":2}')]  # heads, then each value
    unchanged = WriteGroup("a", 12, 12, None, ["m1", "m2"])
    assert group_args("op", [], [group, unchanged], "d:{}".format, 60, 600)[1][3:] == [
        b"12 1,12 2",
        pack_state(13, b'{"n":2}'),
        b"",  # unchanged: nothing to store
    ]


def test_json_state_encoding_orjson_with_the_stdlib_as_fallback() -> None:
    import uuid

    from qywx_ray.consume.state import StateSpec, decode_json, encode_json

    u = uuid.UUID(int=1)
    assert encode_json({"f": float("nan"), 1: "é", "u": u}) == (
        b'{"f":null,"1":"\xc3\xa9","u":"00000000-0000-0000-0000-000000000001"}'
    )
    big = {"n": 2**70}  # beyond orjson's 64 bits: the stdlib writes it
    assert decode_json(encode_json(big)) == big
    assert decode_json(b'{"x":NaN}')["x"] != decode_json(b'{"x":NaN}')["x"]  # old states
    with pytest.raises(TypeError, match="set"):  # not JSON: refused by both encoders
        StateSpec().encode({"s": {1}})


writes_of_a_flush = st.lists(
    st.tuples(
        st.sampled_from(["A", "B", "C", "D"]),
        st.integers(min_value=0, max_value=3),
        st.one_of(st.none(), st.binary(max_size=8)),
    ),
    max_size=6,
)


@given(writes_of_a_flush, st.lists(st.sampled_from(["p1", "p2"]), max_size=2))
def test_commit_args_are_the_grouped_arguments(
    raw: list[tuple[str, int, bytes | None]], plain: list[str]
) -> None:
    """commit_args' one-pass path (every user once) sends exactly what grouping would,
    and whatever the flush, the script's group indexes refer to group_writes' order."""
    writes = [(f"m{i}", StateWrite(u, v, d)) for i, (u, v, d) in enumerate(raw)]
    done = [f"d:{p}" for p in plain]
    grouped = group_args("op", done, group_writes(writes), "d:{}".format, 60, 600)
    assert commit_args("op", done, writes, "d:{}".format, 60, 600) == grouped
