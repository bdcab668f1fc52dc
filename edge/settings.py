"""Every knob of edge in one frozen, validated object.

`load_settings(path, environ, overrides)` reads `config/edge.toml` (or the file `EDGE_CONFIG`
names), applies environment overrides, then the command line's, and validates the result with
pydantic. Each setting `section.name` is overridden by `EDGE_<SECTION>_<NAME>`; plans by
`EDGE_PLANS_<PLAN>_RPM` / `_RPD` / `_TPM` / `_TPD`; `EDGE_PRICING_MODELS` is JSON.

Validation is strict where the input is typed: a TOML value must already have the field's type
(`port = 18740.9` or `keepalive_timeout = true` is an error, never coerced); environment values
are text and are parsed (`"8080"` → 8080). Every error names the setting and where it came from,
never its value (it may be a secret). Nothing here touches the network.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from edge.redis_urls import check_url
from edge.urls import check_upstream_url, redact_url

DEFAULT_CONFIG = Path("config") / "edge.toml"
PLAN_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
# At least 3 characters, ending in a separator, so a prefix never matches ordinary text.
PREFIX = r"^[A-Za-z0-9][A-Za-z0-9_-]{1,14}[_-]$"
PATTERN_HELP = {
    "keys": "must be 3-16 letters, digits, '_' or '-', ending in '_' or '-' (e.g. gw_sk_, gp-)",
    "plans": "plan names are 1-32 lowercase letters, digits, '_' or '-'",
}
Seconds = Annotated[float, Field(gt=0, le=86_400 * 365, allow_inf_nan=False)]
Count = Annotated[int, Field(gt=0, le=1_000_000)]


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the setting and why, on one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
    host: Annotated[str, StringConstraints(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65_535)] = 8080
    max_body_bytes: Annotated[int, Field(gt=0, le=2**40)] = 32 * 1024 * 1024
    max_header_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024)] = 16 * 1024
    max_headers: Annotated[int, Field(ge=10, le=10_000)] = 100
    header_timeout: Seconds = 10.0  # a request head must arrive within this
    body_timeout: Seconds = 30.0  # at most this long between two pieces of a request body
    max_connections: Annotated[int, Field(ge=0, le=1_000_000)] = 0  # 0: no cap
    # uvicorn takes these as delays; below a second they would only cause churn.
    keepalive_timeout: Annotated[Seconds, Field(ge=1)] = 75.0
    drain_timeout: Annotated[Seconds, Field(ge=1)] = 30.0
    # SIGTERM: seconds to keep serving with /readyz 503 before closing the listener
    drain_delay: Annotated[float, Field(ge=0, le=600, allow_inf_nan=False)] = 5.0
    workers: Annotated[int, Field(ge=1, le=64)] = 1  # processes serving the same port
    trusted_proxies: Annotated[tuple[IPNetwork, ...], BeforeValidator(_split_list)] = ()


def _redis_url(url: str) -> str:
    if url:
        check_url(url)
    return url


def _upstream_url(url: str) -> str:
    if url:
        check_upstream_url(url)
    return url


def _header_value(value: str) -> str:
    if not value.isascii() or any(c < " " or c == "\x7f" for c in value):
        raise ValueError("must be printable ASCII (it is sent as a header)")
    return value


def _secret_header_value(value: SecretStr) -> SecretStr:
    _header_value(value.get_secret_value())
    return value


RedisUrl = Annotated[str, AfterValidator(_redis_url)]
UpstreamUrl = Annotated[str, AfterValidator(_upstream_url)]
HeaderValue = Annotated[str, AfterValidator(_header_value)]
SecretHeaderValue = Annotated[SecretStr, AfterValidator(_secret_header_value)]


class _WithUrl(_Section):
    """A section whose `url` may carry a password: its repr shows it redacted."""

    url: str = ""

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "url" else value


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network (CIDR)") from None


def _split_list(value: object) -> object:
    """A comma-separated environment value, or a TOML list, as a tuple."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(value)
    return value


IPNetwork = Annotated[str, AfterValidator(_network)]


class RedisSettings(_WithUrl):
    url: RedisUrl = ""
    timeout: Annotated[Seconds, Field(le=60)] = 0.25
    max_connections: Count = 256
    fail_open: bool = False  # Redis away: admit keys this instance validated recently
    fail_open_auth_ttl: Annotated[Seconds, Field(le=86_400)] = 60.0


