"""edge/proxy/policy.py: what may cross edge in each direction, decided without I/O.

Covers the request target (one representation: the raw path, which must start with `/v1/`
and is forwarded byte for byte; every percent-encoded spelling of the prefix is refused), keys
in the URL (seen through percent-encoding), the headers dropped each way, and what edge adds
upstream (provider key, the operator's OpenAI organisation and project).
"""

from __future__ import annotations

import itertools

import pytest
from pydantic import SecretStr

from edge import errors
from edge.keys import make_key, new_kid
from edge.proxy.credentials import Found, KeyHeaders
from edge.proxy.policy import (
    FORWARDED_METHODS,
    MAX_MODEL_BYTES,
    TargetPolicy,
    TrustedProxies,
    body_model,
    decoded,
    forwarded_headers,
    inbound_headers,
    provider_headers,
    response_headers,
    unsafe_path,
    upstream_target,
)
from edge.transport.upstream.pool import Origin
from edge.upstream_settings import UpstreamSettings

POLICY = TargetPolicy("gw_sk_", max_body=1000)


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../admin",
        b"/v1/./models",
        b"/v1/%2e%2e/admin",
        b"/v1/%2E%2E/admin",
        b"/v1/a%2F..%2Fb",
        b"/v1/a%5c..",
        b"/v1/a\\b",
        b"/v1/a%00b",
        b"/v1/caf\xc3\xa9",
        # path parameters (Tomcat resolves `..;x` as `..`) and layers of encoding
        b"/v1/chat/completions/..;/files",
        b"/v1/chat/completions/.;/x",
        b"/v1/a/..;jsessionid=1/b",
        b"/v1/a/%2e%2e;x/b",
        b"/v1/a/%252e%252e/b",
        b"/v1/a/%25252e%25252e/b",
        b"/v1/a/%2525252e/b",  # still encoded after three layers
        b"/v1/a/%252f/b",
        b"/v1/a/%2e%2e%20/b",
    ],
)
def test_unsafe_paths(path: bytes) -> None:
    assert unsafe_path(path)


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/chat/completions",
        b"/v1/models/gpt-4.1-mini",
        b"/v1/files/file-abc.jsonl/content",
        b"/v1/a%20b",
        b"/v1/...",
        b"/v1/a;b/c",
        b"/v1/files/a.b;c",
        b"/v1/a%2525b",  # a literal "%25" (two layers): decodes to "%", not a path trick
    ],
)
def test_safe_paths(path: bytes) -> None:
    assert not unsafe_path(path)


