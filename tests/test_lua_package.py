"""The Lua scripts ship as package data and load from the installed package (STYLE item 2,
Lua scripts live as `.lua` files in the package, are loaded once and called by SHA).

Each script under `edge/redis/lua/` reads through importlib.resources, opens with a `--[[ … ]]`
block
naming the KEYS and ARGV it uses, and hashes on a real redis-server to the SHA edge calls it by.
The packaging side: pyproject's package-data covers `lua/*.lua`, and a wheel built offline
contains every script byte for byte.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import redis
from packaging.requirements import Requirement

from edge.redis.scripts import SCRIPT_NAMES, Script, read_source
from tests.support.edge_process import REPO

LUA_DIR = resources.files("edge.redis").joinpath("lua")
WHEEL_BUILD_SECONDS = 20


def lua_files() -> list[str]:
    """Names (without `.lua`) of every script in the installed package's lua dir."""
    return sorted(p.name[: -len(".lua")] for p in LUA_DIR.iterdir() if p.name.endswith(".lua"))


ALL_SCRIPTS = sorted(set(SCRIPT_NAMES) | set(lua_files()))


def header_block(source: str) -> str:
    assert source.startswith("--[["), "a script must open with a --[[ … ]] header block"
    end = source.find("]]")
    assert end > 0, "the header block is never closed"
    return source[4:end]


def test_every_script_name_has_a_file() -> None:
    assert set(SCRIPT_NAMES) <= set(lua_files())


INCLUDES = sorted(
    p.name[: -len(".lua")] for p in LUA_DIR.joinpath("include").iterdir() if p.name.endswith(".lua")
)


def expanded(name: str) -> str:
    """A script's file with its `--#include` lines replaced by the shared parts they name."""
    text = LUA_DIR.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    for part in INCLUDES:
        shared = LUA_DIR.joinpath("include", f"{part}.lua").read_text(encoding="utf-8")
        text = text.replace(f"--#include {part}\n", shared.rstrip() + "\n")
    return text


@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_script_loads_from_package_with_header(name: str, r: redis.Redis) -> None:
    source = read_source(name)
    assert source == expanded(name)
    assert "--#include" not in source, f"{name}.lua includes a part that does not exist"
    assert source.strip(), f"{name}.lua is empty"

    header = header_block(source)
    body = source[len(header) + 6 :]
    assert "KEYS[" in header and "ARGV[" in header, f"{name}.lua: header names no KEYS/ARGV"
    for kind, index in set(re.findall(r"\b(KEYS|ARGV)\[(\d+)\]", body)):
        assert f"{kind}[{index}" in header, f"{name}.lua uses {kind}[{index}] undocumented"

    sha = r.script_load(source)
    sha = sha.decode() if isinstance(sha, bytes) else sha
    assert sha == Script(name).sha
    assert r.script_exists(sha) == [True]


def test_pyproject_package_data_covers_lua() -> None:
    with (REPO / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)
    patterns = project["tool"]["setuptools"]["package-data"]["edge.redis"]
    paths = [f"lua/{name}.lua" for name in ALL_SCRIPTS] + [f"lua/include/{n}.lua" for n in INCLUDES]
    for path in paths:
        assert any(fnmatch.fnmatch(path, p) for p in patterns), f"{path} is not package data"


def _build_requirements_unmet(project: dict[str, object]) -> list[str]:
    build_system = project.get("build-system")
    assert isinstance(build_system, dict)
    unmet = []
    for spec in build_system.get("requires", []):
        req = Requirement(spec)
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{spec} (not installed)")
            continue
        if not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{spec} (the venv has {have})")
    return unmet


def test_wheel_contains_lua_scripts(tmp_path: Path) -> None:
    with (REPO / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)
    unmet = _build_requirements_unmet(project)
    # `make test` installs the build requirements into the venv, so this build never needs
    # the network; a venv without them is a broken set-up, reported rather than skipped.
    assert not unmet, f"the venv lacks build requirements: {', '.join(unmet)}"

    # Build from a copy, so setuptools' build/ and egg-info never land in the work tree.
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    for extra in ("README.md", "LICENSE"):
        if (REPO / extra).exists():
            shutil.copy(REPO / extra, src)
    shutil.copytree(REPO / "edge", src / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "wheels"
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    try:
        done = subprocess.run(
            [*command, "-w", str(out), str(src)],
            env=env,
            capture_output=True,
            text=True,
            timeout=WHEEL_BUILD_SECONDS,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"pip wheel did not finish offline within {WHEEL_BUILD_SECONDS} s")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output

    [wheel] = out.glob("edge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in ALL_SCRIPTS:
            member = f"edge/redis/lua/{name}.lua"
            assert member in names, f"{member} is missing from {wheel.name}"
            text = LUA_DIR.joinpath(f"{name}.lua").read_text(encoding="utf-8")
            assert zf.read(member).decode("utf-8") == text
        for part in INCLUDES:
            member = f"edge/redis/lua/include/{part}.lua"
            assert member in names, f"{member} is missing from {wheel.name}"
