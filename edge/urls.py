"""URL checks and redaction shared by settings, logs and the banner. Pure, no I/O."""

from __future__ import annotations

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