class UpstreamSettings(_WithUrl):
    url: UpstreamUrl = ""
    api_key: SecretHeaderValue = SecretStr("")
    organization: HeaderValue = ""  # the operator's own OpenAI-Organization; clients' dropped
    project: HeaderValue = ""  # the operator's own OpenAI-Project; clients' are dropped
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 600.0
    max_connections: Count = 1000
    # an answer's head beyond either is a bad response (502): memory stays bounded
    max_header_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    max_headers: Annotated[int, Field(ge=10, le=10_000)] = 100


class KeysSettings(_Section):
    prefix: Annotated[str, StringConstraints(pattern=PREFIX)] = "gw_sk_"
    max_per_owner: Annotated[int, Field(ge=1, le=1_000_000)] = 20  # non-revoked keys per owner


class AdminSettings(_Section):
    token: SecretStr = SecretStr("")  # enables /admin/*; off when empty
    host: Annotated[str, StringConstraints(min_length=1)] = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65_535)] = 0  # 0: /admin and /metrics on the main port
    audit_max: Annotated[int, Field(ge=100, le=10_000_000)] = 10_000  # audit entries kept

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr) -> SecretStr:
        if token.get_secret_value() and len(token.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (or empty: admin API off)")
        return token


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    access: bool = False  # one JSON line per /v1 request on the `edge.access` logger

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


Limit = Annotated[int, Field(ge=0, lt=10**12)]


class Plan(_Section):
    rpm: Limit  # requests per minute and per day
    rpd: Limit
    tpm: Limit | None = None  # LLM tokens per minute and per day; None: no token limit
    tpd: Limit | None = None


Glob = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,128}$")]
PerMillion = Annotated[int, Field(ge=0, le=10**9)]


class ModelPrice(_Section):
    """Credits per million tokens for the models matching `match` (`*` and `?` as wildcards)."""

    match: Glob
    input: PerMillion
    output: PerMillion
    cached_input: PerMillion | None = None  # None: cached input tokens cost `input`


