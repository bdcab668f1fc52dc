"""What an operator may ask of a key, as validated models: the one input the admin API and the
CLI both build and `store.py` acts on.

Validation is strict (pydantic, as the settings): a limit is a whole number, never `"5"`,
`5.0` or `true`; unknown fields are refused; every error names its field. Which plans exist
is configuration, so it is checked with the plans passed as validation context.
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from edge.setting_types import error_message, error_place

MAX_SECONDS = 100 * 365 * 86_400  # expiry, grace: whole seconds up to 100 years
MAX_UNIX = 10**11  # an absolute time edge accepts (year ~5138), 11 digits
TEXT_LIMIT = 200
ROUTE = re.compile(r"^[A-Za-z0-9._~-]+(/[A-Za-z0-9._~-]+)*$")
GLOB = re.compile(r"^[\x21-\x7e]{1,128}$")
STATUSES = ("active", "paused", "revoked")
# (the settings module words pydantic's errors the same way for config files)


# Never meant in a name, and able to disguise one in a terminal or a log: C0 and C1 controls,
# line and paragraph separators, and the bidirectional formatting characters (which reorder
# what follows them). Other format characters, such as the zero-width joiner inside emoji, stay.
INVISIBLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def _printable(value: str) -> str:
    if INVISIBLE.search(value):
        raise ValueError("must not contain control or bidirectional formatting characters")
    return value


def _route(value: str) -> str:
    """`/v1/chat/completions/` and `chat/completions` are the same route scope."""
    route = value.strip("/")
    route = route[3:] if route.startswith("v1/") else route
    if not ROUTE.match(route):
        raise ValueError("must be a path under /v1, like chat/completions or embeddings")
    return route


def _glob(value: str) -> str:
    if not GLOB.match(value):
        raise ValueError("must be 1-128 printable characters without spaces (* and ? as wildcards)")
    return value


Text = Annotated[str, Field(max_length=TEXT_LIMIT), AfterValidator(_printable)]
MAX_CREDITS = 10**12 - 1  # 12 digits: the most admit.lua reads as a number
Limit = Annotated[StrictInt, Field(ge=0, le=MAX_CREDITS)]
Seconds = Annotated[StrictInt, Field(ge=1, le=MAX_SECONDS)]
Grace = Annotated[StrictInt, Field(ge=0, le=MAX_SECONDS)]
UnixTime = Annotated[StrictInt, Field(ge=1, lt=MAX_UNIX)]
Route = Annotated[str, Field(max_length=200), AfterValidator(_route)]
Glob = Annotated[str, AfterValidator(_glob)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Scopes(_Spec):
    """Allowed routes (path prefixes under /v1) and models (globs); empty = no restriction."""

    routes: Annotated[list[Route], Field(max_length=50)] = []
    models: Annotated[list[Glob], Field(max_length=50)] = []

    def restricts(self) -> bool:
        return bool(self.routes or self.models)


def _known_plan(plan: str, info: ValidationInfo) -> str:
    plans = (info.context or {}).get("plans")
    if plans is not None and plan not in plans:
        raise ValueError(f"unknown plan {plan!r}; configured plans: {', '.join(plans)}")
    return plan


class NewKey(_Spec):
    plan: str
    name: Text = ""
    owner: Text = ""
    rpm: Limit | None = None
    rpd: Limit | None = None
    tpm: Limit | None = None
    tpd: Limit | None = None
    expires_in: Seconds | None = None
    expires_at: UnixTime | None = None
    scopes: Scopes | None = None
    credits: Limit | None = None
    shadow: bool | None = None  # None: the plan's

    @field_validator("plan")
    @classmethod
    def _plan(cls, plan: str, info: ValidationInfo) -> str:
        return _known_plan(plan, info)

    @field_validator("expires_at")
    @classmethod
    def _one_expiry(cls, expires_at: int | None, info: ValidationInfo) -> int | None:
        if expires_at is not None and info.data.get("expires_in") is not None:
            raise ValueError("give expires_in or expires_at, not both")
        return expires_at


class KeyUpdate(_Spec):
    """A change to a key: only the fields present change; `null` clears an override (rpm, rpd,
    tpm, tpd, shadow), the scopes, the expiry, or the balance (credits: unlimited again)."""

    name: Text | None = None
    owner: Text | None = None
    plan: str | None = None
    rpm: Limit | None = None
    rpd: Limit | None = None
    tpm: Limit | None = None
    tpd: Limit | None = None
    scopes: Scopes | None = None
    expires_at: UnixTime | None = None
    credits: Limit | None = None
    shadow: bool | None = None

    @field_validator("plan")
    @classmethod
    def _plan(cls, plan: str | None, info: ValidationInfo) -> str | None:
        if plan is None:
            raise ValueError("a key always has a plan; give one of the configured plans")
        return _known_plan(plan, info)

    @field_validator("name", "owner")
    @classmethod
    def _not_null(cls, value: str | None) -> str:
        return value or ""  # null and "" both clear a name or owner


class Rotation(_Spec):
    grace_seconds: Grace = 0


class CreditChange(_Spec):
    delta: Annotated[StrictInt, Field(gt=-(10**12), lt=10**12)]


# A page size from a query string: text, parsed (lax), ASCII digits only ("²" is a digit to
# str.isdigit, not to int()), held to 1-1000 whatever its length.
PageSize = Annotated[int, Field(ge=1, le=1000, strict=False)]


class ListQuery(_Spec):
    owner: Text | None = None
    status: str | None = None
    cursor: str | None = None
    limit: PageSize = 100

    @field_validator("status")
    @classmethod
    def _status(cls, status: str | None) -> str | None:
        if status is not None and status not in STATUSES:
            raise ValueError(f"must be one of {', '.join(STATUSES)}")
        return status


Candidate = Annotated[str, Field(max_length=256)]


class LeakReport(_Spec):
    """`POST /admin/leaks`: strings a secret scanner found in public code, and where."""

    candidates: Annotated[list[Candidate], Field(min_length=1, max_length=100)]
    source: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(_printable)]


class AuditQuery(_Spec):
    cursor: str | None = None
    limit: PageSize = 50
    key: Annotated[str, Field(pattern=r"^[0-9A-Za-z]{12}$")] | None = None  # one key's entries


UsageDate = Annotated[date, Field(ge=date(2000, 1, 1), le=date(9999, 12, 30), strict=False)]


class UsageQuery(_Spec):
    """`?from=YYYY-MM-DD&to=YYYY-MM-DD&granularity=day|hour` (and `owner` where it applies):
    by default the last 30 days, or for hours the last 2 days (today and yesterday, UTC)."""

    first: UsageDate | None = Field(None, alias="from")
    last: UsageDate | None = Field(None, alias="to")
    granularity: Literal["day", "hour"] = "day"
    owner: Text | None = None

    def span(self, today: date) -> tuple[date, date]:
        """The dates asked for, both included; ValueError when they make no range edge gives."""
        last = self.last or today
        days = 30 if self.granularity == "day" else 2
        first = self.first or last - timedelta(days=days - 1)
        if first > last:
            raise ValueError("from: must not be after to")
        most = 366 if self.granularity == "day" else 7
        if (last - first).days + 1 > most:
            raise ValueError(f"from: at most {most} days per call by {self.granularity}")
        return first, last


class TopQuery(_Spec):
    """`?date=YYYY-MM-DD&limit=N`: the busiest keys of one UTC day (default today)."""

    day: UsageDate | None = Field(None, alias="date")
    limit: Annotated[int, Field(ge=1, le=100, strict=False)] = 10


def explain(exc: ValidationError) -> tuple[str, str | None]:
    """The first error of `exc` as (one line naming the field, the field's dotted path)."""
    error = exc.errors(include_url=False, include_input=False)[0]
    param = ".".join(error_place(error)) or None
    message = error_message(error, unknown="unknown field")
    return (f"{param}: {message}" if param else message), param


def changed_fields(model: BaseModel) -> dict[str, Any]:
    """The fields a request set (null included), as plain JSON-able values."""
    return {name: _plain(getattr(model, name)) for name in sorted(model.model_fields_set)}


def _plain(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value
