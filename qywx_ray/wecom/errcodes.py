"""WeCom errcodes: one list for the client, the syncer and the simulator.

Real WeCom codes (developer.work.weixin.qq.com "全局错误码"); -1 is also what our client
reports for its own transport failures (timeouts, connection errors, HTTP 5xx), which
WeCom's "system busy" behaves like: try again later.
"""

from __future__ import annotations

from enum import IntEnum


class ErrCode(IntEnum):
    OK = 0
    SYSTEM_BUSY = -1
    INVALID_SECRET = 40001
    INVALID_CORPID = 40013
    INVALID_TOKEN = 40014
    INVALID_PARAM = 40058  # also what kf/sync_msg answers for a cursor it does not accept
    MISSING_TOKEN = 41001  # no access_token parameter at all
    TOKEN_EXPIRED = 42001
    FREQ_LIMIT = 45009
    API_CONCURRENCY = 45033
    INVALID_SYNC_TOKEN = 95007  # the callback's sync token is invalid or expired
    SEND_LIMIT = 95026  # too many replies / no customer message within 48 h


# The access_token is no longer valid: refresh it and try once more.
TOKEN_INVALID = frozenset({ErrCode.INVALID_TOKEN, ErrCode.TOKEN_EXPIRED})
# Transient on WeCom's side: the client retries these with backoff.
RETRYABLE = frozenset({ErrCode.SYSTEM_BUSY, ErrCode.FREQ_LIMIT, ErrCode.API_CONCURRENCY})
# A pull whose sync token WeCom refused: pull again without it.
SYNC_TOKEN_INVALID = frozenset({ErrCode.INVALID_SYNC_TOKEN})
# A syncer backs off (instead of retrying at its normal pace) after these.
SYNC_BACKOFF = frozenset({ErrCode.FREQ_LIMIT, ErrCode.SYSTEM_BUSY})
