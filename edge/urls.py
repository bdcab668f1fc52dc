"""URL checks and redaction shared by settings, logs and the banner. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """`url` with any password in its user-info replaced by `***` (for repr and logs)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    if parts.password is None:
        return url
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def check_upstream_url(url: str) -> None:
    """Raise ValueError unless `url` is an absolute http(s) URL with a host and a valid port,
    and no query or fragment (edge appends the client's path and query to it)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if port == 0:
        raise ValueError("has port 0")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("must not carry a query or fragment")
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise ValueError("must be ASCII without spaces or control characters")


def check_proxy_url(url: str) -> None:
    """Raise ValueError unless `url` is an `http://[user:password@]host:port` proxy URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError('must be an http:// proxy URL with a host (or "direct")')
    if port == 0 or (parts.path not in ("", "/")) or parts.query or parts.fragment:
        raise ValueError("must be http://[user:password@]host:port, nothing after the port")
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise ValueError("must be ASCII without spaces or control characters")


def egress_proxy(upstream: str, setting: str, environ: Mapping[str, str]) -> str | None:
    """The proxy URL requests to `upstream` go through, or None: `setting` (upstream.proxy)
    when set ("direct": none), else HTTPS_PROXY / HTTP_PROXY by the upstream's scheme (either
    case), unless NO_PROXY lists its host (names, `.domain` or `domain` suffixes, addresses,
    `*`; a `:port` narrows an entry to that port)."""
    if setting:
        return None if setting == "direct" else setting
    parts = urlsplit(upstream)
    name = "https_proxy" if parts.scheme == "https" else "http_proxy"
    proxy = environ.get(name) or environ.get(name.upper()) or ""
    if not proxy:
        return None
    host = (parts.hostname or "").lower()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    for entry in (environ.get("no_proxy") or environ.get("NO_PROXY") or "").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return None
        entry_host, _, entry_port = entry.rpartition(":") if _has_port(entry) else (entry, "", "")
        if entry_port and entry_port != str(port):
            continue
        entry_host = entry_host.strip("[]").lstrip("*")
        if host == entry_host.lstrip(".") or (
            entry_host and host.endswith("." + entry_host.lstrip("."))
        ):
            return None
    return proxy


def _has_port(entry: str) -> bool:
    """`host:port` or `[v6]:port` (a bare IPv6 address has colons but no port)."""
    if entry.startswith("["):
        return "]:" in entry
    return entry.count(":") == 1
