"""What `/v1/webhooks` takes and answers: the request bodies, checked, and the answers'
models, which document them (the routes return plain dicts; the tests hold the two equal)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AnyHttpUrl, BaseModel, ConfigDict, Field, model_validator

from postback_ingress.models import Input
from postback_libs.events import EndpointState, ErrorClass
from postback_libs.settings import MAX_RETRY_DELAY_SECONDS


class RetryPolicy(Input):
    schedule: list[Annotated[float, Field(ge=0, le=MAX_RETRY_DELAY_SECONDS)]] | None = Field(
        None, min_length=1, max_length=30, description="Seconds before each attempt."
    )
    max_attempts: int | None = Field(None, ge=1, le=100)
    window_seconds: int | None = Field(None, ge=1, le=30 * 86400)


def _unique(patterns: list[str]) -> list[str]:
    return list(dict.fromkeys(patterns))


# Event types an endpoint subscribes to, each once, in the order given.
EventTypes = Annotated[list[str], AfterValidator(_unique)]


class EndpointFields(Input):
    description: str = Field("", max_length=1000)
    event_types: EventTypes = Field(
        default_factory=lambda: ["call.*"],
        min_length=1,
        max_length=50,
        description="Names (`call.completed`) or wildcards (`call.*`, `*`).",
    )
    enabled: bool = True
    rate_limit_per_second: int | None = Field(None, ge=1, le=10_000)
    max_in_flight: int | None = Field(None, ge=1, le=1000)
    fifo: bool = Field(False, description="Deliver in order, one message at a time.")
    retry_policy: RetryPolicy | None = None
    metadata: dict[str, str] = Field(default_factory=dict, max_length=50)


class EndpointCreate(EndpointFields):
    url: AnyHttpUrl
    signing: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="`v1` HMAC with a whsec_ secret, or `v1a` Ed25519 (whpk_ key)."
    )


class EndpointUpdate(Input):
    """Fields to change; null clears the rate limit, the cap and the retry policy (the other
    fields can only be changed)."""

    url: AnyHttpUrl | None = None
    description: str | None = Field(None, max_length=1000)
    event_types: EventTypes | None = Field(None, min_length=1, max_length=50)
    enabled: bool | None = None
    rate_limit_per_second: int | None = Field(None, ge=1, le=10_000)
    max_in_flight: int | None = Field(None, ge=1, le=1000)
    fifo: bool | None = None
    retry_policy: RetryPolicy | None = None
    metadata: dict[str, str] | None = Field(None, max_length=50)

    @model_validator(mode="after")
    def _kept_fields_stay_set(self) -> EndpointUpdate:
        for name in ("url", "description", "event_types", "enabled", "fifo", "metadata"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be null, only changed")
        return self


def view(state: EndpointState, row: Any = None) -> dict[str, Any]:
    # The retry fields are shown once, as the `retry_policy` they are set with.
    out = state.model_dump(
        mode="json",
        exclude={"retired_secrets", "retry_schedule", "max_attempts", "retry_window_seconds"},
    )
    out["retry_policy"] = {
        "schedule": state.retry_schedule,
        "max_attempts": state.max_attempts,
        "window_seconds": state.retry_window_seconds,
    }
    out["secret_rotation_ends_at"] = max(
        (r.valid_until.isoformat() for r in state.retired_secrets), default=None
    )
    if row is not None:
        out["created_at"] = row["created_at"].isoformat()
        out["updated_at"] = row["updated_at"].isoformat()
    return out


# --- answers -------------------------------------------------------------------------------


class Answer(BaseModel):
    # Documentation that a test checks against real answers: no field unaccounted for.
    model_config = ConfigDict(extra="forbid")


class RetryPolicyView(Answer):
    schedule: list[float] | None = Field(description="Seconds before each attempt; null: default.")
    max_attempts: int | None
    window_seconds: int | None


class EndpointView(Answer):
    endpoint_id: str
    account_id: str
    url: str
    description: str
    event_types: list[str]
    enabled: bool
    rate_limit_per_second: int | None
    max_in_flight: int | None
    fifo: bool
    metadata: dict[str, str]
    signing: Literal["symmetric", "asymmetric"]
    secret_version: int
    revision: int = Field(description="Rises with every change.")
    disabled_reason: str | None = Field(description="Why delivery disabled it (410, failures).")
    retry_policy: RetryPolicyView
    secret_rotation_ends_at: datetime | None = Field(
        description="Until when an older secret still signs alongside the current one."
    )
    created_at: datetime
    updated_at: datetime


class EndpointWithSecret(EndpointView):
    secret: str | None = Field(None, description="`whsec_...`: shown here and on rotation only.")
    public_key: str | None = Field(None, description="`whpk_...` of an asymmetric endpoint.")


class EndpointPage(Answer):
    data: list[EndpointView]
    next_cursor: str | None


class Rotated(Answer):
    endpoint_id: str
    secret_version: int
    previous_secret_valid_until: datetime | None
    secret: str | None = None
    public_key: str | None = None


class SentTestMessage(Answer):
    message_id: str
    success: bool
    status_code: int | None
    latency_ms: float
    error_class: ErrorClass | None
    response_excerpt: str
    response_headers: dict[str, str]


class EventTypeView(Answer):
    type: str
    description: str


class EventTypeList(Answer):
    data: list[EventTypeView]


def documented(model: type[BaseModel], status: int = 200) -> dict[str, Any]:
    """Route options that document `model` as the answer without filtering what is sent."""
    return {"response_model": None, "responses": {status: {"model": model}}}
