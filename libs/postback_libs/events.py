"""The event catalog: one CloudEvents 1.0 envelope and a typed model for every event's data.

Events are immutable facts. A new version is a new type or a new optional field, never a changed
meaning, and consumers ignore fields they do not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from postback_libs.ids import derived_id, new_event_id

SPECVERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json"


@dataclass(frozen=True)
class Topic:
    name: str
    key: str
    cleanup: Literal["delete", "compact"]
    retention_ms: int  # -1: forever
    description: str


WEEK_MS = 7 * 24 * 3600 * 1000
# The largest record a topic takes (its max.message.bytes) and a producer sends: an event holds
# a call's body (up to POSTBACK_MAX_CALL_BYTES) or an owner's result (up to an API's
# max_result_bytes, 10 MiB at most), with its envelope. Kafka's default, about 1 MB, would
# refuse the largest and stop an outbox behind them.
MAX_EVENT_BYTES = 16 * 1024 * 1024
CALLS = Topic("postback.calls", "request id", "delete", WEEK_MS, "The story of every call.")
DELIVERIES = Topic(
    "postback.deliveries",
    "delivery id (endpoint id for an endpoint's own events)",
    "delete",
    WEEK_MS,
    "Every webhook message, its attempts and its outcome; resend and recover commands.",
)
LEDGER = Topic(
    "postback.ledger",
    "ledger account (`consumer:<account id>`, `owner:<account id>`)",
    "delete",
    -1,
    "Every movement of money, and the requests and refusals that lead to one.",
)
CATALOG = Topic("postback.catalog", "api id", "compact", -1, "Full state of every API.")
ACCOUNTS = Topic("postback.accounts", "account id", "compact", -1, "Accounts, hashes only.")
WEBHOOKS = Topic("postback.webhooks", "endpoint id", "compact", -1, "Webhook endpoints.")
DLQ = Topic("postback.dlq", "original key", "delete", -1, "Events a consumer gave up on.")
TOPICS: tuple[Topic, ...] = (CALLS, DELIVERIES, LEDGER, CATALOG, ACCOUNTS, WEBHOOKS, DLQ)


class EventData(BaseModel):
    """Base of every event's `data`. Subclasses name their type, topic and partition key."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    event_type: ClassVar[str]
    topic: ClassVar[Topic]
    key_doc: ClassVar[str]  # how the key is made, for the topics guide

    def key(self) -> str:
        raise NotImplementedError


EVENT_TYPES: dict[str, type[EventData]] = {}
D = TypeVar("D", bound=type[EventData])


def event(type_: str, topic: Topic, key: str | None = None) -> Any:
    """Register a data model as the payload of event type `type_`, keyed by its field `key`
    (or by the model's own `key()` method when no field is named)."""

    def register(cls: D) -> D:
        cls.event_type = type_
        cls.topic = topic
        if key is not None:
            cls.key = lambda self: str(getattr(self, key))  # type: ignore[method-assign]
            cls.key_doc = f"`{key}`"
        EVENT_TYPES[type_] = cls
        return cls

    return register


class CloudEvent(BaseModel):
    """The structured-mode CloudEvents 1.0 envelope every message on every topic uses."""

    model_config = ConfigDict(frozen=True)
    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: str
    subject: str
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    traceparent: str | None = None
    data: dict[str, Any]

    def payload(self) -> EventData:
        """The typed data of a known event type (raises KeyError for an unknown type)."""
        return EVENT_TYPES[self.type].model_validate(self.data)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CloudEvent:
        return cls.model_validate_json(raw)


def new_event(
    data: EventData,
    *,
    source: str,
    cause: str | None = None,
    traceparent: str | None = None,
    at: datetime | None = None,
    cause_ms: int | None = None,
) -> CloudEvent:
    """Wrap `data` in an envelope. With a `cause` (the id of the event being handled) the id is
    derived from it, so a handler that runs twice emits the same event twice, not two events.
    The id keeps the time of the cause's UUIDv7; `cause_ms` stands in for a cause without one."""
    event_id = str(derived_id(cause, data.event_type, ms=cause_ms)) if cause else new_event_id()
    return CloudEvent(
        id=event_id,
        source=source,
        type=data.event_type,
        subject=data.key(),
        time=at or datetime.now(UTC),
        traceparent=traceparent,
        data=data.model_dump(mode="json", exclude_none=True),
    )


