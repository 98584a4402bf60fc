"""Consume-pipeline settings for integration tests, and the recording handler's key.

Tests import from here, never from conftest or another test module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qywx_ray.settings import Settings

# Where the recording handler (`record_key`'s default) writes "user|message_id" in order.
RECORD = "qywx:test:record"


def consume_test_settings(
    make_settings: Callable[..., Settings],
    unique: str,
    *,
    kafka_consumer: dict[str, Any] | None = None,
    **consume: Any,
) -> Settings:
    """Small, fast consume settings with the recording handler and no protection
    (these tests push many messages per user at once)."""
    base: dict[str, Any] = {
        "namespace": f"qywx-test-{unique}",
        "name_prefix": f"t{unique}",
        "handler": "qywx_ray.consume.handlers:recording_handler",
        "num_hosts": 2,
        "num_consumers": 1,
        "commit_interval_s": 0.2,
        "completion_flush_ms": 10,
        "health_check_interval_s": 0.5,
        "handler_timeout_s": 20,
        "revoke_wait_s": 10,
        **consume,
    }
    return make_settings(
        consume=base,
        protect={"enabled": False},
        kafka={
            "consumer": {
                "session_timeout_ms": 6000,
                "heartbeat_interval_ms": 1000,
                **(kafka_consumer or {}),
            }
        },
    )
