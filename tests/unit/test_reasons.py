"""One failure-reason vocabulary: the wire values, the old spellings, and what the docs name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from qywx_ray.consume import state as consume_state
from qywx_ray.consume import types as consume_types
from qywx_ray.dlq import message as dlq_message
from qywx_ray.reasons import DENY_REASONS, RETRYABLE_REASONS, FailureReason

ROOT = Path(__file__).resolve().parents[2]

# The wire values as released: DLQ records on Kafka, Redis index keys and metric labels
# carry them, so this list only ever grows.
RELEASED = {
    "RATE_LIMITED": "rate_limited",
    "USER_BLOCKED": "user_blocked",
    "CIRCUIT_OPEN": "circuit_open",
    "QUEUE_FULL": "queue_full",
    "PROCESS_TIMEOUT": "process_timeout",
    "KAFKA_FAILURE": "kafka_failure",
    "INVALID_MESSAGE": "invalid_message",
    "DOWNSTREAM_ERROR": "downstream_error",
    "SYSTEM_OVERLOAD": "system_overload",
    "STATE_TOO_LARGE": "state_too_large",
}


def test_values_are_the_released_wire_values_and_unique() -> None:
    assert {r.name: r.value for r in FailureReason} == RELEASED
    values = [r.value for r in FailureReason]
    assert len(values) == len(set(values))


def test_deny_and_retryable_sets_are_reasons() -> None:
    assert set(FailureReason) >= DENY_REASONS
    assert set(FailureReason) >= RETRYABLE_REASONS
    # A permanent failure must never be marked retryable.
    assert FailureReason.INVALID_MESSAGE not in RETRYABLE_REASONS
    assert FailureReason.STATE_TOO_LARGE not in RETRYABLE_REASONS


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (consume_types.REASON_INVALID, FailureReason.INVALID_MESSAGE),
        (consume_types.REASON_DOWNSTREAM, FailureReason.DOWNSTREAM_ERROR),
        (consume_types.REASON_TIMEOUT, FailureReason.PROCESS_TIMEOUT),
        (consume_types.REASON_RATE_LIMITED, FailureReason.RATE_LIMITED),
        (consume_types.REASON_BLOCKED, FailureReason.USER_BLOCKED),
        (consume_types.REASON_CIRCUIT_OPEN, FailureReason.CIRCUIT_OPEN),
        (consume_types.REASON_QUEUE_FULL, FailureReason.QUEUE_FULL),
        (consume_state.REASON_STATE_TOO_LARGE, FailureReason.STATE_TOO_LARGE),
    ],
)
def test_old_consume_spellings_map_to_the_enum(old: str, new: FailureReason) -> None:
    # The consume aliases stay plain str (what travels through Ray), equal to the member.
    assert type(old) is str
    assert FailureReason(old) is new


def test_old_enum_names_are_the_one_enum() -> None:
    assert dlq_message.FailureReason is FailureReason
    assert consume_types.RETRYABLE_REASONS is RETRYABLE_REASONS


def test_parse_reads_unknown_values_as_downstream_error() -> None:
    assert FailureReason.parse("queue_full") is FailureReason.QUEUE_FULL
    assert FailureReason.parse("from_a_newer_release") is FailureReason.DOWNSTREAM_ERROR


def _reason_constants() -> list[tuple[str, str, str]]:
    """Every module-level `REASON_* = "literal"` left in the package."""
    found = []
    for path in (ROOT / "qywx_ray").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if (
                        isinstance(target, ast.Name)
                        and target.id.startswith("REASON_")
                        and isinstance(node.value, ast.Constant)
                        and isinstance(node.value.value, str)
                    ):
                        found.append((str(path.relative_to(ROOT)), target.id, node.value.value))
    return found


def test_every_reason_literal_in_the_package_is_a_reason() -> None:
    # Metric labels and DLQ records get their reason from these constants or the enum.
    unknown = [c for c in _reason_constants() if c[2] not in RELEASED.values()]
    assert unknown == []


_DOC_KEYWORD = re.compile(r"dead[- ]letter(?:ed)?(?: as)?|reason", re.IGNORECASE)


def _reasons_named_in_docs() -> list[tuple[str, int, str]]:
    """Backticked words right after "reason" / "dead-lettered as" in README and docs/."""
    named = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in _DOC_KEYWORD.finditer(line):
                clause = re.split(r"[.|;(]", line[match.end() :], maxsplit=1)[0]
                for word in re.findall(r"`([a-z][a-z0-9_]*)`", clause):
                    named.append((str(path.relative_to(ROOT)), number, word))
    return named


def test_every_reason_the_docs_name_exists() -> None:
    named = _reasons_named_in_docs()
    assert named, "the docs name reasons; the scan found none (pattern broken?)"
    assert [n for n in named if n[2] not in RELEASED.values()] == []
