"""The field types edge's settings are made of (sections, durations, URLs, header values,
lists given as text), and pydantic's errors said plainly (settings and admin bodies alike)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, StringConstraints
from pydantic_core import ErrorDetails

from edge.redis_urls import check_url
from edge.tls_files import client_context, readable
from edge.urls import check_proxy_url, check_upstream_url, redact_url

Seconds = Annotated[float, Field(gt=0, le=86_400 * 365, allow_inf_nan=False)]
Count = Annotated[int, Field(gt=0, le=1_000_000)]
CountOrZero = Annotated[int, Field(ge=0, le=1_000_000)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class WithUrl(Section):
    """A section whose `url` may carry a password: its repr shows it redacted."""

    url: str = ""

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name in ("url", "proxy") and value else value


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"{value!r} is not an IP network (CIDR)") from None


def split_list(value: object) -> object:
    """A comma-separated environment value, or a TOML list, as a tuple."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    if isinstance(value, list):
        return tuple(value)
    return value


IPNetwork = Annotated[str, AfterValidator(_network)]

Limit = Annotated[int, Field(ge=0, lt=10**12)]

Glob = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,128}$")]
PerMillion = Annotated[int, Field(ge=0, le=10**9)]


def json_list(value: object) -> object:
    """A list given as JSON text (an environment value) or in TOML, as a tuple."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON list of tables") from None
    return tuple(value) if isinstance(value, list) else value


UpstreamName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,31}$")]
EnvName = Annotated[str, StringConstraints(pattern=r"^([A-Za-z_][A-Za-z0-9_]{0,127})?$")]
RouteRule = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]

Status = Annotated[int, Field(ge=400, le=599)]


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


def _pem_file(path: str) -> str:
    return readable(path) if path else path


def _ca_bundle(path: str) -> str:
    if path:
        client_context(readable(path))
    return path


def _proxy_url(url: str) -> str:
    if url and url != "direct":
        check_proxy_url(url)
    return url


PemFile = Annotated[str, AfterValidator(_pem_file)]  # "" or a readable file
CaBundle = Annotated[str, AfterValidator(_ca_bundle)]  # "" or a PEM bundle of certificates
ProxyUrl = Annotated[str, AfterValidator(_proxy_url)]  # "", "direct" or http://[u:p@]host:port
