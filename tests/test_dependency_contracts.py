"""What edge borrows from its dependencies' undocumented insides, checked against the installed
versions, so an upgrade that moves one fails here, by name, instead of in production.

uvicorn: `transport/protocol.py` subclasses `uvicorn.protocols.http.httptools_impl`'s
`HttpToolsProtocol` (overriding its parser callbacks, four of them copied inline, and calling
its private `_start_asgi_task`), and `transport/cycle.py` subclasses `RequestResponseCycle`,
reading and writing its fields; seven methods copy uvicorn's own, whole or in part (`send`,
`receive`, `on_response_complete`, and the four parser callbacks). redis-py: `redis_urls.py`
uses `parse_url` and `RedisSSLContext` from `redis.asyncio.connection`. pyproject bounds both
packages at both ends to the versions these tests last passed on.

When a fingerprint fails: read the new uvicorn method beside edge's copy, carry the change
over (or confirm none is needed), then record the new fingerprint here.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]

# The uvicorn methods edge's code copies a part of, by the sha256 of their source.
COPIED = {
    "RequestResponseCycle.send": (
        "abdd8601b326a8da972436918d3a954e1ef39c6bf0cd9e1c1954c2e798d0bb9c",
        "EdgeCycle.answer, start_stream, pipe_body and _complete frame as its body branch does",
    ),
    "RequestResponseCycle.receive": (
        "8124ae006be71184810da91d586b97c4b3b9ae43e28984bc94f81e26d20af3e6",
        "EdgeCycle.take_body hands over the body as its first call does",
    ),
    "HttpToolsProtocol.on_response_complete": (
        "64e254f28e389e7614f2c828176d639174e66aa9d814a4b06624ec86ec0a5b95",
        "EdgeHttpToolsProtocol.on_response_complete replaces it (no keep-alive timer per answer)",
    ),
    "HttpToolsProtocol.on_message_begin": (
        "96d377fdc7c2baef943c2bd245003abc53566ddb35777e0f4c7bc754198b5457",
        "EdgeHttpToolsProtocol.on_message_begin makes the scope as it does",
    ),
    "HttpToolsProtocol.on_headers_complete": (
        "1ea8589acfad92d8ff9182775f337d98fc469e0fa39642a83195fca920f5ca96",
        "EdgeHttpToolsProtocol._start_request does what it does, making an EdgeCycle",
    ),
    "HttpToolsProtocol.on_body": (
        "dba9c32aeba35b6ae10722f86232d44d93fda42d97711244eeaa51c0a1f3e1c9",
        "EdgeHttpToolsProtocol.on_body does what it does, inline",
    ),
    "HttpToolsProtocol.on_message_complete": (
        "1fbad42dc31fc01fd4106a9885b2a2e0f6ce8d38241a3df0f615c6a8663493e0",
        "EdgeHttpToolsProtocol.on_message_complete does what it does, inline",
    ),
}
# Methods edge overrides and calls back into (by super() or by name), with their parameters.
CALLED = {
    "HttpToolsProtocol.__init__": ["self", "config", "server_state", "app_state", "_loop"],
    "HttpToolsProtocol.connection_made": ["self", "transport"],
    "HttpToolsProtocol.connection_lost": ["self", "exc"],
    "HttpToolsProtocol.data_received": ["self", "data"],
    "HttpToolsProtocol.resume_writing": ["self"],
    "HttpToolsProtocol.on_header": ["self", "name", "value"],
    "HttpToolsProtocol.send_400_response": ["self", "msg"],
    "HttpToolsProtocol._start_asgi_task": ["self", "cycle", "app"],
    "HttpToolsProtocol._should_upgrade": ["self"],
    "RequestResponseCycle.__init__": [
        "self",
        "scope",
        "transport",
        "flow",
        "logger",
        "access_logger",
        "access_log",
        "default_headers",
        "message_event",
        "expect_100_continue",
        "keep_alive",
        "on_response",
    ],
}
# Fields of a cycle that edge reads or writes.
CYCLE_FIELDS = [
    "scope", "transport", "flow", "default_headers", "access_log", "keep_alive",
    "waiting_for_100_continue", "response_started", "response_complete", "disconnected",
    "chunked_encoding", "expected_content_length", "body", "more_body", "message_event",
    "on_response",
]  # fmt: skip
# Fields of the protocol that edge reads or writes.
PROTOCOL_FIELDS = [
    "transport", "loop", "flow", "cycle", "pipeline", "headers", "url", "connections",
    "server_state", "timeout_keep_alive", "parser", "scope", "tasks", "expect_100_continue",
    "app", "app_state", "asgi_version", "root_path", "server", "client", "scheme",
    "limit_concurrency", "logger", "access_logger", "access_log",
]  # fmt: skip


def uvicorn_attr(dotted: str) -> Callable[..., Any]:
    from uvicorn.protocols.http import httptools_impl

    owner, name = dotted.split(".")
    cls = getattr(httptools_impl, owner, None)
    assert cls is not None, f"uvicorn.protocols.http.httptools_impl.{owner} is gone"
    attr = getattr(cls, name, None)
    assert attr is not None, f"uvicorn's {dotted} is gone: edge's protocol relies on it"
    return attr  # type: ignore[no-any-return]


@pytest.mark.parametrize("dotted", sorted(COPIED))
def test_the_uvicorn_methods_edge_copies_are_unchanged(dotted: str) -> None:
    digest, why = COPIED[dotted]
    source = inspect.getsource(uvicorn_attr(dotted))
    assert hashlib.sha256(source.encode()).hexdigest() == digest, (
        f"uvicorn's {dotted} changed since edge copied part of it ({why}): compare, carry the "
        "change over, then record its new fingerprint in this test"
    )


@pytest.mark.parametrize("dotted", sorted(CALLED))
def test_the_uvicorn_methods_edge_calls_keep_their_parameters(dotted: str) -> None:
    parameters = list(inspect.signature(uvicorn_attr(dotted)).parameters)
    assert parameters == CALLED[dotted], f"uvicorn's {dotted} now takes {parameters}"


def test_a_cycle_and_a_protocol_still_have_the_fields_edge_uses() -> None:
    from uvicorn.config import Config
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    from uvicorn.server import ServerState

    async def build() -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        protocol = HttpToolsProtocol(Config(app=None), ServerState(), {}, loop)  # type: ignore[arg-type]
        cycle = RequestResponseCycle(
            scope={"type": "http", "method": "GET"},  # type: ignore[arg-type]
            transport=None,  # type: ignore[arg-type]
            flow=FlowControl(None),  # type: ignore[arg-type]
            logger=logging.getLogger("test"),
            access_logger=logging.getLogger("test"),
            access_log=False,
            default_headers=[],
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=True,
            on_response=lambda: None,
        )
        return protocol, cycle

    protocol, cycle = asyncio.run(build())
    missing = [name for name in CYCLE_FIELDS if not hasattr(cycle, name)]
    assert missing == [], f"uvicorn's RequestResponseCycle lost {missing}"
    protocol.on_message_begin()  # what gives it a scope and headers, as a request would
    missing = [name for name in PROTOCOL_FIELDS if not hasattr(protocol, name)]
    assert missing == [], f"uvicorn's HttpToolsProtocol lost {missing}"
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    assert all(status in STATUS_LINE for status in range(200, 600)), "STATUS_LINE shrank"


def test_the_redis_py_parts_edge_uses_are_there() -> None:
    from redis.asyncio import connection

    params = dict(connection.parse_url("rediss://u:p@h:6380/2?ssl_cert_reqs=none"))
    assert (params["host"], params["port"], params["db"]) == ("h", 6380, 2)
    assert (params["username"], params["password"]) == ("u", "p")
    ssl_options = inspect.signature(connection.RedisSSLContext.__init__).parameters
    from edge.redis_urls import TLS_OPTIONS

    expected = {option.removeprefix("ssl_") for option in TLS_OPTIONS}
    assert expected <= set(ssl_options), sorted(expected - set(ssl_options))


@pytest.mark.parametrize("package", ["uvicorn", "redis"])
def test_pyproject_bounds_the_borrowed_dependencies_at_both_ends(package: str) -> None:
    """The installed version is inside the range, and the range has an upper bound."""
    import importlib.metadata

    with (REPO / "pyproject.toml").open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    [spec] = [Requirement(d) for d in dependencies if Requirement(d).name == package]
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec.specifier), spec
    assert any(s.operator in (">", ">=", "==", "~=") for s in spec.specifier), spec
    assert spec.specifier.contains(Version(importlib.metadata.version(package)))
