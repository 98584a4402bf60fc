"""A dedicated user actor is a new Ray worker process per user: what it imports and builds
at start is paid once per new user (bench/bench_actor_start.py measures it).

- Importing the actor module (`qywx_ray.consume.hosts`) leaves out the WeCom models
  (~35 ms: hundreds of pydantic classes; imported at the first typed message), the
  WeCom HTTP client, the Kafka client library and the ingest web stack.
- The drain-token sink every host builds creates no Kafka producer until a drain sends
  its first token, and then exactly one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from qywx_ray.dlq import tokens as tokens_mod
from qywx_ray.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
NOT_IMPORTED = (
    "qywx_ray.wecom.models",
    "qywx_ray.wecom.client",
    "confluent_kafka",
    "fastapi",
    "starlette",
    "httpx",
)


def test_actor_module_leaves_out_heavy_modules() -> None:
    code = (
        "import json, sys\n"
        "import qywx_ray.consume.hosts\n"
        f"print(json.dumps([m for m in {list(NOT_IMPORTED)!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_typed_message_still_parses_wecom_messages() -> None:
    """The lazy import must not change what a typed handler receives."""
    from qywx_ray.consume.handlers import typed_message
    from qywx_ray.envelope import Envelope

    raw = {
        "msgid": "m1",
        "open_kfid": "kf1",
        "external_userid": "u1",
        "send_time": 1,
        "origin": 3,
        "msgtype": "text",
        "text": {"content": "hi"},
    }
    msg = typed_message(Envelope.from_wecom(raw))
    assert type(msg).__module__ == "qywx_ray.wecom.models"
    assert msg.text.content == "hi"


class _FakeProducer:
    made: ClassVar[list[_FakeProducer]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.produced: list[tuple[str, bytes]] = []
        _FakeProducer.made.append(self)

    def produce(self, topic: str, key: bytes, value: bytes, headers: Any, on_delivery: Any) -> None:
        self.produced.append((topic, key))
        on_delivery(None, None)

    def flush(self, timeout: float) -> int:
        return 0


def test_drain_tokens_create_their_producer_at_the_first_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import confluent_kafka

    monkeypatch.setattr(confluent_kafka, "Producer", _FakeProducer)
    _FakeProducer.made = []
    settings = load_settings(profile="development")
    sink = tokens_mod.KafkaDrainTokens(settings)
    assert _FakeProducer.made == []  # building a host creates no Kafka client
    sink._send_blocking("kf1:u1", "m1", "kf1")
    sink._send_blocking("kf1:u1", "m2", "kf1")
    assert len(_FakeProducer.made) == 1
    topic = settings.kafka.main_topic.name
    assert _FakeProducer.made[0].produced == [(topic, b"kf1:u1"), (topic, b"kf1:u1")]
