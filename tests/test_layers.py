"""The package's layout holds: every import points down, and no module imports one that imports
it, not even inside a function or only for type checking.

edge's rooms, bottom to top (docs/development.md draws them):

    foundations   settings (and setting_*), errors, keys, logs, urls, redis_urls: pure
    metrics       metrics/        the Prometheus families and their batched updates
    redis         redis/          clients, the request path's own client, scripts and lua/
    transport     transport/      the server protocol and the upstream client
    proxy         proxy/          the data plane: the /v1 handler and what one request needs
    control       control/        the control plane: store, records, admin API, dashboard
    root          app, runtime, reload, health, banner, demo, server, supervisor: the root
    cli           cli/, __main__  the `edge` command

A room may import its own modules and those of the rooms listed for it in ALLOWED; the data
plane and the control plane never import each other. The imports are read from the source
(ast), wherever they stand in a module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edge"
ROOMS = {
    "foundations": {
        "settings",
        "setting_types",
        "setting_changes",
        "tls_files",
        "upstream_settings",
        "errors",
        "keys",
        "logs",
        "urls",
        "redis_urls",
        "__init__",
    },
    "metrics": {"metrics"},
    "redis": {"redis"},
    "transport": {"transport"},
    "proxy": {"proxy"},
    "control": {"control"},
    "root": {"app", "runtime", "reload", "health", "banner", "demo", "server", "supervisor"},
    "cli": {"cli", "__main__"},
}
BELOW = {
    "foundations": set(),
    "metrics": {"foundations"},
    "redis": {"foundations"},
    "transport": {"foundations"},
    "proxy": {"foundations", "metrics", "redis", "transport"},
    "control": {"foundations", "redis"},
    "root": {"foundations", "metrics", "redis", "transport", "proxy", "control"},
    "cli": {"foundations", "metrics", "redis", "transport", "proxy", "control", "root"},
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (`edge.proxy.handler`)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The package's modules that `path` imports (anywhere in it), with the line."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "edge":
                    yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "edge":
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub if sub in known else node.module), node.lineno


def room(module: str) -> str:
    first = module.split(".")[1] if "." in module else "__init__"
    for name, members in ROOMS.items():
        if first in members:
            return name
    raise AssertionError(f"{module} is in no room: add it to ROOMS (and docs/development.md)")


def graph() -> dict[str, set[str]]:
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for target, _ in imported(path, known):
            if target != name and target in known and target != "edge":
                edges[name].add(target)
    return edges


def test_every_module_is_in_a_room() -> None:
    for name in modules():
        room(name)


def test_every_import_points_down() -> None:
    known = modules()
    upward = []
    for name, path in known.items():
        here = room(name)
        for target, line in imported(path, known):
            if target == "edge":
                continue
            there = room(target)
            if there != here and there not in BELOW[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} -> {there}")
    assert upward == [], "imports that do not point down:\n" + "\n".join(upward)


def test_no_module_imports_one_that_imports_it() -> None:
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE.parent)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 500
    }
    assert long == {}


def imports_uvicorn(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.startswith("uvicorn") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("uvicorn"):
            return True
    return False


def test_the_data_plane_never_loads_uvicorn() -> None:
    """The proxy talks to the server protocol through transport/link.py only: nothing the data
    plane imports, however indirectly, imports uvicorn."""
    known, edges = modules(), graph()
    reached = {name for name in known if room(name) == "proxy"}
    todo = list(reached)
    while todo:
        for nxt in edges[todo.pop()]:
            if nxt not in reached:
                reached.add(nxt)
                todo.append(nxt)
    assert sorted(name for name in reached if imports_uvicorn(known[name])) == []
