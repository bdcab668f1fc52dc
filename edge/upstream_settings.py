"""The upstream sections of the settings: `[upstream]` (one provider), `[[upstreams]]`
(several, chosen by model), `[routing]` (failover and breakers), and `Upstream`, one provider
as the data plane uses it. Re-exported by `settings`; validated with it."""

from __future__ import annotations

from typing import Annotated, NamedTuple

from pydantic import BeforeValidator, Field, SecretStr, model_validator

from edge.setting_types import (
    CaBundle,
    Count,
    CountOrZero,
    EnvName,
    Glob,
    HeaderValue,
    PemFile,
    ProxyUrl,
    RouteRule,
    Seconds,
    SecretHeaderValue,
    Section,
    Status,
    UpstreamName,
    UpstreamUrl,
    WithUrl,
    split_list,
)
from edge.tls_files import client_context


class UpstreamSettings(WithUrl):
    url: UpstreamUrl = ""
    api_key: SecretHeaderValue = SecretStr("")
    organization: HeaderValue = ""  # the operator's own OpenAI-Organization; clients' dropped
    project: HeaderValue = ""  # the operator's own OpenAI-Project; clients' are dropped
    connect_timeout: Seconds = 5.0
    read_timeout: Seconds = 600.0
    max_connections: Count = 1000
    # kept open ahead of demand, per process (0: none); at most max_connections
    min_connections: CountOrZero = 0
    # an answer's head beyond either is a bad response (502): memory stays bounded
    max_header_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = 64 * 1024
    max_headers: Annotated[int, Field(ge=10, le=10_000)] = 100
    ca_file: CaBundle = ""  # a private CA bundle, trusted instead of the system's
    cert_file: PemFile = ""  # a client certificate (and its key) for mutual TLS
    key_file: PemFile = ""
    proxy: ProxyUrl = ""  # http://[user:pass@]host:port, "direct", or "": HTTPS_PROXY & co.

    @model_validator(mode="after")
    def _tls(self) -> UpstreamSettings:
        if self.ca_file or self.cert_file or self.key_file:
            client_context(self.ca_file, self.cert_file, self.key_file)
        return self

    @model_validator(mode="after")
    def _min_connections(self) -> UpstreamSettings:
        if self.min_connections > self.max_connections:
            raise ValueError(
                f"min_connections ({self.min_connections}) is more than max_connections "
                f"({self.max_connections})"
            )
        return self


class UpstreamEntry(WithUrl):
    """One of several upstreams (`[[upstreams]]`). Unset timeouts and limits are `[upstream]`'s;
    the provider key is read from the variable `api_key_env` names, never from the file."""

    name: UpstreamName
    url: UpstreamUrl
    api_key_env: EnvName = ""
    api_key: SecretHeaderValue = SecretStr("")  # filled from api_key_env by load_settings
    models: Annotated[tuple[Glob, ...], BeforeValidator(split_list)] = ("*",)
    weight: Annotated[int, Field(ge=1, le=1_000)] = 1
    routes: Annotated[tuple[RouteRule, ...], BeforeValidator(split_list)] = ()
    organization: HeaderValue = ""
    project: HeaderValue = ""
    connect_timeout: Seconds | None = None
    read_timeout: Seconds | None = None
    max_connections: Count | None = None
    min_connections: CountOrZero | None = None
    ca_file: CaBundle | None = None  # None: [upstream]'s
    cert_file: PemFile | None = None
    key_file: PemFile | None = None
    proxy: ProxyUrl | None = None


class RoutingSettings(Section):
    # answers that send a request on to the next upstream serving its model
    failover_statuses: Annotated[tuple[Status, ...], BeforeValidator(split_list)] = (
        429, 500, 502, 503, 504,
    )  # fmt: skip
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 2  # upstreams tried per request
    cooldown_failures: Annotated[int, Field(ge=1, le=100_000)] = 5  # within cooldown_window...
    cooldown_window: Seconds = 30.0
    cooldown_seconds: Seconds = 30.0  # ...take an upstream out for this long


class Upstream(NamedTuple):
    """An upstream as the data plane uses it: `[upstream]` is one named `default` serving
    every model; each `[[upstreams]]` entry is one with `[upstream]`'s values where unset."""

    name: str
    settings: UpstreamSettings
    models: tuple[str, ...] = ("*",)
    weight: int = 1
    routes: tuple[str, ...] = ()