def envelope_model(type_: str) -> type[BaseModel]:
    """The envelope with `type` and `data` pinned: what `schemas/` publishes per event type."""
    data_model = EVENT_TYPES[type_]
    name = "".join(p.capitalize() for p in type_.replace("_", ".").split(".")) + "Event"
    model: type[BaseModel] = create_model(
        name,
        __base__=CloudEvent,
        __doc__=data_model.__doc__,
        type=(Literal[type_], Field(...)),  # type: ignore[arg-type]
        data=(data_model, Field(...)),
    )
    return model


# Shared vocabulary ---------------------------------------------------------------------------

Mode = Literal["demo", "production"]
Entry = Literal["v1", "internal_call", "api_path"]
RejectReason = Literal[
    "unknown_api",
    "api_retired",
    "mode_not_available",
    "method_not_allowed",
    "path_not_allowed",
    "payload_too_large",
    "rate_limited",
    "quota_exceeded",
    "account_suspended",
    "insufficient_funds",
    "owner_suspended",  # the API's owner, not the consumer
    "price_above_max",  # the API costs more than the call's max_price
]
Money = int  # integer minor units, never floats
# The most one price, credit or correction may be: past any real one (ten trillion in cents),
# and thousands of them still fit the ledger's 64-bit running totals.
MAX_MONEY = 10**15


class CallRef(EventData):
    request_id: str


# postback.calls -----------------------------------------------------------------------------


@event("call.requested", CALLS, "request_id")
class CallRequested(CallRef):
    """A consumer asked for a call; ingress made it durable and answered 202."""

    consumer_id: str
    api: str = Field(description="The API as the consumer named it: id or slug.")
    mode: Mode = "production"
    method: str = "POST"
    path: str = "/"
    params: dict[str, Any] = Field(default_factory=dict)
    body: Any = None
    webhook_url: str | None = None
    idempotency_key: str | None = None
    entry: Entry = "v1"
    max_price: Money | None = Field(
        None, ge=0, description="The most the consumer will pay; a dearer call is rejected."
    )


@event("call.routed", CALLS, "request_id")
class CallRouted(CallRef):
    """Routing resolved the API, checked the consumer may call it, and priced the call."""

    consumer_id: str
    owner_id: str
    api_id: str
    mode: Mode
    upstream_url: str
    method: str
    path: str
    params: dict[str, Any] = Field(default_factory=dict)
    body: Any = None
    delivery_mode: Literal["sync", "async"] = "sync"
    price: Money = Field(ge=0)
    fee_bps: int = Field(ge=0, le=10000)
    deadline: datetime
    entry: Entry = "v1"
    max_result_bytes: int = 1_048_576


@event("call.rejected", CALLS, "request_id")
class CallRejected(CallRef):
    """The call was refused before reaching the owner; `reason` is machine-readable."""

    consumer_id: str
    api: str
    reason: RejectReason
    detail: str = ""
    stage: Literal["routing", "settlement"]
    api_id: str | None = Field(
        None, description="The API, once it was found (absent for a call naming none)."
    )


@event("call.authorized", CALLS, "request_id")
class CallAuthorized(CallRef):
    """Settlement reserved the price on the consumer's balance (zero for demo calls)."""

    consumer_id: str
    amount: Money = Field(ge=0)


@event("call.dispatched", CALLS, "request_id")
class CallDispatched(CallRef):
    """Owner-adapter sent the call to the owner (one event per attempt)."""

    attempt: int = Field(ge=1)
    upstream_url: str


