"""Every knob of edge in one frozen, validated object.

`load_settings(path, environ, overrides)` reads `config/edge.toml` (or the file `EDGE_CONFIG`
names), applies environment overrides, then the command line's, and validates the result with
pydantic. Each setting `section.name` is overridden by `EDGE_<SECTION>_<NAME>`; plans by
`EDGE_PLANS_<PLAN>_RPM` / `_RPD` / `_TPM` / `_TPD` / `_SHADOW`; `EDGE_PRICING_MODELS` is JSON.

Validation is strict where the input is typed: a TOML value must already have the field's type
(`port = 18740.9` or `keepalive_timeout = true` is an error, never coerced); environment values
are text and are parsed (`"8080"` → 8080). Every error names the setting and where it came from,
never its value (it may be a secret). Nothing here touches the network.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from edge.setting_types import (
    Count,
    Glob,
    IPNetwork,
    Limit,
    PerMillion,
    RedisUrl,
    Seconds,
    Section,
    WithUrl,
    error_message,
    error_place,
    json_list,
    split_list,
)
from edge.upstream_settings import (
    RoutingSettings,
    Upstream,
    UpstreamEntry,
    UpstreamSettings,
)
from edge.urls import check_upstream_url

DEFAULT_CONFIG = Path("config") / "edge.toml"
PLAN_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
# At least 3 characters, ending in a separator, so a prefix never matches ordinary text.
PREFIX = r"^[A-Za-z0-9][A-Za-z0-9_-]{1,14}[_-]$"
PATTERN_HELP = {
    "keys": "must be 3-16 letters, digits, '_' or '-', ending in '_' or '-' (e.g. gw_sk_, gp-)",
    "plans": "plan names are 1-32 lowercase letters, digits, '_' or '-'",
}


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the setting and why, on one line."""


class ServerSettings(Section):
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
    trusted_proxies: Annotated[tuple[IPNetwork, ...], BeforeValidator(split_list)] = ()
    # seconds an SSE answer's upstream may be silent before edge writes a comment (0: off)
    sse_keepalive: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 15.0


class RedisSettings(WithUrl):
    url: RedisUrl = ""
    timeout: Annotated[Seconds, Field(le=60)] = 0.25
    max_connections: Count = 256
    fail_open: bool = False  # Redis away: admit keys this instance validated recently
    fail_open_auth_ttl: Annotated[Seconds, Field(le=86_400)] = 60.0


def _otlp_url(url: str) -> str:
    """An OTLP/HTTP collector's base URL (spans go to <url>/v1/traces)."""
    if url:
        check_upstream_url(url)
    return url


KeyHeader = Literal["authorization", "bearer", "api-key", "x-api-key"]


class KeysSettings(Section):
    prefix: Annotated[str, StringConstraints(pattern=PREFIX)] = "gw_sk_"
    max_per_owner: Annotated[int, Field(ge=1, le=1_000_000)] = 20  # non-revoked keys per owner
    # where a client's key may be: "authorization" (Bearer, or the bare key), "bearer" (only
    # `Authorization: Bearer`), "api-key" (Azure's SDKs), "x-api-key" (Anthropic-style)
    headers: Annotated[tuple[KeyHeader, ...], BeforeValidator(split_list), Field(min_length=1)] = (
        "authorization", "api-key", "x-api-key",
    )  # fmt: skip
    revoke_leaked: bool = True  # POST /admin/leaks revokes the real keys it is given


class AdminSettings(Section):
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


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    access: bool = False  # one JSON line per /v1 request on the `edge.access` logger

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class Plan(Section):
    rpm: Limit  # requests per minute and per day
    rpd: Limit
    tpm: Limit | None = None  # LLM tokens per minute and per day; None: no token limit
    tpd: Limit | None = None
    shadow: bool = False  # the limits are observed and counted, not enforced


class ModelPrice(Section):
    """Credits per million tokens for the models matching `match` (`*` and `?` as wildcards)."""

    match: Glob
    input: PerMillion
    output: PerMillion
    cached_input: PerMillion | None = None  # None: cached input tokens cost `input`


