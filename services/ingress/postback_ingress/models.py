"""The request and response bodies of the public API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    model_validator,
)

from postback_libs.events import MAX_MONEY, Mode
from postback_libs.text import unstorable

EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)


def in_range(at: datetime) -> datetime:
    """A time the database and every client library can hold, with its offset."""
    if at.tzinfo is None:
        raise ValueError("a time needs its offset (RFC 3339)")
    if not EARLIEST <= at < LATEST:
        raise ValueError(f"a time between {EARLIEST.year} and {LATEST.year}")
    return at


# A time given to the API: RFC 3339 with an offset, within the years the system can hold.
Instant = Annotated[AwareDatetime, AfterValidator(in_range)]


class Input(BaseModel):
    """A request body: no field it does not know, and nothing the system could not store or
    pass on (NUL, a lone surrogate, JSON nested too deep), refused with a 422 here rather than
    failing a database write or an event downstream."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _storable(self) -> Input:
        for name, value in self.__dict__.items():
            problem = unstorable(value)
            if problem is not None:
                raise ValueError(f"{name}: {problem}")
        return self


class CallRequest(Input):
    api: str = Field(min_length=1, max_length=200, description="API id or slug.")
    mode: Mode = "production"
    method: str = Field("POST", pattern="^(GET|POST|PUT|PATCH|DELETE)$")
    path: str = Field("/", pattern="^/", max_length=2000)
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Sent as the JSON body of a POST, PUT or PATCH, else as the query string.",
    )
    body: Any = Field(None, description="The JSON body to send instead of params (not with GET).")
    webhook_url: AnyHttpUrl | None = Field(
        None,
        description="Where the result is delivered, signed. Optional if you subscribe "
        "endpoints instead.",
    )
    max_price: StrictInt | None = Field(
        None,
        ge=0,
        le=MAX_MONEY,
        description="The most you will pay for this call (minor units): an owner may change "
        "the API's price at any time, and a call that would cost more is rejected "
        "(`price_above_max`) before anything is reserved.",
    )

    @model_validator(mode="after")
    def _params_or_body(self) -> CallRequest:
        # What the owner gets is what its signature covers: the body, or the path and query.
        if self.method == "GET" and self.body is not None:
            raise ValueError("a GET carries no body: send its parameters as params")
        if self.body is not None and self.params:
            raise ValueError("send params or a body, not both: put the parameters in the body")
        return self


class CallAccepted(BaseModel):
    request_id: str
    status: Literal["accepted"] = "accepted"
    status_url: str


class TimelineEntry(BaseModel):
    type: str
    time: Any
    source: str
    data: dict[str, Any]


class CallView(BaseModel):
    request_id: str
    status: str
    outcome: str | None = None
    api: str | None = None
    api_id: str | None = None
    mode: str | None = None
    result: Any = None
    result_content_type: str | None = None
    error: dict[str, Any] | None = None
    cost: int | None = None
    requested_at: Any = None
    completed_at: Any = None
    delivered_at: Any = None
    timeline: list[TimelineEntry] = Field(default_factory=list)


class AccountCreate(Input):
    name: str = Field(min_length=1, max_length=200)
    roles: list[Literal["consumer", "owner"]] = Field(min_length=1)


class AccountCreated(BaseModel):
    account_id: str
    name: str
    roles: list[str]
    secret: str = Field(description="Shown once. Send it as `Authorization: Bearer <secret>`.")
    webhook_secret: str = Field(description="Verifies the signatures of your call webhooks.")


class Balance(BaseModel):
    balance: int = Field(description="Posted balance, minor units.")
    reserved: int = Field(description="Held for calls in flight.")


class AccountView(BaseModel):
    account_id: str
    name: str
    roles: list[str]
    status: str
    balances: dict[str, Balance] = Field(
        default_factory=dict, description="Per role (consumer, owner), as the read model has it."
    )


class AccountPage(BaseModel):
    data: list[AccountView]
    next_cursor: str | None = Field(None, description="Pass it back for the next page.")


class KeyRotation(Input):
    overlap_seconds: int | None = Field(
        None,
        ge=0,
        le=30 * 86400,
        description="How long the previous key keeps working (0: revoked at once, after a "
        "leak); the configured overlap when absent.",
    )


