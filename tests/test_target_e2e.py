"""What a client can make edge send upstream, through a real edge process: only paths under the
configured base, never the key in a URL, never its own OpenAI organisation or project.

Regression tests for the security review: `GET /%761/models` reached the upstream as
`/v161/models`, and with an upstream URL without a path `/v%31…` changed the port, sending the
provider key to another local service; `gw%5Fsk_…` in a query was forwarded with the key; a
client's `OpenAI-Organization` / `OpenAI-Project` headers reached the provider.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import httpx
import pytest

from edge.control.records import KeyRecord
from tests.support.edge_process import PROVIDER_KEY, EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.raw_http import raw_get
from tests.support.redis_server import RedisServer

MakeKey = Callable[..., tuple[str, KeyRecord]]
ENCODED_PREFIXES = ["/%761/", "/v%31/", "/%76%31/", "/v1%2F", "/v1%2f", "/%2Fv1/", "//v1/", "/V1/"]


@pytest.fixture
def pathless_edge(
    spawn_edge: Callable[..., EdgeProcess], redis_server: RedisServer, upstream: FakeUpstream
) -> EdgeProcess:
    """edge whose upstream URL has no path at all (`http://127.0.0.1:<port>`)."""
    return spawn_edge(edge_env(redis_server.url, upstream.base), name="pathless")


def test_encoded_prefixes_never_reach_the_upstream(
    edge: EdgeProcess, pathless_edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    """Every spelling of the prefix but `/v1/` itself is refused, by both kinds of base (the
    exhaustive set of encodings is in test_policy.py)."""
    key, _ = make_key()
    rests = ("models", f"{upstream.port}/models", ":1/models", "@127.0.0.1/x")
    for proc, prefix, rest in itertools.product((edge, pathless_edge), ENCODED_PREFIXES, rests):
        path = (prefix + rest).encode()
        resp = raw_get(proc.port, [f"Authorization: Bearer {key}".encode()], path)
        assert resp.status in (400, 404), (path, resp.raw[:200])
        assert resp.header("content-type") == "application/json"
    assert upstream.records == []


def test_forwarded_path_is_the_checked_path_under_the_base(
    edge: EdgeProcess, pathless_edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey
) -> None:
    key, _ = make_key("pro")
    raw_get(edge.port, [f"Authorization: Bearer {key}".encode()], b"/v1/files/a%20b?x=%2F")
    raw_get(pathless_edge.port, [f"Authorization: Bearer {key}".encode()], b"/v1/models")
    with_base, without_base = upstream.records
    assert (with_base.path, with_base.query) == ("/v1/files/a%20b", "x=%2F")
    assert without_base.path == "/models"


@pytest.mark.parametrize(
    "target",
    [
        "/v1/models?api_key={key}",
        "/v1/models?api_key={underscore_encoded}",
        "/v1/models?k={twice_encoded}",
        "/v1/files/{underscore_encoded}",
        "/v1/files/{key}/content",
    ],
)
def test_a_key_in_the_url_is_never_forwarded(
    edge: EdgeProcess, upstream: FakeUpstream, make_key: MakeKey, target: str
) -> None:
    key, _ = make_key()
    path = target.format(
        key=key,
        underscore_encoded=key.replace("_", "%5F"),
        twice_encoded=key.replace("_", "%255F"),
    )
    resp = raw_get(edge.port, [f"Authorization: Bearer {key}".encode()], path.encode())
    assert resp.status == 400
    assert b'"api_key_in_url"' in resp.body
    assert key.encode() not in resp.raw
    assert upstream.records == []


def test_clients_cannot_choose_the_operators_organization_or_project(
    spawn_edge: Callable[..., EdgeProcess],
    edge: EdgeProcess,
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_key: MakeKey,
) -> None:
    key, _ = make_key()
    chosen = {"OpenAI-Organization": "org-client", "OpenAI-Project": "proj-client"}
    configured = spawn_edge(
        edge_env(
            redis_server.url,
            upstream.url,
            EDGE_UPSTREAM_ORGANIZATION="org-operator",
            EDGE_UPSTREAM_PROJECT="proj-operator",
        ),
        name="org",
    )
    for proc in (edge, configured):
        resp = httpx.get(f"{proc.url}/v1/models", headers=auth(key, **chosen))
        assert resp.status_code == 200
    plain, operator = upstream.records
    assert plain.headers("openai-organization") == []
    assert plain.headers("openai-project") == []
    assert operator.headers("openai-organization") == ["org-operator"]
    assert operator.headers("openai-project") == ["proj-operator"]
    assert operator.headers("authorization") == [f"Bearer {PROVIDER_KEY}"]
