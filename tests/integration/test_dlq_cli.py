"""`qywx-ray dlq …` subcommands against real Redis and Kafka."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import redis

from qywx_ray.dlq import cli, emergency
from qywx_ray.dlq.index import DLQIndex
from qywx_ray.settings import Settings
from tests.helpers.dlq import letters_for
from tests.helpers.kafka import create_topics, read_records

pytestmark = pytest.mark.integration


def test_cli_stats_list_retry_export_and_replay(
    make_settings: Callable[..., Settings],
    redis_client: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = make_settings()
    letters = letters_for(6, "c")
    DLQIndex(redis_client, settings.dlq.redis_prefix).record(letters[:4], letters[4:])
    emergency.write_letters(settings.dlq_emergency_dir, letters[:3], time.time())

    assert cli.main(["stats"], settings) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["total"] == 6
    assert stats["manual_review_pending"] == 2
    assert stats["emergency_pending"] == 3

    assert cli.main(["list", "--status", "manual_review"], settings) == 0
    assert sorted(x["message_id"] for x in json.loads(capsys.readouterr().out)) == ["c4", "c5"]

    assert cli.main(["retry", "c4"], settings) == 0
    assert json.loads(capsys.readouterr().out)["result"] == "scheduled"
    assert cli.main(["retry", "missing"], settings) == 1
    capsys.readouterr()

    assert cli.main(["export", "--format", "jsonl", "--limit", "10"], settings) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6

    with pytest.raises(SystemExit):
        cli.main(["export", "--format", "xml"], settings)
    capsys.readouterr()

    create_topics(settings, (settings.kafka.dlq_topic.name, 2))
    assert cli.main(["replay-emergency"], settings) == 0
    assert json.loads(capsys.readouterr().out)["published"] == 3
    assert cli.main(["replay-emergency"], settings) == 0
    assert json.loads(capsys.readouterr().out)["published"] == 0
    assert len(read_records(settings, settings.kafka.dlq_topic.name, 3)) == 3
    assert emergency.pending_count(settings.dlq_emergency_dir) == 0
