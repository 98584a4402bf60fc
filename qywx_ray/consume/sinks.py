"""Loading the consume hooks named in settings ("module:factory").

The real hooks: `consume.admission` (protect/admission.py, rate limiter),
`consume.dead_letter_sink` (dlq/sink.py, the DLQ format the recovery actor reads) and
`consume.retry_order` (dlq/parking.py). A JSON test sink lives in qywx_ray/testing/sinks.py.
"""

from __future__ import annotations

import importlib
from typing import Any

from qywx_ray.consume.types import Admission, AllowAll, DeadLetterSink, RetryOrder
from qywx_ray.errors import QywxError
from qywx_ray.settings import Settings


def _factory(spec: str, settings: Settings) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise QywxError(f"hook factory {spec!r} cannot be imported: {exc}") from exc
    return fn(settings)


def make_admission(settings: Settings) -> Admission:
    """`consume.admission` = "module:factory(settings) -> Admission"; default allow-all."""
    spec = settings.consume.admission
    return _factory(spec, settings) if spec else AllowAll()


def make_dead_letter_sink(settings: Settings) -> DeadLetterSink:
    """`consume.dead_letter_sink` = "module:factory(settings) -> DeadLetterSink"."""
    spec = settings.consume.dead_letter_sink or "qywx_ray.dlq.sink:make_sink"
    return _factory(spec, settings)  # type: ignore[no-any-return]


def make_retry_order(settings: Settings) -> RetryOrder | None:
    """`consume.retry_order` = "module:factory(settings) -> RetryOrder"; empty = none."""
    spec = settings.consume.retry_order
    return _factory(spec, settings) if spec else None
