"""JSON-line output: a bench prints one JSON object per measurement on stdout and nothing
else there (diagnostics go to stderr); the first line of a process carries the machine facts."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from bench.machine import machine_facts
from bench.runs import RUN_ID_ENV, quick_mode


class Emitter:
    """Writes JSON lines; the first line of a process carries the machine facts."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._facts_written = False

    def emit(self, **fields: Any) -> dict[str, Any]:
        out = self.stream or sys.stdout
        if not self._facts_written:
            self._facts_written = True
            facts = {"kind": "machine", "ts": round(time.time(), 3), **machine_facts()}
            if fields.get("bench"):
                facts["bench"] = fields["bench"]
            run_id = os.environ.get(RUN_ID_ENV)
            if run_id:
                facts["run_id"] = run_id
            out.write(json.dumps(facts, sort_keys=True) + "\n")
        record: dict[str, Any] = {"ts": round(time.time(), 3), **fields}
        record.setdefault("kind", "measurement")
        record.setdefault("mode", "quick" if quick_mode() else "full")
        record.setdefault("load1", round(os.getloadavg()[0], 2))
        run_id = os.environ.get(RUN_ID_ENV)
        if run_id:
            record.setdefault("run_id", run_id)
        out.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        out.flush()
        return record

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Measurements inside are discarded (an unrecorded warm-up run)."""
        stream, facts_written = self.stream, self._facts_written
        with open(os.devnull, "w") as devnull:
            self.stream = devnull
            try:
                yield
            finally:
                self.stream, self._facts_written = stream, facts_written


_EMITTER = Emitter()


def emit(**fields: Any) -> dict[str, Any]:
    """Print one measurement as a JSON line on stdout, flushed.

    Expected fields: bench, case, metric, value, unit, run; anything else is context
    (record_size, partitions, users, mode, ...) and becomes a grouping dimension in the
    report, except per-run details, which belong under `extra`.
    """
    return _EMITTER.emit(**fields)


def log(message: str) -> None:
    """Human diagnostics go to stderr, never to the JSON stream."""
    print(message, file=sys.stderr, flush=True)
