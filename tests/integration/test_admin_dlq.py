"""Admin DLQ routes on a real Redis: auth, stats, filters, retry, batch retry, TTL purge,
streamed export of 10,000 letters, bad input."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from qywx_ray.admin.dlq import make_dlq_router
from qywx_ray.dlq.delay_queue import DelayQueue
from qywx_ray.dlq.index import DLQIndex
from qywx_ray.dlq.message import DeadLetterMessage, make_dead_letter
from qywx_ray.envelope import Envelope
from qywx_ray.reasons import FailureReason
from qywx_ray.settings import Settings

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "X-Admin-User": "alice"}
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def letter(
    i: int,
    reason: FailureReason,
    user: str,
    failure_time: float = T0,
    settings: Settings | None = None,
) -> DeadLetterMessage:
    from qywx_ray.dlq.settings import DLQSettings

    return make_dead_letter(
        reason=reason,
        failure_time=failure_time,
        settings=settings.dlq if settings else DLQSettings(),
        envelope=Envelope(
            message_id=f"m{i}",
            open_kfid="kf",
            external_userid=user,
            msgtype="text",
            raw={"i": i, "text": "含, 逗号\n和换行"},
        ),
        details=f"error {i}",
    )


@pytest.fixture
def app(
    make_settings: Callable[..., Settings], redis_client: redis.Redis
) -> tuple[TestClient, Settings, Clock]:
    settings = make_settings(admin={"token": TOKEN}, dlq={"ttl_s": 3600})
    clock = Clock()
    api = FastAPI()
    api.include_router(make_dlq_router(settings, redis_client=redis_client, clock=clock))
    return TestClient(api), settings, clock


def seed(redis_client: redis.Redis, settings: Settings) -> tuple[DLQIndex, DelayQueue]:
    index = DLQIndex(redis_client, settings.dlq.redis_prefix)
    queue = DelayQueue(redis_client, settings.dlq.redis_prefix)
    scheduled = [letter(i, FailureReason.DOWNSTREAM_ERROR, f"u{i % 3}") for i in range(6)]
    review = [letter(10 + i, FailureReason.INVALID_MESSAGE, "u0") for i in range(2)]
    index.record(scheduled, review)
    queue.schedule_many([(lt.entry_id(), T0 + 60, lt.to_bytes()) for lt in scheduled])
    return index, queue


def test_auth_required(app: tuple[TestClient, Settings, Clock]) -> None:
    client, _, _ = app
    for method, url in [
        ("GET", "/admin/dlq/stats"),
        ("GET", "/admin/dlq/messages"),
        ("POST", "/admin/dlq/retry/m1"),
        ("POST", "/admin/dlq/purge"),
        ("GET", "/admin/dlq/export"),
    ]:
        assert client.request(method, url).status_code == 401
        assert (
            client.request(method, url, headers={"Authorization": "Bearer nope"}).status_code == 401
        )


def test_stats_and_filters(
    app: tuple[TestClient, Settings, Clock], redis_client: redis.Redis
) -> None:
    client, settings, _ = app
    seed(redis_client, settings)
    stats = client.get("/admin/dlq/stats", headers=AUTH).json()
    assert stats["total"] == 8
    assert stats["manual_review_pending"] == 2
    assert stats["by_reason"]["downstream_error"] == 6
    assert stats["by_reason"]["invalid_message"] == 2
    assert stats["by_status"] == {"scheduled": 6, "retried": 0, "manual_review": 2}
    assert stats["scheduled_waiting"] == 6
    assert stats["emergency_pending"] == 0

    def ids(**params: object) -> list[str]:
        r = client.get("/admin/dlq/messages", params=params, headers=AUTH)
        assert r.status_code == 200, r.text
        return sorted(m["message_id"] for m in r.json()["messages"])

    assert ids(user="u1") == ["m1", "m4"]
    assert ids(user="u0") == ["m0", "m10", "m11", "m3"]
    assert ids(user="u0", reason="invalid_message") == ["m10", "m11"]
    assert ids(status="manual_review") == ["m10", "m11"]
    assert len(ids(limit=3)) == 3
    assert ids(user="nobody") == []
    for bad in ({"reason": "bogus"}, {"limit": 0}, {"limit": 10**7}, {"status": "x"}, {"user": ""}):
        assert client.get("/admin/dlq/messages", params=bad, headers=AUTH).status_code == 422


def test_retry_and_batch_retry_go_through_the_delay_queue(
    app: tuple[TestClient, Settings, Clock], redis_client: redis.Redis
) -> None:
    client, settings, clock = app
    index, queue = seed(redis_client, settings)
    clock.now = T0 + 5
    r = client.post("/admin/dlq/retry/m10", headers=AUTH)  # from manual review
    assert r.status_code == 200
    assert r.json() == {"message_id": "m10", "result": "scheduled"}
    assert queue.due_of("m10:0") == T0 + 5
    assert index.review_count() == 1
    assert client.post("/admin/dlq/retry/m2", headers=AUTH).status_code == 200
    assert queue.due_of("m2:0") == T0 + 5  # a waiting retry moved to now
    assert client.post("/admin/dlq/retry/nope", headers=AUTH).status_code == 404
    claimed = queue.claim_due(T0 + 5, 30, 100)
    assert {c.entry_id for c in claimed} == {"m10:0", "m2:0"}
    assert client.post("/admin/dlq/retry/m2", headers=AUTH).status_code == 409  # in flight
    r = client.post(
        "/admin/dlq/batch-retry", json={"user": "u0", "reason": "downstream_error"}, headers=AUTH
    )
    assert r.status_code == 200
    assert r.json() == {"scheduled": 2}
    assert queue.due_of("m0:0") == T0 + 5
    assert queue.due_of("m3:0") == T0 + 5
    assert queue.due_of("m1:0") == T0 + 60  # outside the filter: untouched
    for bad in ({"limit": -1}, {"reason": "bogus"}, {"unknown_field": 1}, [1, 2]):
        assert client.post("/admin/dlq/batch-retry", json=bad, headers=AUTH).status_code == 422


def test_purge_removes_only_expired(
    app: tuple[TestClient, Settings, Clock], redis_client: redis.Redis
) -> None:
    client, settings, clock = app
    index = DLQIndex(redis_client, settings.dlq.redis_prefix)
    queue = DelayQueue(redis_client, settings.dlq.redis_prefix)
    old = [letter(i, FailureReason.QUEUE_FULL, "u", T0 - 7200, settings) for i in range(3)]
    new = [letter(10 + i, FailureReason.QUEUE_FULL, "u", T0 - 60, settings) for i in range(2)]
    index.record(old + new, [])
    queue.schedule_many([(lt.entry_id(), T0 + 60, lt.to_bytes()) for lt in old + new])
    r = client.post("/admin/dlq/purge", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"purged": 3}
    assert index.total() == 2
    assert queue.counts() == (2, 0)
    assert client.post("/admin/dlq/purge", headers=AUTH).json() == {"purged": 0}
    clock.now = T0 + 3600
    assert client.post("/admin/dlq/purge", headers=AUTH).json() == {"purged": 2}


def test_export_10000_streamed(
    app: tuple[TestClient, Settings, Clock], redis_client: redis.Redis
) -> None:
    client, settings, _ = app
    index = DLQIndex(redis_client, settings.dlq.redis_prefix)
    reasons = [FailureReason.DOWNSTREAM_ERROR, FailureReason.PROCESS_TIMEOUT]
    for start in range(0, 10_000, 1000):
        index.record(
            [letter(i, reasons[i % 2], f"u{i % 10}", T0 + i) for i in range(start, start + 1000)],
            [],
        )
    t = time.monotonic()
    with client.stream("GET", "/admin/dlq/export", params={"format": "csv"}, headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        chunks = list(r.iter_bytes())
    csv_s = time.monotonic() - t
    assert len(chunks) > 1, "export must stream, not build one body"
    rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert len(rows) == 10_000
    assert len({r["message_id"] for r in rows}) == 10_000
    assert rows[0]["message_id"] == "m9999"  # newest first
    assert rows[0]["failure_details"] == "error 9999"
    assert rows[0]["status"] == "scheduled"

    r = client.get(
        "/admin/dlq/export", params={"format": "jsonl", "reason": "process_timeout"}, headers=AUTH
    )
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert len(lines) == 5_000
    assert {x["failure_reason"] for x in lines} == {"process_timeout"}
    assert lines[0]["original_message"]["raw"]["text"] == "含, 逗号\n和换行"
    assert (
        client.get("/admin/dlq/export", params={"format": "xml"}, headers=AUTH).status_code == 422
    )
    print(f"export 10,000 letters as CSV: {csv_s:.2f}s")


def test_csv_export_neutralises_formula_cells(
    app: tuple[TestClient, Settings, Clock], redis_client: redis.Redis
) -> None:
    """Issue 16.6: failure_details (and user ids) carry customer text; a cell starting with
    = + - @ tab or CR is a formula in a spreadsheet. OWASP's rule: prefix it with '."""
    client, settings, _clock = app
    index = DLQIndex(redis_client, settings.dlq.redis_prefix)
    hostile = ['=HYPERLINK("http://x")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx"]
    letters = [
        letter(i, FailureReason.DOWNSTREAM_ERROR, user).model_copy(update={"failure_details": text})
        for i, (user, text) in enumerate(
            zip(["=cmd|' /C calc'!A0", *hostile[1:]], hostile, strict=True)
        )
    ]
    index.record(letters, [])
    r = client.get("/admin/dlq/export", params={"format": "csv"}, headers=AUTH)
    assert r.status_code == 200
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert sorted(row["failure_details"] for row in rows) == sorted("'" + t for t in hostile)
    assert "'=cmd|' /C calc'!A0" in {row["user_id"] for row in rows}
    for row in rows:  # numbers (e.g. source_partition -1) stay numbers
        for value in row.values():
            numeric = value.lstrip("-").replace(".", "", 1).isdigit()
            assert numeric or not value or value[0] not in "=+-@\t\r", row
    # JSON lines are data, not a spreadsheet: unchanged.
    r = client.get("/admin/dlq/export", params={"format": "jsonl"}, headers=AUTH)
    assert sorted(json.loads(line)["failure_details"] for line in r.text.splitlines()) == sorted(
        hostile
    )


def test_undecodable_letter_is_skipped_counted_and_shown(
    app: tuple[TestClient, Settings, Clock], redis_client: redis.Redis
) -> None:
    """Issue 16.7: one record that is not a dead letter made /messages answer 500 and
    /export 200 with an empty body. Now the others are listed and exported, and the bad
    one is shown as undecodable (its id and why), never hidden."""
    client, settings, _clock = app
    index, _queue = seed(redis_client, settings)
    redis_client.hset(index.letters, "m3", b"\xff not json")
    redis_client.hset(index.letters, "m4", b'{"message_id": "m4"}')
    r = client.get("/admin/dlq/messages", headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 6
    assert len(body["messages"]) == 6
    assert "m3" not in {m["message_id"] for m in body["messages"]}
    assert body["undecodable_count"] == 2
    assert {u["message_id"] for u in body["undecodable"]} == {"m3", "m4"}
    assert all(u["status"] == "scheduled" and u["error"] for u in body["undecodable"])

    r = client.get("/admin/dlq/export", params={"format": "csv"}, headers=AUTH)
    assert r.status_code == 200
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 8
    bad = {row["message_id"]: row for row in rows if row["status"] == "undecodable"}
    assert set(bad) == {"m3", "m4"}
    assert all(row["failure_details"] for row in bad.values())

    r = client.get("/admin/dlq/export", params={"format": "jsonl"}, headers=AUTH)
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) == 8
    assert {x["message_id"] for x in lines if x["status"] == "undecodable"} == {"m3", "m4"}

    # Acting on it is refused with a reason, not a 500.
    r = client.post("/admin/dlq/retry/m3", headers=AUTH)
    assert r.status_code == 409
    assert "undecodable" in r.text
    assert client.post("/admin/dlq/batch-retry", headers=AUTH, json={}).status_code == 200