@event("call.accepted", CALLS, "request_id")
class CallAccepted(CallRef):
    """The owner answered 202 and will post the result to its callback URL."""

    deadline: datetime


@event("call.completed", CALLS, "request_id")
class CallCompleted(CallRef):
    """The owner's result: from its response (sync) or its callback (async)."""

    via: Literal["response", "callback"]
    upstream_url: str | None = None
    status_code: int | None = None
    content_type: str = "application/json"
    result: Any = None


@event("call.failed", CALLS, "request_id")
class CallFailed(CallRef):
    """The owner could not produce a result."""

    reason: Literal["owner_unreachable", "owner_error", "owner_refused", "result_too_large"]
    upstream_url: str | None = None
    status_code: int | None = None
    detail: str = ""


@event("call.timed_out", CALLS, "request_id")
class CallTimedOut(CallRef):
    """No result arrived by the call's deadline."""

    deadline: datetime


@event("call.settled", CALLS, "request_id")
class CallSettled(CallRef):
    """The reservation was captured: consumer debited, owner credited, platform fee taken."""

    consumer_id: str
    owner_id: str
    amount: Money = Field(
        ge=0, description="The call's price, fee included: what the consumer paid."
    )
    fee: Money = Field(ge=0, description="The platform's part; the owner got `amount - fee`.")
    api_id: str | None = Field(None, description="The API called (absent in older events).")


@event("call.refunded", CALLS, "request_id")
class CallRefunded(CallRef):
    """The reservation was voided because the call failed or timed out (`outcome`). A call
    with no outcome long after its deadline is refunded with `outcome` = `call.timed_out`."""

    consumer_id: str
    amount: Money = Field(ge=0)
    outcome: Literal["call.failed", "call.timed_out"]
    api_id: str | None = Field(None, description="The API called (absent in older events).")


@event("call.delivered", CALLS, "request_id")
class CallDelivered(CallRef):
    """The consumer's webhook acknowledged the call's outcome."""

    message_id: str
    attempts: int = Field(ge=1)


@event("call.delivery_failed", CALLS, "request_id")
class CallDeliveryFailed(CallRef):
    """Every attempt to deliver the call's outcome to the consumer's webhook failed."""

    message_id: str
    attempts: int = Field(ge=0)
    last_error: str = ""


# postback.deliveries ------------------------------------------------------------------------


class DeliveryRef(EventData):
    delivery_id: str
    message_id: str
    request_id: str | None = None
    endpoint_id: str | None = None


ErrorClass = Literal["dns", "connect", "tls", "timeout", "http_status", "blocked_address", "other"]


@event("delivery.attempted", DELIVERIES, "delivery_id")
class DeliveryAttempted(DeliveryRef):
    """One HTTP attempt to deliver a message to an endpoint, whatever its outcome."""

    url: str
    attempt: int = Field(ge=1)
    status_code: int | None = None
    latency_ms: float = 0
    error_class: ErrorClass | None = None
    response_excerpt: str = ""
    next_attempt_at: datetime | None = None
    response_headers: dict[str, str] | None = None
    test: bool = Field(False, description="A test message sent on request, never retried.")


@event("delivery.succeeded", DELIVERIES, "delivery_id")
class DeliverySucceeded(DeliveryRef):
    """The destination answered 2xx: the message is delivered."""

    attempts: int = Field(ge=1)


@event("delivery.failed", DELIVERIES, "delivery_id")
class DeliveryFailed(DeliveryRef):
    """Delivery stopped without success for a reason other than exhausted retries."""

    attempts: int = Field(ge=0)
    reason: str


@event("delivery.exhausted", DELIVERIES, "delivery_id")
class DeliveryExhausted(DeliveryRef):
    """Every attempt the retry policy allows failed; the message can be resent."""

    attempts: int = Field(ge=1)
    last_error: str = ""


class EndpointRef(EventData):
    endpoint_id: str


@event("endpoint.disabled", DELIVERIES, "endpoint_id")
class EndpointDisabled(EndpointRef):
    """Delivery disabled an endpoint: it answered 410 Gone, or failed for too long."""

    account_id: str
    reason: str