def test_response_headers_drop_hop_by_hop_and_replaced_ones() -> None:
    raw = (
        (b"Content-Type", b"text/event-stream"),
        (b"Connection", b"keep-alive, X-Up"),
        (b"X-Up", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Date", b"Mon, 01 Jan 2024 00:00:00 GMT"),
        (b"x-ratelimit-limit-requests", b"10000"),
        (b"x-ratelimit-remaining-tokens", b"5"),
        (b"openai-organization", b"org-operator"),
        (b"Content-Encoding", b"gzip"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"x-request-id", b"req_1"),
    )
    assert response_headers(raw) == (
        [
            (b"content-type", b"text/event-stream"),
            (b"content-encoding", b"gzip"),
            (b"set-cookie", b"a=1"),
            (b"set-cookie", b"b=2"),
            (b"x-request-id", b"req_1"),
            (b"cache-control", b"no-cache"),  # every SSE answer: proxies must not buffer it
            (b"x-accel-buffering", b"no"),
        ],
        True,
    )
    plain = ((b"Content-Type", b"application/json"), (b"Cache-Control", b"max-age=60"))
    assert response_headers(plain) == (
        [(b"content-type", b"application/json"), (b"cache-control", b"max-age=60")],
        False,
    )
    sse = ((b"content-type", b"Text/Event-Stream; charset=utf-8"), (b"cache-control", b"public"))
    headers, is_sse = response_headers(sse)
    assert is_sse and headers.count((b"cache-control", b"no-cache")) == 1
    assert (b"cache-control", b"public") not in headers


def test_inbound_headers_drop_hop_by_hop_credentials_and_framing() -> None:
    raw = [
        (b"host", b"edge"),
        (b"authorization", b"Bearer gw_sk_x"),
        (b"connection", b"keep-alive, X-Secret"),
        (b"x-secret", b"1"),
        (b"keep-alive", b"5"),
        (b"te", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"h2c"),
        (b"proxy-authorization", b"Basic x"),
        (b"proxy-connection", b"keep-alive"),
        (b"api-key", b"gw_sk_x"),
        (b"x-api-key", b"gw_sk_x"),
        (b"expect", b"100-continue"),
        (b"content-length", b"12"),
        (b"content-type", b"application/json"),
        (b"accept-encoding", b"gzip"),
        (b"user-agent", b"OpenAI/Python 1.0 \xe9"),
    ]
    inbound = inbound_headers(raw)
    assert inbound.headers == [
        (b"content-type", b"application/json"),
        (b"accept-encoding", b"gzip"),
        (b"user-agent", b"OpenAI/Python 1.0 \xe9"),
    ]
    assert inbound.credentials == [
        (b"authorization", b"Bearer gw_sk_x"),
        (b"api-key", b"gw_sk_x"),
        (b"x-api-key", b"gw_sk_x"),
    ]
    assert inbound.length == b"12"


def test_credentials_are_collected_from_every_header_a_key_may_be_in() -> None:
    raw = [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer a"), (b"x-api-key", b"b")]
    assert inbound_headers(raw).credentials == raw
    assert inbound_headers([]).credentials == []


ALL = ("authorization", "api-key", "x-api-key")
KEY = b"gw_sk_" + b"A" * 50
OTHER = b"gw_sk_" + b"B" * 50


@pytest.mark.parametrize(
    ("accepted", "credentials", "found", "token"),
    [
        (ALL, [(b"authorization", b"Bearer " + KEY)], Found.KEY, KEY),
        (ALL, [(b"authorization", b"bearer " + KEY)], Found.KEY, KEY),
        (ALL, [(b"authorization", KEY)], Found.KEY, KEY),  # bare, with the prefix
        (ALL, [(b"authorization", b"sk-" + KEY[6:])], Found.UNUSABLE, None),
        (ALL, [(b"authorization", b"Basic eDp5")], Found.UNUSABLE, None),
        (ALL, [(b"api-key", KEY)], Found.KEY, KEY),
        (ALL, [(b"x-api-key", KEY)], Found.KEY, KEY),
        (ALL, [(b"api-key", KEY), (b"authorization", b"Bearer " + KEY)], Found.KEY, KEY),
        (ALL, [(b"api-key", KEY), (b"x-api-key", OTHER)], Found.CONFLICT, None),
        (ALL, [(b"authorization", b"Bearer " + KEY), (b"api-key", OTHER)], Found.CONFLICT, None),
        (ALL, [(b"authorization", b"Bearer " + KEY)] * 2, Found.UNUSABLE, None),
        (
            ALL,
            [(b"authorization", b"Bearer " + KEY), (b"authorization", b"Bearer " + OTHER)],
            Found.CONFLICT,
            None,
        ),
        (ALL, [], Found.MISSING, None),
        (("bearer",), [(b"authorization", KEY)], Found.UNUSABLE, None),  # bare: not accepted
        (("bearer",), [(b"api-key", KEY)], Found.MISSING, None),  # as if absent
        (("bearer",), [(b"api-key", OTHER), (b"authorization", b"Bearer " + KEY)], Found.KEY, KEY),
        (("api-key",), [(b"authorization", b"Bearer " + KEY)], Found.MISSING, None),
        (("api-key",), [(b"api-key", b"")], Found.UNUSABLE, None),
    ],
)
def test_key_headers_find_the_one_key(
    accepted: tuple[str, ...],
    credentials: list[tuple[bytes, bytes]],
    found: Found,
    token: bytes | None,
) -> None:
    assert KeyHeaders(accepted, "gw_sk_").find(credentials) == (found, token)


def test_inbound_headers_drop_the_clients_openai_organization_and_project() -> None:
    raw = [
        (b"openai-organization", b"org-chosen-by-client"),
        (b"openai-project", b"proj-chosen-by-client"),
        (b"openai-beta", b"assistants=v2"),
    ]
    assert inbound_headers(raw).headers == [(b"openai-beta", b"assistants=v2")]


def test_provider_headers_carry_the_operators_key_organization_and_project() -> None:
    upstream = UpstreamSettings(
        api_key=SecretStr("sk-op"), organization="org-op", project="proj-op"
    )
    assert provider_headers(upstream) == [
        (b"Authorization", b"Bearer sk-op"),
        (b"OpenAI-Organization", b"org-op"),
        (b"OpenAI-Project", b"proj-op"),
    ]
    assert provider_headers(UpstreamSettings()) == []


def test_user_info_in_the_upstream_url_is_sent_as_basic_auth() -> None:
    upstream = UpstreamSettings(url="https://user:p%40ss@vllm.internal/v1")
    assert provider_headers(upstream) == [(b"Authorization", b"Basic dXNlcjpwQHNz")]  # user:p@ss
    assert Origin(upstream.url).host_header == b"vllm.internal"


def _encodings(text: str) -> set[str]:
    """Every spelling of `text` with any subset of its characters percent-encoded, in upper
    and lower case hex."""
    options = [
        {c, f"%{ord(c):02X}", f"%{ord(c):02x}"} if c != "/" else {c, "%2F", "%2f"} for c in text
    ]
    return {"".join(p) for p in itertools.product(*options)}


@pytest.mark.parametrize("prefix", sorted(_encodings("/v1/") - {"/v1/"}))
def test_every_encoded_spelling_of_the_prefix_is_refused(prefix: str) -> None:
    """`/%761/models` must never reach the upstream as `/v161/models` (or another port)."""
    raw = (prefix + "models").encode()
    err = POLICY.check(raw, b"", None)
    assert isinstance(err, errors.NotFound)


@pytest.mark.parametrize("raw", [b"/v1", b"//v1/models", b"/V1/models", b"/v1%2Fmodels", b""])
def test_paths_outside_the_prefix_are_refused(raw: bytes) -> None:
    assert isinstance(POLICY.check(raw, b"", None), errors.NotFound)


@pytest.mark.parametrize(
    ("base", "path"),
    [("http://127.0.0.1:9", b""), ("http://up.example/v1/", b"/v1"), ("https://h/a/b", b"/a/b")],
)
def test_upstream_target_is_the_checked_raw_path_under_the_base(base: str, path: bytes) -> None:
    base_path = Origin(base).base_path
    assert base_path == path
    raw = b"/v1/chat/completions"
    assert POLICY.check(raw, b"a=1", None) is None
    assert upstream_target(base_path, raw, b"a=1") == path + b"/chat/completions?a=1"
    assert upstream_target(base_path, b"/v1/", b"") == path + b"/"
    # the target always starts with '/': it can never extend the host or port
    assert upstream_target(base_path, b"/v1/%31:99/x", b"").startswith(b"/")


KEY = make_key("gw_sk_", new_kid())


@pytest.mark.parametrize(
    ("path", "query"),
    [
        (f"/v1/{KEY}/models", ""),
        ("/v1/models", f"api_key={KEY}"),
        ("/v1/models", f"api_key={KEY.replace('_', '%5F')}"),
        ("/v1/models", f"api_key={KEY.replace('_', '%5f')}"),
        (f"/v1/x/{KEY.replace('gw', '%67%77')}", ""),
        ("/v1/models", f"k={KEY.replace('_', '%255F')}"),  # encoded twice
        ("/v1/models", f"k={KEY[: 6 + 12]}"),  # the prefix and the public id are enough
    ],
)
def test_a_key_in_the_url_is_refused_through_encoding(path: str, query: str) -> None:
    err = POLICY.check(path.encode(), query.encode(), None)
    assert isinstance(err, errors.BadRequest) and err.code == "api_key_in_url"


@pytest.mark.parametrize(
    "path", ["/v1/models/gw_sk_turbo", "/v1/files/gw_sk_", "/v1/models/gw%5Fsk%5Fmini"]
)
def test_the_prefix_alone_is_not_a_key(path: str) -> None:
    assert POLICY.check(path.encode(), b"", None) is None


def test_decoded_stops_after_a_few_rounds() -> None:
    assert decoded(b"%2541") == b"A"
    assert decoded(b"a%20b") == b"a b"
    assert decoded(b"%25252541", rounds=3) == b"%41"


@pytest.mark.parametrize(
    ("length", "code"),
    [
        (b"abc", "invalid_content_length"),
        (b"-1", "invalid_content_length"),
        (b"9" * 30, "invalid_content_length"),
        (b"1001", "request_too_large"),
    ],
)
def test_content_length_checks(length: bytes, code: str) -> None:
    err = POLICY.check(b"/v1/x", b"", length)
    assert err is not None and err.code == code
    assert POLICY.check(b"/v1/x", b"", b"1000") is None


@pytest.mark.parametrize("query", [b"a=\xc3\xa9", b"a=b c", b"a=\x7f"])
def test_bad_query_bytes_are_refused(query: bytes) -> None:
    err = POLICY.check(b"/v1/x", query, None)
    assert err is not None and err.code == "invalid_query"


def test_forwarding_headers_from_an_untrusted_client_are_replaced() -> None:
    sent = [
        (b"x-forwarded-for", b"6.6.6.6"),
        (b"x-forwarded-proto", b"https"),
        (b"forwarded", b"for=6.6.6.6"),
        (b"x-real-ip", b"6.6.6.6"),
    ]
    inbound = inbound_headers(sent)
    assert inbound.headers == [] and inbound.forwarding == sent
    assert forwarded_headers(inbound.forwarding, "10.1.2.3", "http", trusted=False) == [
        (b"X-Forwarded-For", b"10.1.2.3"),
        (b"X-Forwarded-Proto", b"http"),
    ]


def test_a_trusted_proxys_chain_is_kept_and_extended() -> None:
    sent = [(b"x-forwarded-for", b"1.1.1.1, 2.2.2.2"), (b"x-forwarded-proto", b"https")]
    assert forwarded_headers(sent, "10.0.0.5", "http", trusted=True) == [
        (b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2, 10.0.0.5"),
        (b"X-Forwarded-Proto", b"https"),
    ]


def test_trusted_proxies_match_by_network() -> None:
    trusted = TrustedProxies(("10.0.0.0/8", "::1/128"))
    assert trusted.trusts("10.200.0.1") and trusted.trusts("::1")
    assert not trusted.trusts("11.0.0.1") and not trusted.trusts("not-an-ip")
    assert not trusted.trusts(None)
    assert not TrustedProxies(()).trusts("10.0.0.1")


def test_only_the_listed_methods_are_forwarded() -> None:
    assert {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} == FORWARDED_METHODS
    assert "TRACE" not in FORWARDED_METHODS and "CONNECT" not in FORWARDED_METHODS


@pytest.mark.parametrize(
    "name",
    [
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-forwarded-ssl",
        b"x-forwarded-scheme",
        b"x_forwarded_for",
        b"x-real_ip",
        b"x_forwarded_host",
        b"true-client-ip",
        b"x-client-ip",
        b"cf-connecting-ip",
        b"forwarded",
    ],
)
def test_every_spelling_of_a_forwarding_header_is_dropped_from_strangers(name: bytes) -> None:
    inbound = inbound_headers([(name, b"6.6.6.6"), (b"x-keep", b"1")])
    assert inbound.headers == [(b"x-keep", b"1")]
    sent = forwarded_headers(inbound.forwarding, "10.1.2.3", "http", trusted=False)
    assert sent == [(b"X-Forwarded-For", b"10.1.2.3"), (b"X-Forwarded-Proto", b"http")]


def test_a_trusted_proxy_keeps_its_forwarding_headers_but_never_underscored_ones() -> None:
    raw = [
        (b"x-forwarded-port", b"443"),
        (b"x_forwarded_for", b"6.6.6.6"),
        (b"x-real-ip", b"1.1.1.1"),
    ]
    inbound = inbound_headers(raw)
    assert inbound.headers == []
    sent = forwarded_headers(inbound.forwarding, "10.0.0.5", "https", trusted=True)
    assert sent == [
        (b"x-forwarded-port", b"443"),
        (b"x-real-ip", b"1.1.1.1"),
        (b"X-Forwarded-For", b"10.0.0.5"),
        (b"X-Forwarded-Proto", b"https"),
    ]


@pytest.mark.parametrize(
    ("body", "model"),
    [
        (b'{"model": "gpt-4o", "messages": []}', "gpt-4o"),
        (b'{"messages": [{"model": "x"}, {"MODEL": "y"}], "model": "m"}', "m"),  # nested: fine
        (b'{"model": ""}', None),
        (b'{"model": 5}', None),
        (b"[1, 2]", None),
        (b"{not json", None),
        (b"", None),
    ],
)
def test_body_model_reads_the_top_level_model(body: bytes, model: str | None) -> None:
    read = body_model(body)
    assert read.model == model and read.problem is None


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "gpt-4o-mini", "MODEL": "gpt-4o"}',
        b'{"Model": "gpt-4o", "model": "gpt-4o-mini"}',
        b'{"model": "gpt-4o", "model": "gpt-4o-mini"}',
        b'{"mod\\u0065l": "gpt-4o", "model": "gpt-4o-mini"}',
        b'{"model": "gpt-4o-mini", "mODEL": 1}',
    ],
)
def test_two_fields_that_could_be_the_model_make_the_body_unusable(body: bytes) -> None:
    read = body_model(body)
    assert read.model is None and read.problem is not None and "model" in read.problem


def test_a_model_over_the_byte_bound_is_refused_by_name() -> None:
    assert body_model(b'{"model": "%s"}' % (b"m" * MAX_MODEL_BYTES)).model is not None
    long = body_model(b'{"model": "%s"}' % (b"m" * (MAX_MODEL_BYTES + 1)))
    assert long.model is None and long.code == "model_too_long"
    wide = body_model(('{"model": "%s"}' % ("é" * 200)).encode())  # 200 chars, 400 bytes
    assert wide.code == "model_too_long"