class PricingSettings(Section):
    request: PerMillion = 1  # credits an admitted request costs
    models: Annotated[tuple[ModelPrice, ...], BeforeValidator(json_list)] = ()  # first match

    @property
    def token_priced(self) -> bool:
        return bool(self.models)


class MeteringSettings(Section):
    # "inject": ask the upstream for usage on a metered key's stream and hide the usage-only
    # chunk from a client that did not ask for it; "client": never touch a request body
    stream_usage: Literal["inject", "client"] = "inject"


class TracingSettings(Section):
    otlp_endpoint: Annotated[str, AfterValidator(_otlp_url)] = ""  # "": tracing off
    service_name: Annotated[str, StringConstraints(min_length=1, max_length=100)] = "edge"
    # the share of requests traced (a client's sampled traceparent is always followed)
    sample_ratio: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 1.0


class UsageSettings(Section):
    retention_days: Annotated[int, Field(ge=1, le=3_650)] = 90  # per-key daily usage history


PlanName = Annotated[str, StringConstraints(pattern=PLAN_NAME)]


def default_plans() -> dict[str, Plan]:
    return {
        "free": Plan(rpm=20, rpd=1_000),
        "pro": Plan(rpm=200, rpd=50_000),
        "team": Plan(rpm=1_000, rpd=250_000),
    }


class Settings(Section):
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
    upstreams: Annotated[tuple[UpstreamEntry, ...], BeforeValidator(json_list)] = ()
    routing: RoutingSettings = RoutingSettings()
    tracing: TracingSettings = TracingSettings()

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
        if self.upstreams and self.upstream.url:
            raise ValueError(
                "upstreams: [upstream] url and [[upstreams]] are both set; keep one "
                "(a single [[upstreams]] entry is the same as [upstream])"
            )
        names = [entry.name for entry in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstreams: two upstreams have the same name")
        for entry in self.upstreams:  # each entry with [upstream]'s: valid together?
            _entry_settings(self.upstream, entry)
        return self

    @property
    def upstream_list(self) -> tuple[Upstream, ...]:
        """The upstreams requests go to, in the configured order."""
        if not self.upstreams:
            return (Upstream("default", self.upstream),)
        base = self.upstream
        return tuple(
            Upstream(
                entry.name, _entry_settings(base, entry), entry.models, entry.weight, entry.routes
            )
            for entry in self.upstreams
        )

    @property
    def embedded_redis(self) -> bool:
        return not self.redis.url

    @property
    def demo_upstream(self) -> bool:
        return not self.upstream.url and not self.upstreams


SECTIONS: dict[str, type[Section]] = {
    "server": ServerSettings,
    "redis": RedisSettings,
    "upstream": UpstreamSettings,
    "keys": KeysSettings,
    "admin": AdminSettings,
    "log": LogSettings,
    "pricing": PricingSettings,
    "metering": MeteringSettings,
    "usage": UsageSettings,
    "routing": RoutingSettings,
    "tracing": TracingSettings,
}
Overrides = Mapping[str, Mapping[str, Any]]


def _entry_settings(base: UpstreamSettings, entry: UpstreamEntry) -> UpstreamSettings:
    """An `[[upstreams]]` entry's settings: its own, `[upstream]`'s where it has none, checked
    together by `UpstreamSettings`' own validators (an entry's TLS files must load with
    `[upstream]`'s, its `min_connections` fit its `max_connections`). ValueError naming the
    entry when they do not."""
    own = {
        "url": entry.url,
        "api_key": entry.api_key,
        "organization": entry.organization,
        "project": entry.project,
        "connect_timeout": entry.connect_timeout or base.connect_timeout,
        "read_timeout": entry.read_timeout or base.read_timeout,
        "max_connections": entry.max_connections or base.max_connections,
    }
    for name in ("ca_file", "cert_file", "key_file", "proxy", "min_connections"):
        if getattr(entry, name) is not None:
            own[name] = getattr(entry, name)
    try:
        return UpstreamSettings.model_validate({**dict(base), **own})
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ValueError(f"upstreams: {entry.name}: {problem}") from None


def load_settings(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Overrides | None = None,
) -> Settings:
    """Build `Settings` from a TOML file, the environment and command-line `overrides`
    (`{"server": {"port": 9000}}`, named after their flags in errors); raise `ConfigError`."""
    env = os.environ if environ is None else environ
    where, data = _read_toml(path, env)
    _refuse_file_keys(data, where)
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
            for window in ("rpm", "rpd", "tpm", "tpd", "shadow"):
                env_name = f"EDGE_PLANS_{plan}_{window}".upper().replace("-", "_")
                if env_name in env and isinstance(spec, dict):
                    spec[window] = env[env_name]
                    origins[f"plans.{plan}.{window}"] = env_name
        merged["plans"] = plans
    if "EDGE_UPSTREAMS" in env:
        merged["upstreams"] = env["EDGE_UPSTREAMS"]
        origins["upstreams"] = "EDGE_UPSTREAMS"
    _with_provider_keys(merged, env, origins.get("upstreams", "config"))
    return merged


def _refuse_file_keys(data: dict[str, Any], where: str) -> None:
    """A provider key written into `[[upstreams]]`: refused (they are read from the
    environment, so a config file can be shared, committed and shown)."""
    entries = data.get("upstreams")
    for n, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, dict) and "api_key" in entry:
            raise ConfigError(
                f"upstreams.{n}.api_key ({where}): provider keys are not read from files; "
                "name the environment variable that holds it with api_key_env"
            )