# postback.ledger ----------------------------------------------------------------------------
# Keyed by ledger account ("consumer:<account id>", "owner:<account id>", ...): every event that
# moves a consumer's balance first lands in that balance's partition, in order.


class ConsumerLedgerEvent(EventData):
    key_doc: ClassVar[str] = "`consumer:` + `account_id`"
    account_id: str

    def key(self) -> str:
        return f"consumer:{self.account_id}"


@event("credit.requested", LEDGER)
class CreditRequested(ConsumerLedgerEvent):
    """An operator asked settlement to credit an account (funds come from operator funding)."""

    credit_id: str
    amount: Money = Field(gt=0)
    note: str = ""


@event("account.credited", LEDGER)
class AccountCredited(ConsumerLedgerEvent):
    """Settlement credited an account from operator funding."""

    credit_id: str
    amount: Money = Field(gt=0)
    balance: Money = Field(description="The posted balance after the credit.")


class TransferMoved(EventData):
    """What every transfer event says: which transfer moved how much between which accounts."""

    transfer_id: str
    request_id: str
    debit_account: str
    credit_account: str
    amount: Money = Field(ge=0)
    api_id: str | None = Field(None, description="The API of the call, if any.")


@event("transfer.reserved", LEDGER, "debit_account")
class TransferReserved(TransferMoved):
    """A pending transfer: the amount is held on the debit account until posted or voided."""


@event("transfer.posted", LEDGER, "debit_account")
class TransferPosted(TransferMoved):
    """The pending transfer `pending_id` was captured: the amount moved."""

    pending_id: str


@event("transfer.voided", LEDGER, "debit_account")
class TransferVoided(TransferMoved):
    """The pending transfer `pending_id` was released: nothing moved."""

    pending_id: str


@event("balance.low", LEDGER)
class BalanceLow(ConsumerLedgerEvent):
    """A consumer's available balance fell below the low-balance threshold.

    Sent once, and again only at a crossing after money was added (a credit or a positive
    correction)."""

    balance: Money = Field(description="Available: the posted balance less what calls hold.")
    threshold: Money


# postback.catalog ---------------------------------------------------------------------------


class RetiredSecret(BaseModel):
    """A secret version replaced by a rotation that still signs messages until `valid_until`."""

    model_config = ConfigDict(frozen=True)
    version: int = Field(ge=1)
    valid_until: datetime


class ApiState(BaseModel):
    """The full state of an API; each catalog event carries all of it (the topic is compacted)."""

    model_config = ConfigDict(frozen=True)
    api_id: str
    slug: str
    owner_id: str
    name: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    status: Literal["active", "retired"] = "active"
    endpoint: str
    endpoints: list[str] = Field(
        default_factory=list, description="More production upstreams; calls spread across all."
    )
    demo_endpoint: str | None = None
    methods: list[str] = Field(default_factory=lambda: ["POST"])
    path_prefixes: list[str] = Field(default_factory=lambda: ["/"])
    price: Money = Field(0, ge=0)
    fee_bps: int | None = Field(None, ge=0, le=10000)
    delivery_mode: Literal["sync", "async"] = "sync"
    max_duration_seconds: int = Field(300, ge=1)
    max_request_bytes: int = Field(262_144, ge=1)
    max_result_bytes: int = Field(1_048_576, ge=1)
    signing_secret_version: int = Field(1, ge=1)
    retired_signing_secrets: list[RetiredSecret] = Field(
        default_factory=list, description="Rotated-out signing secret versions still signing."
    )
    rate_limit_per_second: float | None = Field(
        None, gt=0, description="Per consumer: sustained calls per second (token bucket)."
    )
    rate_limit_burst: int | None = Field(None, ge=1, description="Per consumer: bucket size.")
    quota_per_day: int | None = Field(None, ge=1, description="Per consumer, UTC days.")
    quota_per_month: int | None = Field(None, ge=1, description="Per consumer, UTC months.")
    version: int = Field(1, ge=1)


