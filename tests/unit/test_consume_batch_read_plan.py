"""`host_rules.batch_read_plan` (pure): what the one Redis call per delivery batch asks.

Property: whatever the batch (copies, retries, drain tokens, pending and recently done
ids) and whatever done-flags the store then finds, the messages the plan rates minus
those found done are exactly `sort_intake`'s fresh first deliveries, in arrival order;
the done-flags asked plus the cache's answers cover every asked id; every user with a
message to admit has its parking flag read."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qywx_ray.consume.host_rules import BATCH_READ_MAX_KEYS, batch_read_plan, sort_intake
from qywx_ray.consume.mailbox import Pending
from qywx_ray.consume.types import Delivery
from qywx_ray.envelope import Envelope

IDS = [f"m{i}" for i in range(8)]
USERS = ["a", "b", "c"]


def _item(offset: int, mid: str, user: str, kind: str) -> tuple[Delivery, Envelope]:
    retry, drain = kind in ("retry", "drain"), kind == "drain"
    d = Delivery("t", 0, offset, 1_000 + offset, user, b"", mid, "c0", int(retry), retry, drain)
    return d, Envelope(message_id=mid, open_kfid="kf", external_userid=user, msgtype="text")


batches = st.lists(
    st.tuples(
        st.sampled_from(IDS), st.sampled_from(USERS), st.sampled_from(["new", "retry", "drain"])
    ),
    max_size=12,
)
id_sets = st.sets(st.sampled_from(IDS))


@settings(max_examples=1000, deadline=None)
@given(batches, id_sets, id_sets, id_sets, st.booleans(), st.booleans())
def test_rated_minus_done_is_sort_intakes_fresh_firsts(
    raw: list[tuple[str, str, str]],
    pending_ids: set[str],
    recent: set[str],
    found: set[str],
    has_lot: bool,
    rates: bool,
) -> None:
    parsed = [_item(i, mid, user, kind) for i, (mid, user, kind) in enumerate(raw)]
    # a message id belongs to one user: the first user seen for it
    owner: dict[str, str] = {}
    parsed = [
        _item(d.offset, e.message_id, owner.setdefault(e.message_id, e.external_userid), k)
        for (d, e), (_, _, k) in zip(parsed, raw, strict=True)
    ]
    pending = {mid: Pending(*_item(-1, mid, owner.get(mid, "a"), "new"), []) for mid in pending_ids}
    ask = [e.message_id for _, e in parsed if e.message_id not in pending]
    plan = batch_read_plan(parsed, ask, recent, has_lot, rates)
    done = plan.known | (found & set(plan.ask))  # what the store answers
    assert set(plan.ask) | plan.known == set(ask)
    assert not set(plan.ask) & recent
    assert len(plan.ask) == len(set(plan.ask))
    assert plan.fits == (len(plan.ask) + len(plan.users) <= BATCH_READ_MAX_KEYS)
    intake = sort_intake(parsed, pending, done, recent, has_lot)
    firsts = [p.envelope.message_id for p in intake.fresh if not p.delivery.is_retry]
    rated = [r.message_id for r in plan.rate if r.message_id not in done]
    assert rated == (firsts if rates else [])
    for r in plan.rate:
        assert plan.ask[r.done_at - 1] == r.message_id
    admit_users = {p.envelope.external_userid for p in intake.fresh + intake.resume}
    if has_lot:
        assert admit_users <= set(plan.users)
    else:
        assert plan.users == []
