"""Put one fixed ingest defect back, to show the ingest simulator finds it ("teeth").

EDITS FILES IN PLACE: run it in a throwaway git worktree, never in your checkout:
    git worktree add /tmp/teeth HEAD && cd /tmp/teeth
    python tests/sim_ingest/reinject.py 1
    PYTHONPATH=$PWD python -m tests.sim_ingest.run --seeds 0:3000 --list

1  the spool trim is not fenced by the replay lock and drops a count, not what was peeked
3  a cursor WeCom rejects is retried forever (no restart from the oldest message)
4  a lost fence counter restarts fences at 1: every later cursor commit is refused
5  malformed WeCom messages: "origin": null raises TypeError (the pull fails for good),
   a bad number drops the message while the cursor moves past it
6  a fatal producer error is stored and never acted on (the producer is never rebuilt)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script, from anywhere
from tests.simkit.runner import patch

SPOOL = "qywx_ray/ingest/spool.py"
SYNCER = "qywx_ray/ingest/syncer.py"
LOCKS = "qywx_ray/ingest/locks.py"
ENVELOPE = "qywx_ray/envelope.py"
PRODUCER = "qywx_ray/ingest/producer.py"


d = sys.argv[1]
if d == "1":
    patch(SPOOL, "if redis.call('GET', KEYS[4]) ~= ARGV[2] then", "if false then")
    patch(
        SPOOL,
        "while matched < #head and redis.sha1hex(head[matched + 1]) == ARGV[i + 2 + matched] do",
        "while matched < #head do",
    )
elif d == "3":
    patch(
        SYNCER,
        "if restarted or not restart_after_rejection(exc.errcode, cursor, codes):",
        "if True:",
    )
elif d == "4":
    patch(LOCKS, "  if fence < floor then", "  if false then")
elif d == "5":
    patch(
        SYNCER,
        "env = ingest_envelope(msg, ingest_ts_ms=ingest_ts_ms)",
        "env = _old_envelope(msg, ingest_ts_ms)",
    )
    patch(
        ENVELOPE,
        "except (KeyError, TypeError, ValueError, ValidationError) as exc:",
        "except (KeyError, ValueError, ValidationError) as exc:",
    )
    s = Path(SYNCER).read_text()
    s += '''

def _old_envelope(msg: dict[str, Any], ingest_ts_ms: int) -> Envelope | None:
    """The old rule: a message that does not envelope is logged and dropped."""
    from qywx_ray.errors import EnvelopeError

    try:
        return Envelope.from_wecom(msg, ingest_ts_ms=ingest_ts_ms)
    except EnvelopeError:
        return None
'''
    Path(SYNCER).write_text(s)
elif d == "6":
    patch(PRODUCER, "if self._fatal_error is None or self._closed:", "if True:")
else:
    sys.exit(f"unknown defect {d}: 1, 3, 4, 5 or 6")
