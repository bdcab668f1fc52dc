"""The upstream client's TLS context from the operator's PEM files (`upstream.ca_file`,
`cert_file`, `key_file`): a private CA trusted instead of the system's, and a client
certificate for mutual TLS. Built when the settings are validated, so an unreadable or broken
file stops edge at start-up with one line, not at the first request."""

from __future__ import annotations

import ssl
from functools import lru_cache


def readable(path: str) -> str:
    """`path` if it can be read; ValueError (saying why) if not."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return path


def client_context(ca_file: str = "", cert_file: str = "", key_file: str = "") -> ssl.SSLContext:
    """Certificates required and host names checked, as Python's defaults; `ca_file` replaces
    the system's trust store. ValueError when a file does not load."""
    return _cached(ca_file, cert_file, key_file)


@lru_cache(maxsize=32)
def _cached(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    if bool(cert_file) != bool(key_file):
        raise ValueError("cert_file and key_file go together (a client certificate and its key)")
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{ca_file} is not a PEM certificate bundle ({exc})") from None
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"cert_file {cert_file} and key_file {key_file}: not a PEM certificate and its "
                f"key ({exc})"
            ) from None
    return context
