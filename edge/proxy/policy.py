"""What may cross edge, in each direction: the request target, request headers and response
headers. Pure functions over bytes, no I/O; `handler.py` applies them.

One representation of the target: the raw path as the client sent it. It must itself start
with `/v1/` (the router checks that), and the upstream URL is that same raw path, minus `/v1`,
appended to the configured base — so what was checked is byte for byte what is forwarded, and
no percent-encoding can move the request outside the base.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import orjson

from edge import errors
from edge.errors import Headers
from edge.keys import KID_LEN
from edge.upstream_settings import UpstreamSettings

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Besides hop-by-hop: the client's credentials (in any header a client might put them), the
# OpenAI organisation and project (the operator's to choose: `upstream.organization`,
# `upstream.project`), and framing the upstream client sets itself (Host, Content-Length).
REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"content-length",
    b"expect",
    b"api-key",
    b"x-api-key",
    b"openai-organization",
    b"openai-project",
}
CREDENTIALS = frozenset({b"authorization", b"api-key", b"x-api-key"})  # where keys may be
# Who the client is, as proxies in front of edge tell it: believed only from
# server.trusted_proxies, rebuilt by `forwarded_headers` for everyone. Every `x-forwarded-*`
# header counts (see `forwarding_name`), and the other names CDNs and proxies use for the
# client's address; a spelling with underscores (`x_forwarded_for`, which some servers read as
# the hyphenated one) is dropped from everyone, trusted proxies included.
CLIENT_ADDRESS = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-originating-ip",
    }
)
# The methods forwarded (RFC 9110's, less TRACE and CONNECT: TRACE makes an upstream echo the
# request it received, provider key included; CONNECT asks for a tunnel). Others get 405.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ALLOW = [(b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")]
# Besides hop-by-hop: uvicorn writes its own Date; edge's rate-limit headers replace the
# provider's (which describe the operator's account, not the client's key), and the provider's
# organisation and project ids are the operator's business.
RESPONSE_DROP = HOP_BY_HOP | {
    b"date",
    b"ratelimit",
    b"ratelimit-policy",
    b"openai-organization",
    b"openai-project",
}
# `Connection` values that name no other header (nearly every response's): nothing to drop.
PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})
API_PREFIX = b"/v1/"
# Single bytes, tested as ints: `b"%" in data` first tries the bytes as an integer, which
# raises (and formats) a TypeError inside CPython on every call; `0x25 in data` is a memchr.
DOT, PERCENT, BACKSLASH = 0x2E, 0x25, 0x5C
BAD_QUERY_BYTE = re.compile(rb"[^\x21-\x7e]")  # spaces, controls, non-ASCII


RawHeaders = list[tuple[bytes, bytes]]


class Inbound(NamedTuple):
    """What the upstream request needs from the client's headers (bytes as they came)."""

    headers: RawHeaders  # to forward: no hop-by-hop, no client credentials
    credentials: RawHeaders  # Authorization, api-key, x-api-key as sent (credentials.py)
    length: bytes | None  # Content-Length as sent
    forwarding: RawHeaders  # X-Forwarded-*, Forwarded, … as sent (see forwarding_name)


# What `inbound_headers` does with a header, by its (lower-case) name.
KEEP, FROM_PROXY, DROP, AUTH, LENGTH, CONNECTION = range(6)
_KINDS: dict[bytes, int] = {}  # header_kind's memo: names repeat from request to request
KINDS_REMEMBERED = 2048


def header_kind(name: bytes) -> int:
    """KEEP (forward it), FROM_PROXY (who the client is: a trusted proxy's to say), DROP, or
    one of the three headers edge reads itself (AUTH, LENGTH, CONNECTION)."""
    if name in CREDENTIALS:
        return AUTH
    if name == b"content-length":
        return LENGTH
    if name == b"connection":
        return CONNECTION
    if name in REQUEST_DROP:
        return DROP
    if forwarding_name(name):
        return DROP if name.find(b"_") >= 0 else FROM_PROXY
    return KEEP


def inbound_headers(raw: RawHeaders) -> Inbound:
    """One pass over the client's headers (names already lower-cased by the server)."""
    headers: RawHeaders = []
    forwarding: RawHeaders = []
    credentials: RawHeaders = []
    length: bytes | None = None
    listed: bytes | None = None
    kinds = _KINDS
    for name, value in raw:
        kind = kinds.get(name)
        if kind is None:
            kind = header_kind(name)
            if len(kinds) < KINDS_REMEMBERED:
                kinds[name] = kind
        if kind == KEEP:
            headers.append((name, value))
        elif kind == FROM_PROXY:
            forwarding.append((name, value))
        elif kind == AUTH:
            credentials.append((name, value))
        elif kind == LENGTH:
            length = value
        elif kind == CONNECTION:
            listed = value if listed is None else listed + b"," + value
    if listed is not None and listed.lower() not in PLAIN_CONNECTION:
        drop = {t.strip().lower() for t in listed.split(b",")}
        headers = [(n, v) for n, v in headers if n not in drop]
    return Inbound(headers, credentials, length, forwarding)


