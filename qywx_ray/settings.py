"""One typed settings object for the whole system.

Sources, highest priority first: explicit overrides (tests), environment variables
(`QYWX_` prefix, `__` between levels, e.g. `QYWX_KAFKA__BOOTSTRAP_SERVERS`), the YAML
file (`QYWX_CONFIG`, else `config/<QYWX_PROFILE>.yaml`, profile `development` by default),
then the defaults in each package's settings module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from qywx_ray.admin.settings import AdminSettings
from qywx_ray.consume.settings import ConsumeSettings
from qywx_ray.dlq.settings import DLQSettings
from qywx_ray.errors import ConfigError
from qywx_ray.ingest.settings import IngestSettings
from qywx_ray.kafka.settings import KafkaSettings
from qywx_ray.obs.settings import ObsSettings
from qywx_ray.placement import PlacementSettings
from qywx_ray.protect.settings import ProtectSettings
from qywx_ray.secret_policy import is_enforced, refusal_message, secret_findings
from qywx_ray.store.settings import RedisSettings
from qywx_ray.wecom.settings import WeComSettings

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
PROFILES = ("development", "production")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="QYWX_", env_nested_delimiter="__", extra="forbid", frozen=False
    )

    profile: str = "development"
    data_dir: str = ".qywx-data"  # made absolute when the settings are loaded (below)
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    wecom: WeComSettings = WeComSettings()
    ingest: IngestSettings = IngestSettings()
    consume: ConsumeSettings = ConsumeSettings()
    protect: ProtectSettings = ProtectSettings()
    dlq: DLQSettings = DLQSettings()
    admin: AdminSettings = AdminSettings()
    obs: ObsSettings = ObsSettings()
    placement: PlacementSettings = PlacementSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (the YAML merged with explicit overrides) is given last: env beats the file.
        return (env_settings, init_settings)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: str) -> str:
        """Fixed once, where the settings are loaded (the CLI or driver), and shipped to
        actors as an absolute path: a Ray worker's working directory is Ray's, so a
        relative path there would name a different directory in every process."""
        return str(Path(value).expanduser().resolve())

    @property
    def ray_namespace(self) -> str:
        return self.consume.namespace

    @property
    def dlq_emergency_dir(self) -> Path:
        """Absolute on every process (both settings are validated absolute)."""
        return Path(self.dlq.emergency_dir or Path(self.data_dir) / "dlq-emergency")


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def config_path(profile: str | None = None) -> Path:
    explicit = os.environ.get("QYWX_CONFIG")
    if explicit:
        return Path(explicit)
    profile = profile or os.environ.get("QYWX_PROFILE", "development")
    return REPO_CONFIG_DIR / f"{profile}.yaml"


def load_settings(
    path: str | Path | None = None,
    *,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    allow_default_secrets: bool = False,
) -> Settings:
    """Load and validate; any problem becomes a ConfigError naming the file and field.

    The production profile refuses built-in, demo and placeholder secrets here
    (secret_policy.py), so every entry point that loads settings — the CLI, the Serve
    application builder, the demo — refuses them before it starts anything. Only
    `qywx-ray doctor` (which reports them instead) and test harnesses that run the
    production topic layout on demo credentials pass `allow_default_secrets=True`.
    """
    file = Path(path) if path else config_path(profile)
    data: dict[str, Any] = {}
    if file.exists():
        try:
            loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{file}: the top level must be a mapping, got {type(loaded).__name__}"
            )
        data = loaded or {}
    elif path is not None:
        raise ConfigError(f"config file not found: {file}")
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({file}): {problems}") from exc
    if not allow_default_secrets and is_enforced(settings):
        findings = secret_findings(settings)
        if findings:
            raise ConfigError(f"invalid configuration ({file}): {refusal_message(findings)}")
    return settings