class KeyRotated(BaseModel):
    secret: str = Field(description="Shown once.")
    previous_key_valid_until: datetime


class SecretRotation(Input):
    overlap_seconds: int | None = Field(
        None,
        ge=0,
        le=7 * 86400,
        description="How long the previous secret keeps signing (0: revoked at once, after a "
        "leak); the configured overlap when absent.",
    )


def overlap_of(body: KeyRotation | SecretRotation | None, configured: int) -> int:
    """The overlap a rotation (of a key or a secret) asked for, else the configured one."""
    if body is not None and body.overlap_seconds is not None:
        return body.overlap_seconds
    return configured


class WebhookSecretRotated(BaseModel):
    webhook_secret: str = Field(description="Shown once.")
    webhook_secret_version: int
    previous_secret_valid_until: datetime | None = Field(
        description="Until when the previous secret signs too; null: revoked at once."
    )


class SigningSecretRotated(BaseModel):
    api_id: str
    signing_secret: str = Field(description="Shown once.")
    signing_secret_version: int
    previous_secret_valid_until: datetime | None = Field(
        description="Until when the previous secret signs too; null: revoked at once."
    )


class Suspension(Input):
    reason: str = Field("", max_length=500)


class CreditCreate(Input):
    amount: StrictInt = Field(gt=0, le=MAX_MONEY, description="Minor units.")
    note: str = Field("", max_length=500)


class CreditAccepted(BaseModel):
    credit_id: str
    account_id: str
    amount: int


class ApiFields(Input):
    """What an owner sets on an API; registration needs some, an update any."""

    slug: str = Field(pattern="^[a-z0-9][a-z0-9-]{1,62}$")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=5000)
    tags: list[str] = Field(default_factory=list, max_length=20)
    endpoint: AnyHttpUrl
    endpoints: list[AnyHttpUrl] = Field(
        default_factory=list, max_length=20, description="More upstreams; calls spread across all."
    )
    demo_endpoint: AnyHttpUrl | None = None
    methods: list[Literal["GET", "POST", "PUT", "PATCH", "DELETE"]] = Field(
        default_factory=lambda: ["POST"],  # type: ignore[arg-type]
        min_length=1,
    )
    path_prefixes: list[Annotated[str, Field(pattern="^/", max_length=2000)]] = Field(
        default_factory=lambda: ["/"], min_length=1, description="Paths calls may take."
    )
    price: int = Field(0, ge=0, le=MAX_MONEY, description="Per call, in minor units.")
    delivery_mode: Literal["sync", "async"] = Field(
        "sync",
        description="sync: the result is the answer to the forwarded call, which may take until "
        "the deadline. async: the owner answers 202 at once (within "
        "POSTBACK_OWNER_ACCEPT_TIMEOUT_SECONDS, else the call is forwarded again) and posts the "
        "result to the callback URL. Either answer is taken from any API.",
    )
    max_duration_seconds: int = Field(300, ge=1, le=86400)
    max_request_bytes: int = Field(262_144, ge=1, le=10_485_760)
    max_result_bytes: int = Field(1_048_576, ge=1, le=10_485_760)
    rate_limit_per_second: float | None = Field(None, gt=0, le=100_000)
    rate_limit_burst: int | None = Field(None, ge=1, le=1_000_000)
    quota_per_day: int | None = Field(None, ge=1)
    quota_per_month: int | None = Field(None, ge=1)


class ApiCreate(ApiFields):
    pass


class ApiUpdate(ApiFields):
    """Any subset of the fields; the others keep their values."""

    slug: str | None = Field(None, pattern="^[a-z0-9][a-z0-9-]{1,62}$")  # type: ignore[assignment]
    name: str | None = Field(None, min_length=1, max_length=200)  # type: ignore[assignment]
    endpoint: AnyHttpUrl | None = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _required_stay_set(self) -> ApiUpdate:
        for name in ("slug", "name", "endpoint"):
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"{name} cannot be removed, only changed")
        return self


class ApiFee(Input):
    """The platform's share of one API's price: the operator's to set, never the owner's."""

    fee_bps: int | None = Field(
        ge=0, le=10000, description="Basis points of the price; null: the platform default."
    )


class ApiRegisteredView(BaseModel):
    api: dict[str, Any]
    signing_secret: str = Field(description="Verifies that forwarded calls come from Postback.")