def _json_list(value: object) -> object:
    """A list given as JSON text (an environment value) or in TOML, as a tuple."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON list of {match, input, output}") from None
    return tuple(value) if isinstance(value, list) else value


class PricingSettings(_Section):
    request: PerMillion = 1  # credits an admitted request costs
    models: Annotated[tuple[ModelPrice, ...], BeforeValidator(_json_list)] = ()  # first match

    @property
    def token_priced(self) -> bool:
        return bool(self.models)


class MeteringSettings(_Section):
    # "inject": ask the upstream for usage on a metered key's stream and hide the usage-only
    # chunk from a client that did not ask for it; "client": never touch a request body
    stream_usage: Literal["inject", "client"] = "inject"


class UsageSettings(_Section):
    retention_days: Annotated[int, Field(ge=1, le=3_650)] = 90  # per-key daily usage history


PlanName = Annotated[str, StringConstraints(pattern=PLAN_NAME)]


def default_plans() -> dict[str, Plan]:
    return {
        "free": Plan(rpm=20, rpd=1_000),
        "pro": Plan(rpm=200, rpd=50_000),
        "team": Plan(rpm=1_000, rpd=250_000),
    }


class Settings(_Section):
    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    upstream: UpstreamSettings = UpstreamSettings()
    keys: KeysSettings = KeysSettings()
    admin: AdminSettings = AdminSettings()
    log: LogSettings = LogSettings()
    plans: Annotated[dict[PlanName, Plan], Field(min_length=1)] = Field(
        default_factory=default_plans
    )
    pricing: PricingSettings = PricingSettings()
    metering: MeteringSettings = MeteringSettings()
    usage: UsageSettings = UsageSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.server.workers > 1 and not self.redis.url:
            raise ValueError(
                "server.workers > 1 needs a Redis server (redis.url): the embedded Redis lives "
                "inside one process, so workers would not share limits"
            )
        if self.admin.port and self.admin.port == self.server.port:
            raise ValueError("admin.port must differ from server.port (or be 0: same listener)")
        if "@" in urlsplit(self.upstream.url).netloc and self.upstream.api_key.get_secret_value():
            raise ValueError(
                "upstream.url carries user:password (sent as Basic auth) and upstream.api_key "
                "is set (sent as Bearer): the upstream gets one Authorization header; keep one"
            )
        return self

    @property
    def embedded_redis(self) -> bool:
        return not self.redis.url

    @property
    def demo_upstream(self) -> bool:
        return not self.upstream.url


SECTIONS: dict[str, type[_Section]] = {
    "server": ServerSettings,
    "redis": RedisSettings,
    "upstream": UpstreamSettings,
    "keys": KeysSettings,
    "admin": AdminSettings,
    "log": LogSettings,
    "pricing": PricingSettings,
    "metering": MeteringSettings,
    "usage": UsageSettings,
}
Overrides = Mapping[str, Mapping[str, Any]]


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> Settings:
    """Build `Settings` from a TOML file, the environment and command-line `overrides`
    (`{"server": {"port": 9000}}`, named after their flags in errors); raise `ConfigError`."""
    env = os.environ if environ is None else environ
    where, data = _read_toml(path, env)
    _validate(data, {}, default=where)  # the file as written, before anything is laid over it
    origins: dict[str, str] = {}
    merged = _with_environment(data, env, origins)
    for section, values in (overrides or {}).items():
        for name, value in values.items():
            merged.setdefault(section, {})[name] = value
            flag = "admin-port" if section == "admin" else name.replace("_", "-")
            origins[f"{section}.{name}"] = f"--{flag}"
    return _validate(merged, origins, default=where, strict=False)


def _read_toml(path: str | Path | None, env: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    explicit = path or env.get("EDGE_CONFIG")
    candidate = Path(explicit) if explicit else DEFAULT_CONFIG
    if not candidate.exists():
        if explicit:
            raise ConfigError(f"config file not found: {candidate}")
        return "defaults", {}
    try:
        with candidate.open("rb") as f:
            return str(candidate), tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{candidate}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {candidate}: {exc.strerror}") from None


def _with_environment(
    data: dict[str, Any], env: Mapping[str, str], origins: dict[str, str]
) -> dict[str, Any]:
    """`data` with every `EDGE_<SECTION>_<NAME>` / `EDGE_PLANS_<PLAN>_<RPM|RPD|TPM|TPD>` laid
    over it."""
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, model in SECTIONS.items():
        for name in model.model_fields:
            env_name = f"EDGE_{section}_{name}".upper()
            if env_name in env:
                merged.setdefault(section, {})[name] = env[env_name]
                origins[f"{section}.{name}"] = env_name
    plans = merged.get("plans")
    if plans is None:
        plans = {n: p.model_dump() for n, p in default_plans().items()}
    if isinstance(plans, dict):
        plans = {n: dict(p) if isinstance(p, dict) else p for n, p in plans.items()}
        for plan, spec in plans.items():
            for window in ("rpm", "rpd", "tpm", "tpd"):
                env_name = f"EDGE_PLANS_{plan}_{window}".upper().replace("-", "_")
                if env_name in env and isinstance(spec, dict):
                    spec[window] = env[env_name]
                    origins[f"plans.{plan}.{window}"] = env_name
        merged["plans"] = plans
    return merged


def _validate(
    data: dict[str, Any], origins: Mapping[str, str], default: str, strict: bool = True
) -> Settings:
    try:
        return Settings.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise ConfigError("; ".join(_explain(exc, origins, default))) from None


def error_place(error: ErrorDetails) -> list[str]:
    """Where a pydantic error is, without validator-function entries."""
    return [str(part) for part in error["loc"] if not str(part).startswith("function-")]


def error_message(error: ErrorDetails, unknown: str = "unknown setting") -> str:
    """A pydantic error's message, said plainly (shared by settings and request bodies)."""
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        return unknown
    if error["type"] == "missing":
        return "missing"
    if error["type"] == "json_invalid":
        return "the body is not valid JSON"
    return message.removeprefix("Value error, ")


def _explain(exc: ValidationError, origins: Mapping[str, str], default: str) -> Iterator[str]:
    for error in exc.errors(include_url=False, include_input=False):
        loc = error_place(error)
        if loc and loc[-1] in ("[key]", "str") and error["type"] == "string_pattern_mismatch":
            loc = loc[:-1]
        dotted = ".".join(loc) or "config"
        # an item of a list set by the environment (server.trusted_proxies.0) came from it
        source = next(
            (
                origins[".".join(loc[:n])]
                for n in range(len(loc), 0, -1)
                if ".".join(loc[:n]) in origins
            ),
            default,
        )
        message = error_message(error)
        if error["type"] == "string_pattern_mismatch":
            message = PATTERN_HELP.get(loc[0], message)
        yield f"{dotted} ({source}): {message}"
