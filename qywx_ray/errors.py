"""One exception tree for the whole package, so callers can catch precisely.

Every error a user can cause (bad config, bad input) carries a message that says
what is wrong and how to fix it; nothing here ever includes a secret.
"""

from __future__ import annotations


class QywxError(Exception):
    """Root of every error raised by qywx_ray."""


class ConfigError(QywxError):
    """The configuration is invalid or does not match the running infrastructure."""


class TopicConfigError(ConfigError):
    """A Kafka topic cannot be created, or exists with settings that differ from the profile."""


class InfraError(QywxError):
    """A local service (Kafka, Redis) could not be installed, started or reached."""


class CryptoError(QywxError):
    """A WeCom callback failed signature verification or decryption."""


class WeComError(QywxError):
    """WeCom answered with a non-zero errcode."""

    def __init__(self, errcode: int, errmsg: str, *, api: str = "") -> None:
        self.errcode = errcode
        self.errmsg = errmsg
        self.api = api
        super().__init__(f"WeCom {api or 'API'} error {errcode}: {errmsg}")


class EnvelopeError(QywxError):
    """A Kafka record is not a valid message envelope (poison message)."""