class ApiChange(EventData):
    key_doc: ClassVar[str] = "`api.api_id`"
    api: ApiState

    def key(self) -> str:
        return self.api.api_id


@event("api.registered", CATALOG)
class ApiRegistered(ApiChange):
    """An owner registered an API; `api` is its whole state."""


@event("api.updated", CATALOG)
class ApiUpdated(ApiChange):
    """An API changed; `api` is its whole new state."""


@event("api.signing_secret_rotated", CATALOG)
class ApiSigningSecretRotated(ApiChange):
    """The API's signing secret was rotated; `api` is its whole new state, and the previous
    secret signs forwarded calls too until the time given."""

    previous_secret_valid_until: datetime


@event("api.retired", CATALOG)
class ApiRetired(ApiChange):
    """An API was retired: no new calls are routed to it."""


# postback.accounts --------------------------------------------------------------------------


class AccountState(BaseModel):
    model_config = ConfigDict(frozen=True)
    account_id: str
    name: str
    roles: list[Literal["consumer", "owner"]]
    status: Literal["active", "suspended"] = "active"
    key_id: str
    key_hash: str = Field(description="SHA-256 of the secret; the secret itself is never stored.")
    webhook_secret_version: int = Field(
        1, ge=1, description="Of the secret signing messages to the account's calls' webhook_url."
    )
    retired_webhook_secrets: list[RetiredSecret] = Field(
        default_factory=list, description="Rotated-out webhook secret versions still signing."
    )


class AccountChange(EventData):
    key_doc: ClassVar[str] = "`account.account_id`"
    account: AccountState

    def key(self) -> str:
        return self.account.account_id


@event("account.created", ACCOUNTS)
class AccountCreated(AccountChange):
    """An account was made; it carries the hash of its secret, never the secret."""


@event("account.key_rotated", ACCOUNTS)
class AccountKeyRotated(AccountChange):
    """The account's secret was replaced; the previous one works until the time given."""

    previous_key_valid_until: datetime


@event("account.webhook_secret_rotated", ACCOUNTS)
class AccountWebhookSecretRotated(AccountChange):
    """The secret signing messages to the account's calls' `webhook_url` was rotated; the
    previous one signs too until the time given."""

    previous_secret_valid_until: datetime


@event("account.suspended", ACCOUNTS)
class AccountSuspended(AccountChange):
    """The account may make no calls until it is reinstated."""

    reason: str = ""


@event("account.reinstated", ACCOUNTS)
class AccountReinstated(AccountChange):
    """A suspension was lifted."""


# postback.webhooks --------------------------------------------------------------------------


class EndpointState(BaseModel):
    model_config = ConfigDict(frozen=True)
    endpoint_id: str
    account_id: str
    url: str
    description: str = ""
    event_types: list[str] = Field(default_factory=lambda: ["call.*"])
    enabled: bool = True
    rate_limit_per_second: int | None = Field(None, ge=1)
    metadata: dict[str, str] = Field(default_factory=dict)
    secret_version: int = 1
    # Later additions, all optional so that every earlier event still reads the same.
    revision: int = Field(1, ge=1, description="Rises with every change; newer state wins.")
    fifo: bool = Field(
        False, description="Ordered: a message waits until the one before it is settled."
    )
    max_in_flight: int | None = Field(None, ge=1, description="Concurrent requests at most.")
    retry_schedule: list[float] | None = Field(
        None, description="Seconds before each attempt; the service default when absent."
    )
    max_attempts: int | None = Field(None, ge=1)
    retry_window_seconds: int | None = Field(
        None, ge=1, description="No attempt later than this after the message was made."
    )
    signing: Literal["symmetric", "asymmetric"] = Field(
        "symmetric", description="v1 (HMAC-SHA256, whsec_) or v1a (Ed25519, whpk_)."
    )
    retired_secrets: list[RetiredSecret] = Field(
        default_factory=list, description="Rotated-out secret versions still signing."
    )
    disabled_reason: str | None = Field(
        None, description="Why delivery disabled the endpoint (410, continuous failure)."
    )