def forwarding_name(name: bytes) -> bool:
    """Whether a (lower-case) header name says who the client is, in any spelling."""
    canonical = name.replace(b"_", b"-")
    return canonical.startswith(b"x-forwarded-") or canonical in CLIENT_ADDRESS


def response_headers(raw: RawHeaders) -> tuple[Headers, bool]:
    """The upstream's response headers minus hop-by-hop ones (RFC 9110 §7.6.1) and those edge
    replaces; names lower-cased, values untouched. And whether the answer is an SSE stream:
    then it says `Cache-Control: no-cache` and `X-Accel-Buffering: no` (whatever the upstream
    said), so nginx-style buffering proxies between edge and the client pass each event on."""
    out: Headers = []
    listed: set[bytes] | None = None
    sse = False
    for name, value in raw:
        lname = name.lower()
        if lname in RESPONSE_DROP or lname.startswith(b"x-ratelimit-"):
            if lname == b"connection" and value.lower() not in PLAIN_CONNECTION:
                listed = (listed or set()) | {t.strip().lower() for t in value.split(b",")}
            continue
        if lname == b"content-type":
            sse = value[:17].lower() == b"text/event-stream"
        out.append((lname, value))
    if listed:
        out = [(n, v) for n, v in out if n not in listed]
    if sse:
        out = [(n, v) for n, v in out if n not in SSE_REPLACED] + SSE_HEADERS
    return out, sse


SSE_REPLACED = frozenset({b"cache-control", b"x-accel-buffering"})
SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def unsafe_path(raw: bytes) -> bool:
    """True for a path the upstream could resolve outside the API base: dot-segments (also
    percent-encoded, in layers, or with path parameters, `..;x`, which Tomcat resolves as
    `..`), encoded slashes or backslashes, control characters or non-ASCII bytes."""
    if not raw.isascii():
        return True
    if DOT not in raw and PERCENT not in raw and BACKSLASH not in raw:
        return False
    for segment in raw.split(b"/"):
        plain = decoded(segment)
        if b"%" in plain and unquote_to_bytes(plain) != plain:
            return True  # still encoded after three layers: nobody means that
        if plain.split(b";", 1)[0].strip(b" ") in (b".", b".."):
            return True
        if b"/" in plain or b"\\" in plain or any(c < 0x20 or c == 0x7F for c in plain):
            return True
    return False


def decoded(raw: bytes, rounds: int = 3) -> bytes:
    """`raw` percent-decoded until it stops changing (at most `rounds` times), so a key hidden
    behind one or more layers of encoding is still seen."""
    for _ in range(rounds):
        if b"%" not in raw:
            break
        raw = unquote_to_bytes(raw)
    return raw


class TargetPolicy:
    """Checks a /v1 request's target and size before any I/O.

    The common case (no `%`, no key prefix, empty query) costs a few substring tests: a key can
    only be in the URL if its prefix is there literally or percent-encoded.
    """

    def __init__(self, key_prefix: str, max_body: int) -> None:
        self._prefix = key_prefix.encode("ascii")
        # A key's prefix followed by at least its public id: a key, or most of one.
        self._key = re.compile(re.escape(self._prefix) + b"[0-9A-Za-z]{%d}" % KID_LEN)
        self.max_body = max_body

    def check(self, raw_path: bytes, query: bytes, length: bytes | None) -> errors.EdgeError | None:
        """The error to answer instead of forwarding, or None."""
        if not raw_path.startswith(API_PREFIX):
            return errors.NotFound()
        if self._key_in_url(raw_path, query):
            return errors.BadRequest(
                "API keys belong in the Authorization header, never in the URL. This request was "
                "not forwarded; consider the key exposed and rotate it.",
                code="api_key_in_url",
            )
        if unsafe_path(raw_path):
            return errors.BadRequest("Invalid request path.", code="invalid_path")
        if query and BAD_QUERY_BYTE.search(query):
            return errors.BadRequest("Invalid query string.", code="invalid_query")
        if length is not None:
            if not length.isdigit() or len(length) > 18:
                return errors.BadRequest("Invalid Content-Length.", code="invalid_content_length")
            if int(length) > self.max_body:
                return self.too_large()
        return None

    def _key_in_url(self, raw_path: bytes, query: bytes) -> bool:
        prefix = self._prefix
        if (
            PERCENT in raw_path
            or raw_path.find(prefix) >= 0
            or (query and (PERCENT in query or query.find(prefix) >= 0))
        ):
            return bool(self._key.search(decoded(raw_path)) or self._key.search(decoded(query)))
        return False

    def too_large(self) -> errors.EdgeError:
        return errors.PayloadTooLarge(
            f"The request body is larger than this server's limit of {self.max_body} bytes."
        )


MAX_MODEL_BYTES = 256  # UTF-8; admit.lua holds a model to the same bound


class BodyModel(NamedTuple):
    """What a request body says its model is: `model`, or None with the `problem` (a message
    for the client; None when the body simply has no usable model)."""

    model: str | None
    problem: str | None = None
    code: str = "invalid_body"


