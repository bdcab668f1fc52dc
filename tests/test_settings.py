"""edge/settings.py: the config file, environment overrides and validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from edge.settings import ConfigError, Plan, Secret, Settings, load_settings

REPO_CONFIG = Path(__file__).resolve().parents[1] / "config" / "edge.toml"


def test_shipped_config_equals_the_built_in_defaults() -> None:
    assert load_settings(REPO_CONFIG, {}) == Settings()


def test_missing_default_file_means_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings(None, {}) == Settings()


def test_default_plans() -> None:
    plans = Settings().plans
    assert plans == {
        "free": Plan(20, 1_000),
        "pro": Plan(200, 50_000),
        "team": Plan(1_000, 250_000),
    }


def test_environment_overrides_every_section() -> None:
    env = {
        "EDGE_REDIS_URL": "redis://127.0.0.1:7000/1",
        "EDGE_REDIS_TIMEOUT": "0.5",
        "EDGE_UPSTREAM_URL": "https://api.example.com/v1",
        "EDGE_UPSTREAM_API_KEY": "sk-provider",
        "EDGE_SERVER_PORT": "9000",
        "EDGE_SERVER_MAX_BODY_BYTES": "1_000",
        "EDGE_KEYS_PREFIX": "gp-",
        "EDGE_LOG_LEVEL": "debug",
        "EDGE_PLANS_FREE_RPM": "5",
    }
    s = load_settings(REPO_CONFIG, env)
    assert s.redis.url == "redis://127.0.0.1:7000/1" and s.redis.timeout == 0.5
    assert s.upstream.url == "https://api.example.com/v1"
    assert s.upstream.api_key.get() == "sk-provider"
    assert s.server.port == 9000 and s.server.max_body_bytes == 1000
    assert s.keys.prefix == "gp-" and s.log.level == "debug"
    assert s.plans["free"] == Plan(5, 1000)
    assert not s.embedded_redis and not s.demo_upstream


def test_config_file_from_edge_config(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('[plans.gold]\nrpm = 7\nrpd = 70\n[upstream]\nurl = "http://127.0.0.1:1/v1"\n')
    s = load_settings(None, {"EDGE_CONFIG": str(path)})
    assert dict(s.plans) == {"gold": Plan(7, 70)}
    assert s.upstream.url == "http://127.0.0.1:1/v1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGE_SERVER_PORT": "abc"}, "server.port"),
        ({"EDGE_SERVER_PORT": "0"}, "server.port"),
        ({"EDGE_REDIS_TIMEOUT": "-1"}, "redis.timeout"),
        ({"EDGE_REDIS_TIMEOUT": "nan"}, "redis.timeout"),
        ({"EDGE_REDIS_URL": "http://x"}, "redis.url"),
        ({"EDGE_UPSTREAM_URL": "ftp://x"}, "upstream.url"),
        ({"EDGE_KEYS_PREFIX": "bad prefix"}, "keys.prefix"),
        ({"EDGE_LOG_LEVEL": "loud"}, "log.level"),
        ({"EDGE_PLANS_FREE_RPM": "-3"}, "plans.free.rpm"),
        ({"EDGE_CONFIG": "/nonexistent/edge.toml"}, "not found"),
    ],
)
def test_bad_values_are_explained(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(REPO_CONFIG if "EDGE_CONFIG" not in env else None, env)


@pytest.mark.parametrize(
    "text",
    [
        "[nope]\nx = 1\n",
        "[server]\nportt = 1\n",
        "[plans.free]\nrpm = 1\n",
        "[plans.Free]\nrpm = 1\nrpd = 2\n",
        "[server\n",
    ],
)
def test_bad_files_are_explained(tmp_path: Path, text: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_settings(path, {})


def test_secrets_never_show_themselves() -> None:
    s = load_settings(REPO_CONFIG, {"EDGE_UPSTREAM_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(s)
    assert "sk-very-secret" not in str(s.upstream)
    assert "sk-very-secret" not in repr(dataclasses.asdict(s))
    assert repr(Secret("x")) == "Secret('**********')"
