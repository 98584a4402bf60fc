"""WeCom credentials and callback settings (secrets come from env, never from logs)."""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr


class WeComSettings(BaseModel):
    corp_id: str = "wwqywxraydemo0001"
    # Callback Token and EncodingAESKey (43 chars) from the kf callback configuration page.
    token: SecretStr = SecretStr("qywxraydevtoken")
    encoding_aes_key: SecretStr = SecretStr("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG")
    kf_secret: SecretStr = SecretStr("qywx-ray-dev-secret")
    api_base: str = "https://qyapi.weixin.qq.com/cgi-bin"
    callback_max_skew_s: int = 300
    callback_max_body_bytes: int = 65_536
    # A callback body not complete this long after the request arrived is refused (408)
    # before it is counted in flight: slow or stalled bodies must not take the slots of
    # real callbacks. WeCom sends ~500 bytes at once and gives up after 5 s itself.
    callback_body_timeout_s: float = Field(default=5.0, gt=0, le=60)
    http_timeout_s: float = 10.0
    max_retries: int = 4
    retry_base_s: float = 0.2
    retry_max_s: float = 5.0
    # Refresh the cached access_token this long before WeCom says it expires.
    token_refresh_margin_s: int = 300
    # Callback replay-cache lookups slower than this fail open (Redis slow or down).
    callback_replay_timeout_s: float = 0.5
