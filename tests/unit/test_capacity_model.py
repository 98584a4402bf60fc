"""docs/capacity.md shows what bench/capacity.py computes, and the model behaves."""

from __future__ import annotations

import re
from pathlib import Path

from bench import capacity

ROOT = Path(__file__).resolve().parents[2]


def test_capacity_page_table_is_the_models() -> None:
    page = (ROOT / "docs" / "capacity.md").read_text()
    m = re.search(r"<!-- capacity-table[^>]*-->\n(.*?)\n<!-- /capacity-table -->", page, re.S)
    assert m, "the generated table's markers are gone from docs/capacity.md"
    assert m.group(1).strip() == capacity.table().strip(), "run: python bench/capacity.py"


def test_model_grows_with_load_and_users() -> None:
    small, busy = capacity.size(10_000, 1_000), capacity.size(10_000, 100_000)
    assert busy.consumers > small.consumers
    assert busy.hosts > small.hosts
    assert busy.nodes > small.nodes
    many = capacity.size(10_000_000, 1_000)
    assert many.hosts > small.hosts
    assert many.memory_gib > 10 * small.memory_gib
    for users in capacity.USERS:
        for rate in capacity.RATES:
            s = capacity.size(users, rate)
            assert s.consumers <= s.partitions  # a consumer without a partition idles


def test_model_inputs_are_the_measured_ones() -> None:
    """Changing an input is a decision: the page quotes them."""
    page = (ROOT / "docs" / "capacity.md").read_text()
    for value in ("20.3 µs", "15.8 µs", "42.8 µs", "4.7 KiB", "7.4 KiB", "20,738", "132.9 bytes"):
        assert value in page, value
    assert (capacity.SYNCER_US, capacity.CONSUMER_US, capacity.HOST_US) == (20.3, 15.8, 42.8)
    assert capacity.DONE_FLAG_BYTES == 132.9


def test_done_flag_memory_is_rate_times_window() -> None:
    # a day at 10,000 msg/s: 864 M flags of 132.9 bytes
    assert round(capacity.done_flags_gib(10_000), 1) == 106.9
    assert capacity.done_flags_gib(10_000, ttl_s=3_600) == capacity.done_flags_gib(10_000) / 24
    from qywx_ray.consume.settings import ConsumeSettings

    assert ConsumeSettings().dedup_ttl_s == capacity.DEDUP_TTL_S  # the table's window
