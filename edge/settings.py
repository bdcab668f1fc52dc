"""Every knob of edge in one frozen object.

`load_settings(path, environ)` reads `config/edge.toml` (or the file `EDGE_CONFIG` names), then
applies environment overrides. Each setting `section.name` is overridden by
`EDGE_<SECTION>_<NAME>`; plans by `EDGE_PLANS_<PLAN>_RPM` / `_RPD`. Nothing here touches the
network: side effects happen in `app.py` and `server.py`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path("config") / "edge.toml"
PLAN_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
PREFIX = re.compile(r"^[A-Za-z0-9_-]{1,16}$")


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which setting and why."""


class Secret:
    """A string that never shows itself in `repr`, `str` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 32 * 1024 * 1024
    keepalive_timeout: float = 75.0
    drain_timeout: float = 30.0


@dataclass(frozen=True)
class RedisSettings:
    url: str = ""
    timeout: float = 0.25
    max_connections: int = 256


@dataclass(frozen=True)
class UpstreamSettings:
    url: str = ""
    api_key: Secret = field(default_factory=Secret)
    connect_timeout: float = 5.0
    read_timeout: float = 600.0
    max_connections: int = 1000


@dataclass(frozen=True)
class KeysSettings:
    prefix: str = "gw_sk_"


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"


@dataclass(frozen=True)
class Plan:
    rpm: int
    rpd: int


def default_plans() -> dict[str, Plan]:
    return {
        "free": Plan(rpm=20, rpd=1_000),
        "pro": Plan(rpm=200, rpd=50_000),
        "team": Plan(rpm=1_000, rpd=250_000),
    }


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    keys: KeysSettings = field(default_factory=KeysSettings)
    log: LogSettings = field(default_factory=LogSettings)
    plans: Mapping[str, Plan] = field(default_factory=default_plans)

    @property
    def embedded_redis(self) -> bool:
        return not self.redis.url

    @property
    def demo_upstream(self) -> bool:
        return not self.upstream.url


SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "redis": RedisSettings,
    "upstream": UpstreamSettings,
    "keys": KeysSettings,
    "log": LogSettings,
}


def load_settings(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build `Settings` from a TOML file and the environment; raise `ConfigError` if invalid."""
    env = os.environ if environ is None else environ
    data = _read_toml(path, env)
    unknown = set(data) - set(SECTIONS) - {"plans"}
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    sections = {
        name: _section(name, cls, data.get(name, {}), env) for name, cls in SECTIONS.items()
    }
    plans = _plans(data.get("plans"), env)
    settings = Settings(plans=plans, **sections)
    _validate(settings)
    return settings


def _read_toml(path: str | Path | None, env: Mapping[str, str]) -> dict[str, Any]:
    explicit = path or env.get("EDGE_CONFIG")
    candidate = Path(explicit) if explicit else DEFAULT_CONFIG
    if not candidate.exists():
        if explicit:
            raise ConfigError(f"config file not found: {candidate}")
        return {}
    try:
        with candidate.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{candidate}: {exc}") from None


def _section(name: str, cls: type[Any], table: Any, env: Mapping[str, str]) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{name}]: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for fname in known:
        where = f"{name}.{fname}"
        env_name = f"EDGE_{name}_{fname}".upper()
        if env_name in env:
            values[fname] = _coerce(env[env_name], hints[fname], f"{env_name} ({where})")
        elif fname in table:
            values[fname] = _coerce(table[fname], hints[fname], where)
    return cls(**values)


def _coerce(raw: Any, kind: Any, where: str) -> Any:
    """Turn a TOML or environment value into the field's type, or explain why not."""
    if kind is Secret:
        return Secret(_coerce(raw, str, where))
    if isinstance(kind, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where} must be true or false")
    if kind is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{where} must be an integer")
        try:
            return int(str(raw).replace("_", "")) if isinstance(raw, str) else int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be an integer") from None
    if kind is float:
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} must be a finite number")
        return value
    if not isinstance(raw, str):
        raise ConfigError(f"{where} must be a string")
    return raw


def _plans(table: Any, env: Mapping[str, str]) -> dict[str, Plan]:
    if table is None:
        raw: dict[str, Any] = {n: dataclasses.asdict(p) for n, p in default_plans().items()}
    elif isinstance(table, dict):
        raw = table
    else:
        raise ConfigError("[plans] must be a table of tables")
    plans: dict[str, Plan] = {}
    for name, spec in raw.items():
        if not PLAN_NAME.match(name):
            raise ConfigError(f"plan name {name!r} must match {PLAN_NAME.pattern}")
        if not isinstance(spec, dict) or set(spec) - {"rpm", "rpd"}:
            raise ConfigError(f"[plans.{name}] takes exactly rpm and rpd")
        limits = {}
        for window in ("rpm", "rpd"):
            env_name = f"EDGE_PLANS_{name}_{window}".upper().replace("-", "_")
            where = f"plans.{name}.{window}"
            value = env.get(env_name, spec.get(window))
            if value is None:
                raise ConfigError(f"{where} is missing")
            label = f"{env_name} ({where})" if env_name in env else where
            limits[window] = _coerce(value, int, label)
            if limits[window] < 0:
                raise ConfigError(f"plans.{name}.{window} must be >= 0")
        plans[name] = Plan(**limits)
    if not plans:
        raise ConfigError("at least one plan must be configured")
    return plans


def _validate(s: Settings) -> None:
    positive = {
        "server.max_body_bytes": s.server.max_body_bytes,
        "server.keepalive_timeout": s.server.keepalive_timeout,
        "redis.timeout": s.redis.timeout,
        "redis.max_connections": s.redis.max_connections,
        "upstream.connect_timeout": s.upstream.connect_timeout,
        "upstream.read_timeout": s.upstream.read_timeout,
        "upstream.max_connections": s.upstream.max_connections,
    }
    for where, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where} must be > 0")
    if not 0 < s.server.port < 65536:
        raise ConfigError("server.port must be between 1 and 65535")
    if not PREFIX.match(s.keys.prefix):
        raise ConfigError("keys.prefix must be 1-16 characters of letters, digits, '_' or '-'")
    if s.log.level.lower() not in ("debug", "info", "warning", "error", "critical"):
        raise ConfigError("log.level must be debug, info, warning, error or critical")
    if s.upstream.url and not s.upstream.url.startswith(("http://", "https://")):
        raise ConfigError("upstream.url must start with http:// or https://")
    schemes = ("redis://", "rediss://", "unix://", "redis+cluster://")
    if s.redis.url and not s.redis.url.startswith(schemes):
        raise ConfigError(f"redis.url must start with one of {', '.join(schemes)}")