DUPLICATE_MODEL = BodyModel(
    None,
    'The request body has more than one "model" field (names compared ignoring case); '
    "send exactly one.",
)
LONG_MODEL = BodyModel(
    None, f"The model name is longer than {MAX_MODEL_BYTES} bytes.", "model_too_long"
)


def top_object(body: bytes) -> tuple[dict[str, Any] | None, bool]:
    """A JSON request body's top-level object (None if it is not one), and whether two of its
    fields could both be read as the model (`model` and `MODEL`, or `model` twice).

    Such a body is unusable wherever its model matters: an upstream that matches names
    ignoring case (Go's encoding/json) or keeps the first duplicate would run another model
    than the one edge read. orjson keeps only the last of duplicates, so when one is possible
    (the body has `"model"` more than once, in any case, or a `\\u` escape) the standard
    library's parser, which shows every pair, reads the top level instead; it also reads what
    orjson refuses but a lenient upstream might take (NaN, say)."""
    if body.lower().count(b'"model"') <= 1 and b"\\u" not in body:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            return (data if isinstance(data, dict) else None), False
    top: list[list[tuple[str, object]]] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        top[:] = [items]  # the outermost object is the last one completed
        return dict(items)

    try:
        data = json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return None, False
    if not isinstance(data, dict):
        return None, False
    return data, sum(1 for name, _ in top[0] if name.casefold() == "model") > 1


def body_model(body: bytes) -> BodyModel:
    """The request body's top-level "model", for a key whose model scopes must be checked
    (see `top_object`: a body with two candidate fields has none)."""
    data, duplicate = top_object(body)
    if duplicate:
        return DUPLICATE_MODEL
    model = data.get("model") if data is not None else None
    if not isinstance(model, str) or not model:
        return BodyModel(None)
    if len(model.encode("utf-8", "surrogatepass")) > MAX_MODEL_BYTES:
        return LONG_MODEL
    return BodyModel(model)


def upstream_target(base_path: bytes, raw_path: bytes, query: bytes) -> bytes:
    """The request target sent upstream for a checked one: `<base path>/<rest>?<query>`, bytes
    as the client sent them (`base_path`: the upstream URL's path, without a trailing `/`)."""
    target = base_path + raw_path[len(API_PREFIX) - 1 :]
    return target + b"?" + query if query else target


def provider_headers(upstream: UpstreamSettings) -> RawHeaders:
    """What edge adds to every upstream request: the provider key (or Basic auth from the
    upstream URL's user:password, percent-decoded), and the operator's own OpenAI organisation
    and project when set (clients' are dropped: REQUEST_DROP). The settings hold each to
    printable ASCII, so none can break out of its header line."""
    out: list[tuple[str, str]] = []
    key = upstream.api_key.get_secret_value()
    parts = urlsplit(upstream.url)
    if key:
        out.append(("Authorization", f"Bearer {key}"))
    elif parts.username is not None:
        userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        out.append(("Authorization", "Basic " + base64.b64encode(userinfo.encode()).decode()))
    if upstream.organization:
        out.append(("OpenAI-Organization", upstream.organization))
    if upstream.project:
        out.append(("OpenAI-Project", upstream.project))
    return [(name.encode("ascii"), value.encode("ascii")) for name, value in out]


class TrustedProxies:
    """`server.trusted_proxies`: the networks whose forwarding headers edge believes."""

    def __init__(self, networks: tuple[str, ...]) -> None:
        self.networks = [ipaddress.ip_network(n) for n in networks]
        self._seen: dict[str, bool] = {}

    def trusts(self, peer: str | None) -> bool:
        if not self.networks or not peer:
            return False
        known = self._seen.get(peer)
        if known is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                return False
            known = any(address in network for network in self.networks)
            if len(self._seen) < 10_000:
                self._seen[peer] = known
        return known


def forwarded_headers(sent: RawHeaders, peer: str | None, scheme: str, trusted: bool) -> RawHeaders:
    """The forwarding headers edge sends upstream: a trusted proxy's kept, with the address edge
    saw appended; anyone else's dropped and replaced by what edge itself saw."""
    if not trusted or not sent:
        return _own_forwarding(peer, scheme)
    chain = [v for n, v in sent if n == b"x-forwarded-for"]
    out = [(n, v) for n, v in sent if n not in (b"x-forwarded-for", b"x-forwarded-proto")]
    if peer:
        chain.append(peer.encode("ascii"))
    if chain:
        out.append((b"X-Forwarded-For", b", ".join(chain)))
    proto = [v for n, v in sent if n == b"x-forwarded-proto"]
    out.append((b"X-Forwarded-Proto", proto[0] if proto else scheme.encode("ascii")))
    return out


@lru_cache(maxsize=4096)
def _own_forwarding_cached(peer: str | None, scheme: str) -> tuple[tuple[bytes, bytes], ...]:
    xff = ((b"X-Forwarded-For", peer.encode("ascii")),) if peer else ()
    return (*xff, (b"X-Forwarded-Proto", scheme.encode("ascii")))


def _own_forwarding(peer: str | None, scheme: str) -> RawHeaders:
    """What edge itself saw, when no trusted proxy told it more (the common case: cached)."""
    return list(_own_forwarding_cached(peer, scheme))
