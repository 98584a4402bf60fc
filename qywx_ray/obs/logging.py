"""Structured logs: one JSON object per line, with `event` and key-value context.

Use `log = get_logger(__name__)` then `log.warning("spool.degraded", user=..., count=...)`.
Never pass secrets as fields.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            payload.update(fields)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


class StructLogger:
    """A thin wrapper giving `log.info("event", key=value)`."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: bool = False, **fields: Any) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, **fields)

    def error(self, event: str, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info=exc_info, **fields)


def get_logger(name: str) -> StructLogger:
    return StructLogger(logging.getLogger(name))


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    root = logging.getLogger("qywx_ray")
    root.setLevel(level)
    if not any(getattr(h, "_qywx", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._qywx = True  # type: ignore[attr-defined]
        handler.setFormatter(
            JsonFormatter()
            if fmt == "json"
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        )
        root.addHandler(handler)
        root.propagate = False
    logging.Formatter.converter = time.gmtime
