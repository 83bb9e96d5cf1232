"""One settings model for every service, read from `POSTBACK_*` environment variables."""

from __future__ import annotations

import ipaddress
import math
from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("ingress", "routing", "settlement", "owner-adapter", "delivery", "projection")
ServiceName = Literal["ingress", "routing", "settlement", "owner-adapter", "delivery", "projection"]

# Each service's HTTP port when several run on one host (the embedded stack); in a container
# every service listens on `POSTBACK_HTTP_PORT`.
DEFAULT_PORTS: dict[str, int] = {
    "ingress": 8080,
    "owner-adapter": 8081,
    "routing": 8082,
    "settlement": 8083,
    "delivery": 8084,
    "projection": 8085,
}


# The master key's shortest length: every signing secret and token derives from it.
MIN_SECRET_KEY_CHARS = 32


class ConfigurationError(ValueError):
    """A setting a command needs is missing or unusable; the message says what to set."""


# The longest wait between two webhook attempts a schedule may ask for (the default's longest is
# 10 h): a longer one would mean a message nobody hears of for weeks.
MAX_RETRY_DELAY_SECONDS = 7 * 86400


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTBACK_", extra="ignore")

    # Infrastructure
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/postback", description="PostgreSQL DSN."
    )
    topic_prefix: str = Field(
        "", description="Prefix for every topic name, to share one Kafka cluster between stacks."
    )
    topic_partitions: int = Field(12, ge=1, description="Partitions of each topic created.")
    topic_replication: int = Field(1, ge=1, description="Replication factor of topics created.")
    db_pool_min: int = Field(2, ge=1)
    db_pool_max: int = Field(10, ge=1)
    migrate_on_start: bool = Field(True, description="Run the service's migrations at start.")

    # HTTP
    http_host: str = Field("127.0.0.1", description="Address each service's HTTP server binds.")
    http_port: int | None = Field(None, description="Port; defaults to the service's own port.")
    public_url: str = Field("http://127.0.0.1:8080", description="Public base URL of ingress.")
    max_call_bytes: int = Field(
        1_048_576, ge=1024, description="Largest call body ingress accepts (413 beyond it)."
    )
    callback_url: str = Field(
        "http://127.0.0.1:8081", description="Public base URL of owner-adapter (callbacks)."
    )

    # Secrets
    key_rotation_overlap_seconds: int = Field(
        86_400, ge=0, description="How long a rotated account secret keeps working."
    )
    operator_token: SecretStr = Field(
        SecretStr(""), description="Token for operator actions; empty disables them."
    )
    secret_key: SecretStr = Field(
        SecretStr(""),
        description=(
            "Master key from which webhook and API signing secrets and callback tokens are "
            f"derived; at least {MIN_SECRET_KEY_CHARS} characters, required by the services "
            "that sign (ingress, owner-adapter, delivery)."
        ),
    )

    # Consumers
    consumer_max_records: int = Field(500, ge=1)
    kafka_session_timeout_ms: int = Field(
        10_000, ge=1000, description="How soon a dead consumer's partitions move to another."
    )
    kafka_fetch_max_wait_ms: int = Field(
        100, ge=1, description="Longest wait of a fetch on a quiet topic (Kafka answers sooner)."
    )
    kafka_background_fetch_max_wait_ms: int = Field(
        200,
        ge=1,
        description="The same, for consumers no call waits on (the read model, alerts, "
        "operator commands): fewer fetches of quiet topics for the broker to answer.",
    )
    handler_retries: int = Field(3, ge=0, description="Attempts before an event goes to the DLQ.")
    inbox_retention_days: int = Field(
        8,
        ge=1,
        description="Processed event ids are remembered this long: a day past the week the "
        "calls and deliveries topics keep, so a consumer group reset to their start meets no "
        "event it has forgotten handling. Settlement's credit and correction requests are "
        "remembered for good.",
    )
    shutdown_grace_seconds: float = Field(20.0, gt=0)

    # Owner-adapter
    owner_timeout_seconds: float | None = Field(
        None,
        gt=0,
        description=(
            "Longest a forwarded request may take before it is tried again; unset, a request "
            "may take until the call's deadline (the API's max_duration_seconds)."
        ),
    )
    owner_accept_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description=(
            "How long the owner of an API registered with delivery_mode async has to answer a "
            "forwarded call (202) before it is tried again; its result may still take until "
            "the call's deadline."
        ),
    )
    owner_max_attempts: int = Field(3, ge=1)
    default_max_duration_seconds: int = Field(300, ge=1)
    dispatch_concurrency: int = Field(64, ge=1)

    # Delivery
    delivery_concurrency: int = Field(64, ge=1)
    delivery_timeout_seconds: float = Field(15.0, gt=0)
    retry_schedule: str = Field(
        "0,5,300,1800,7200,18000,36000,36000",
        description="Seconds before each delivery attempt, comma separated.",
    )
    allowed_networks: str = Field(
        "", description="Comma-separated CIDRs outbound requests may reach despite the SSRF guard."
    )
    delivery_connect_timeout_seconds: float = Field(
        5.0, gt=0, description="Bound on each TCP/TLS connect of an outbound webhook request."
    )
    webhook_secret_overlap_seconds: int = Field(
        86_400,
        ge=0,
        description="How long a rotated secret (an endpoint's, a consumer's webhook secret, an "
        "API's signing secret) keeps signing, unless the rotation says.",
    )
    endpoint_max_in_flight: int = Field(
        32, ge=1, description="Concurrent requests to one endpoint unless the endpoint says."
    )
    circuit_failure_threshold: int = Field(
        5, ge=1, description="Consecutive failures that open an endpoint's circuit breaker."
    )
    circuit_cooldown_seconds: float = Field(
        30.0, gt=0, description="First wait before probing an endpoint whose circuit opened."
    )
    circuit_max_cooldown_seconds: float = Field(
        900.0, gt=0, description="Longest wait between probes (the wait doubles per failure)."
    )
    endpoint_disable_after_seconds: float = Field(
        5 * 86_400.0, gt=0, description="Continuous failure after which an endpoint is disabled."
    )

    # Settlement
    platform_fee_bps: int = Field(1000, ge=0, le=10000)
    low_balance_threshold: int = Field(
        0,
        ge=0,
        description="A consumer whose available balance falls below this gets balance.low, "
        "once, and again only after money was added; 0 turns it off.",
    )
    reservation_grace_seconds: float = Field(
        300.0,
        ge=0,
        description="How long after a call's deadline settlement releases a reservation that "
        "never got an outcome (owner-adapter normally reports call.timed_out at the deadline).",
    )
    reservation_sweep_seconds: float = Field(
        30.0, gt=0, description="How often settlement looks for such reservations."
    )

    # Projection
    projection_max_lag_seconds: float = Field(
        60.0, gt=0, description="/readyz fails while the read model is further behind."
    )
    result_retention_days: int = Field(
        30,
        ge=1,
        description="Results, response bodies, webhook messages and forwarded calls are "
        "forgotten this long after they finished; the read model keeps each call's status.",
    )

    # Observability
    log_level: str = Field("INFO")
    otel_exporter_endpoint: str = Field("", description="OTLP/HTTP endpoint; empty: no export.")

    @field_validator("retry_schedule")
    @classmethod
    def _schedule_is_numbers(cls, v: str) -> str:
        try:
            steps = [float(s) for s in v.split(",") if s.strip()]
        except ValueError as e:
            raise ValueError("retry_schedule must be comma-separated seconds") from e
        if not steps or not all(
            math.isfinite(s) and 0 <= s <= MAX_RETRY_DELAY_SECONDS for s in steps
        ):
            raise ValueError(
                f"retry_schedule needs at least one number of seconds, each from 0 to "
                f"{MAX_RETRY_DELAY_SECONDS}"
            )
        return v

    @field_validator("allowed_networks")
    @classmethod
    def _networks_parse(cls, v: str) -> str:
        for cidr in filter(None, (s.strip() for s in v.split(","))):
            ipaddress.ip_network(cidr, strict=False)
        return v

    @property
    def retry_delays(self) -> list[float]:
        return [float(s) for s in self.retry_schedule.split(",") if s.strip()]

    @property
    def allowed_network_list(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [
            ipaddress.ip_network(s.strip(), strict=False)
            for s in self.allowed_networks.split(",")
            if s.strip()
        ]

    def master_key(self) -> bytes:
        """The key signing secrets and callback tokens derive from. There is no default: a
        key known to anyone would let anyone sign as Postback."""
        key = self.secret_key.get_secret_value()
        if len(key) < MIN_SECRET_KEY_CHARS:
            raise ConfigurationError(
                f"POSTBACK_SECRET_KEY must be set, at least {MIN_SECRET_KEY_CHARS} characters: "
                "every API's signing secret, webhook secret and callback token derives from it. "
                "Generate one (`openssl rand -base64 48`) and keep it: changing it changes them "
                "all."
            )
        return key.encode()

    def port_for(self, service: str) -> int:
        return self.http_port or DEFAULT_PORTS[service]

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def consumer_group(self, group: str) -> str:
        """The Kafka consumer group id of one of Postback's groups (`routing`, ...)."""
        return f"{self.topic_prefix}postback-{group}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