class EndpointChange(EventData):
    key_doc: ClassVar[str] = "`endpoint.endpoint_id`"
    endpoint: EndpointState

    def key(self) -> str:
        return self.endpoint.endpoint_id


@event("endpoint.created", WEBHOOKS)
class EndpointCreated(EndpointChange):
    """A webhook endpoint was made; `endpoint` is its whole state (no secret)."""


@event("endpoint.updated", WEBHOOKS)
class EndpointUpdated(EndpointChange):
    """An endpoint changed (by its account, or disabled by delivery); its whole new state."""


@event("endpoint.deleted", WEBHOOKS)
class EndpointDeleted(EndpointChange):
    """An endpoint was deleted: nothing more is sent to it."""


@event("endpoint.secret_rotated", WEBHOOKS)
class EndpointSecretRotated(EndpointChange):
    """The endpoint's signing secret was rotated; the previous one signs until the time given."""

    previous_secret_valid_until: datetime


# postback.dlq -------------------------------------------------------------------------------


@event("dead_letter.recorded", DLQ, "original_key")
class DeadLetterRecorded(EventData):
    """A message a consumer group could not process after its retries."""

    consumer_group: str
    original_topic: str
    partition: int
    offset: int
    original_key: str
    error: str
    attempts: int
    original: str = Field(
        description="The message value as text (UTF-8, replaced if invalid), its first 4 MiB."
    )


# Webhook delivery: messages queued and commands from ingress (postback.deliveries) -----------


@event("delivery.scheduled", DELIVERIES, "delivery_id")
class DeliveryScheduled(DeliveryRef):
    """A message was queued for one destination: newly made, or sent again on request."""

    account_id: str
    message_type: str = Field(description="The `type` of the message, e.g. call.completed.")
    url: str
    reason: Literal["new", "resend", "recover"] = "new"


@event("delivery.resend_requested", DELIVERIES, "delivery_id")
class DeliveryResendRequested(DeliveryRef):
    """The account asked for one message to be sent again to its destination."""

    account_id: str


@event("delivery.recover_requested", DELIVERIES, "endpoint_id")
class DeliveryRecoverRequested(EndpointRef):
    """The account asked for every message that failed to reach an endpoint since a time to be
    sent again."""

    account_id: str
    recovery_id: str
    since: datetime
    until: datetime | None = None


# postback.ledger: operator corrections and their outcomes ------------------------------------
# A correction never edits a past transfer: it is a new transfer between operator funding and
# the account, or a refusal when it would take the account below zero.

LedgerRole = Literal["consumer", "owner"]


class RoleLedgerEvent(EventData):
    key_doc: ClassVar[str] = "`role` + `:` + `account_id`"
    account_id: str
    role: LedgerRole = "consumer"

    def key(self) -> str:
        return f"{self.role}:{self.account_id}"


@event("correction.requested", LEDGER)
class CorrectionRequested(RoleLedgerEvent):
    """An operator asked settlement to correct an account's balance by a signed amount."""

    correction_id: str
    amount: Money = Field(description="Signed: positive adds to the balance, negative removes.")
    note: str = ""


@event("account.corrected", LEDGER)
class AccountCorrected(RoleLedgerEvent):
    """Settlement applied a correction as a transfer between operator funding and the account."""

    correction_id: str
    transfer_id: str
    debit_account: str
    credit_account: str
    amount: Money = Field(description="Signed, as requested.")
    balance: Money = Field(description="The account's posted balance after the correction.")
    note: str = ""


@event("correction.refused", LEDGER)
class CorrectionRefused(RoleLedgerEvent):
    """Settlement refused a correction; nothing moved."""

    correction_id: str
    amount: Money
    reason: Literal["insufficient_funds", "invalid_amount"]
    available: Money = Field(description="What the account could give up when it was refused.")
    detail: str = ""
