"""Process settings: environment variables (prefix ``CITYPULSE_``) and an optional TOML file.

One frozen :class:`Settings` object is built in ``main()`` and passed down; nothing else reads
the environment. The TOML file is named by ``CITYPULSE_CONFIG`` (default ``citypulse.toml`` in
the working directory, when it exists); environment variables win over the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z0-9+.-]+://[^:/@]+):[^@]*@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (for logs)."""
    return _URL_PASSWORD.sub(r"\g<scheme>:***@", url)


class Settings(BaseSettings):
    """Everything a citypulse process can be told. Units are in the names."""

    model_config = SettingsConfigDict(
        env_prefix="CITYPULSE_",
        frozen=True,
        extra="forbid",
        env_nested_delimiter="__",
    )

    # -- endpoints ----------------------------------------------------------------------------
    mqtt_url: str = Field("mqtt://127.0.0.1:1883", description="mqtt:// or mqtts:// broker URL")
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_ca_file: Path | None = Field(None, description="CA bundle for mqtts:// (system default)")
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_SSL, ...")
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/citypulse")
    alertmanager_url: str | None = None

    # -- files --------------------------------------------------------------------------------
    registry: Path = Field(Path("deploy/registry.example.yaml"), description="sensor registry")
    rules: Path = Field(Path("rules/examples"), description="directory of rule files")
    state_dir: Path = Field(Path(".state"), description="embedded stack data and logs")

    # -- kafka --------------------------------------------------------------------------------
    topic_prefix: str = Field("citypulse", description="prefix of every Kafka topic")
    partitions: int = Field(6, ge=1, description="partitions of topics created at start-up")
    replication_factor: int = Field(1, ge=1)
    kafka_idempotence: bool = Field(
        False, description="idempotent producer; Apache Kafka supports it, tansu does not"
    )
    kafka_linger_ms: int = Field(
        5,
        ge=0,
        description="how long records may wait to be batched: the producers' linger; also the "
        "collector's turn unless collector_turn_ms is set",
    )
    kafka_fetch_max_wait_ms: int = Field(15, description="keep low: tansu holds every fetch")
    kafka_bulk_fetch_max_wait_ms: int = Field(
        50,
        description="fetch wait of consumers off the sensor-alert path (the writer, the rules' "
        "group stage): tansu holds a fetch this long when there is nothing new, and every "
        "fetch costs it CPU",
    )
    kafka_max_batch_bytes: int = 1_048_576

    # -- collector ----------------------------------------------------------------------------
    mqtt_shared_group: str = Field("collectors", description="$share group name")
    mqtt_client_id: str | None = Field(
        None, description="stable id so the broker keeps the session; default: collector-<hostname>"
    )
    mqtt_session_expiry_s: int = Field(3600, description="persistent session kept this long")
    mqtt_receive_maximum: int = Field(1000, ge=1, le=65535, description="QoS 1 in flight")
    collector_turn_ms: int | None = Field(
        None,
        ge=0,
        description="how long a collector turn gathers MQTT messages before it validates them "
        "and sends them to Kafka as one request; default: kafka_linger_ms",
    )
    future_tolerance_s: float = Field(300.0, description="refuse readings further ahead")
    past_tolerance_s: float = Field(7 * 86400.0, description="refuse readings older than this")
    max_message_bytes: int = Field(256 * 1024, description="refuse larger MQTT payloads")
    max_records_per_message: int = Field(1000, description="refuse larger batches/packs")
    vendor_rate_limit_per_s: float = Field(
        0.0, description="readings/s per vendor per collector; 0 = no limit (rate_limited)"
    )
    vendor_rate_burst: float = Field(2000.0, gt=0, description="per-vendor bucket (readings)")

    # -- writer -------------------------------------------------------------------------------
    writer_batch_max: int = Field(5000, description="readings per database transaction, at most")
    writer_batch_wait_ms: int = Field(50, description="wait this long for a batch to fill")
    retention_raw_days: float = Field(30, gt=0, description="keep raw readings this long")
    retention_1m_days: float = Field(180, gt=0, description="keep 1-minute rollups this long")
    retention_1h_days: float = Field(5 * 365, gt=0, description="keep 1-hour rollups this long")
    retention_check_s: float = Field(3600, gt=0, description="run the retention job this often")
    rollup_refresh_s: float = Field(
        5.0, gt=0, description="plain PostgreSQL: fold new readings into the rollups this often"
    )
    rollup_settle_s: float = Field(
        5.0,
        ge=0,
        description="plain PostgreSQL: readings are folded into the rollups once this old; "
        "readings stored later than that are late and their minute is recomputed",
    )

    # -- observability ------------------------------------------------------------------------
    metrics_port: int = Field(0, description="Prometheus /metrics port; 0 = off")
    log_level: str = "INFO"
    log_json: bool = True

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get("CITYPULSE_CONFIG", "citypulse.toml"))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def topic(self, name: str) -> str:
        """Full Kafka topic name, e.g. ``topic("readings") == "citypulse.readings"``."""
        return f"{self.topic_prefix}.{name}"

    @property
    def dsn(self) -> str:
        return self.database_url.get_secret_value()

    def redacted(self) -> dict[str, Any]:
        """The effective settings for the start-up log line, secrets masked."""
        out = self.model_dump(mode="json")
        out["database_url"] = redact_url(self.dsn)
        out["mqtt_url"] = redact_url(self.mqtt_url)
        for key in ("mqtt_password", "kafka_sasl_password"):
            if out.get(key):
                out[key] = "***"
        return out