def _with_provider_keys(merged: dict[str, Any], env: Mapping[str, str], where: str) -> None:
    """Each `[[upstreams]]` entry's `api_key`, read from the variable its `api_key_env` names."""
    entries = merged.get("upstreams")
    if isinstance(entries, str):
        try:
            entries = json.loads(entries)
        except ValueError:
            return  # the validator says what is wrong with it
    if not isinstance(entries, list):
        return
    entries = [dict(e) if isinstance(e, dict) else e for e in entries]
    merged["upstreams"] = entries
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict):
            continue
        if "api_key" in entry:
            raise ConfigError(
                f"upstreams.{n}.api_key ({where}): provider keys are not read from the "
                "configuration; name the environment variable that holds it with api_key_env"
            )
        variable = entry.get("api_key_env")
        if isinstance(variable, str) and variable:
            if variable not in env:
                raise ConfigError(
                    f"upstreams.{n}.api_key_env ({where}): the variable {variable} is not set"
                )
            entry["api_key"] = env[variable]


def _validate(
    data: dict[str, Any], origins: Mapping[str, str], default: str, strict: bool = True
) -> Settings:
    try:
        return Settings.model_validate(data, strict=strict)
    except ValidationError as exc:
        raise ConfigError("; ".join(_explain(exc, origins, default))) from None


def _explain(exc: ValidationError, origins: Mapping[str, str], default: str) -> Iterator[str]:
    for error in exc.errors(include_url=False, include_input=False):
        loc = error_place(error)
        if loc and loc[-1] in ("[key]", "str") and error["type"] == "string_pattern_mismatch":
            loc = loc[:-1]
        dotted = ".".join(loc) or "config"
        # an item of a list set by the environment (server.trusted_proxies.0) came from it;
        # a whole section's error (two fields that go together) from where its fields came
        source = next(
            (
                origins[".".join(loc[:n])]
                for n in range(len(loc), 0, -1)
                if ".".join(loc[:n]) in origins
            ),
            _section_origin(origins, dotted, str(error["msg"]), default),
        )
        message = error_message(error)
        if error["type"] == "string_pattern_mismatch":
            message = PATTERN_HELP.get(loc[0], message)
        yield f"{dotted} ({source}): {message}"


def _section_origin(origins: Mapping[str, str], section: str, message: str, default: str) -> str:
    """Where a whole section's error came from: the origin of a field it names, else of any
    of the section's fields, else `default`."""
    fields = {k: v for k, v in origins.items() if k.startswith(section + ".")}
    named = [v for k, v in fields.items() if k.rsplit(".", 1)[1] in message]
    return (named or list(fields.values()) or [default])[0]
