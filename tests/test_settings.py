"""edge/settings.py: the config file, environment and command-line overrides, and validation.

Every bad value is one `ConfigError` line naming the setting and where it came from; TOML values
are never coerced (`18740.9` is not a port); secrets never show in a repr.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.settings import ConfigError, Plan, Settings, load_settings

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
        "free": Plan(rpm=20, rpd=1_000),
        "pro": Plan(rpm=200, rpd=50_000),
        "team": Plan(rpm=1_000, rpd=250_000),
    }


def test_environment_overrides_every_section() -> None:
    env = {
        "EDGE_REDIS_URL": "redis://127.0.0.1:7000/1",
        "EDGE_REDIS_TIMEOUT": "0.5",
        "EDGE_UPSTREAM_URL": "https://api.example.com/v1",
        "EDGE_UPSTREAM_API_KEY": "sk-provider",
        "EDGE_UPSTREAM_ORGANIZATION": "org-op",
        "EDGE_UPSTREAM_PROJECT": "proj_op",
        "EDGE_SERVER_PORT": "9000",
        "EDGE_SERVER_MAX_BODY_BYTES": "1000",
        "EDGE_SERVER_KEEPALIVE_TIMEOUT": "1.5",
        "EDGE_KEYS_PREFIX": "gp-",
        "EDGE_LOG_LEVEL": "DEBUG",
        "EDGE_PLANS_FREE_RPM": "5",
    }
    s = load_settings(REPO_CONFIG, env)
    assert s.redis.url == "redis://127.0.0.1:7000/1" and s.redis.timeout == 0.5
    assert s.upstream.url == "https://api.example.com/v1"
    assert s.upstream.api_key.get_secret_value() == "sk-provider"
    assert (s.upstream.organization, s.upstream.project) == ("org-op", "proj_op")
    assert s.server.port == 9000 and s.server.max_body_bytes == 1000
    assert s.server.keepalive_timeout == 1.5  # honoured exactly, never rounded
    assert s.keys.prefix == "gp-" and s.log.level == "debug"
    assert s.plans["free"] == Plan(rpm=5, rpd=1000)
    assert not s.embedded_redis and not s.demo_upstream


def test_config_file_from_edge_config(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('[plans.gold]\nrpm = 7\nrpd = 70\n[upstream]\nurl = "http://127.0.0.1:1/v1"\n')
    s = load_settings(None, {"EDGE_CONFIG": str(path), "EDGE_PLANS_GOLD_RPD": "77"})
    assert dict(s.plans) == {"gold": Plan(rpm=7, rpd=77)}
    assert s.upstream.url == "http://127.0.0.1:1/v1"


def test_command_line_overrides_are_validated_too() -> None:
    s = load_settings(REPO_CONFIG, {}, overrides={"server": {"port": 9100, "host": "0.0.0.0"}})
    assert (s.server.host, s.server.port) == ("0.0.0.0", 9100)
    with pytest.raises(ConfigError, match=r"^server\.port \(--port\): .*65535"):
        load_settings(REPO_CONFIG, {"EDGE_SERVER_PORT": "9000"}, {"server": {"port": 70000}})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGE_SERVER_PORT": "abc"}, "server.port (EDGE_SERVER_PORT)"),
        ({"EDGE_SERVER_PORT": "0"}, "server.port (EDGE_SERVER_PORT)"),
        ({"EDGE_SERVER_PORT": "18740.9"}, "server.port (EDGE_SERVER_PORT)"),
        ({"EDGE_SERVER_KEEPALIVE_TIMEOUT": "0.5"}, "server.keepalive_timeout"),
        ({"EDGE_SERVER_DRAIN_TIMEOUT": "true"}, "server.drain_timeout"),
        ({"EDGE_REDIS_TIMEOUT": "-1"}, "redis.timeout (EDGE_REDIS_TIMEOUT)"),
        # an item of a list is named by the variable the list came from
        ({"EDGE_SERVER_TRUSTED_PROXIES": "10.0.0.0/8,nope"}, "(EDGE_SERVER_TRUSTED_PROXIES)"),
        ({"EDGE_USAGE_RETENTION_DAYS": "0"}, "usage.retention_days (EDGE_USAGE_RETENTION_DAYS)"),
        ({"EDGE_LOG_ACCESS": "maybe"}, "log.access (EDGE_LOG_ACCESS)"),
        ({"EDGE_REDIS_TIMEOUT": "nan"}, "redis.timeout"),
        ({"EDGE_REDIS_URL": "http://x"}, "redis.url (EDGE_REDIS_URL)"),
        ({"EDGE_REDIS_URL": "redis://127.0.0.1:99999/0"}, "Port out of range"),
        ({"EDGE_REDIS_URL": "redis://h:abc/0"}, "redis.url"),
        ({"EDGE_REDIS_URL": "redis://h/0?ssl_ca_cert=/x"}, "unsupported option(s) ssl_ca_cert"),
        ({"EDGE_REDIS_URL": "rediss://h/0?ssl_cert_reqs=maybe"}, "redis.url"),
        ({"EDGE_REDIS_URL": "redis+cluster://a:1,b:x"}, "bad cluster node"),
        ({"EDGE_UPSTREAM_URL": "ftp://x"}, "upstream.url"),
        ({"EDGE_UPSTREAM_URL": "http://h:70000/v1"}, "upstream.url"),
        ({"EDGE_UPSTREAM_URL": "http://h/v1?x=1"}, "query"),
        ({"EDGE_UPSTREAM_ORGANIZATION": "org\r\nX: 1"}, "upstream.organization"),
        (
            {"EDGE_UPSTREAM_MIN_CONNECTIONS": "20", "EDGE_UPSTREAM_MAX_CONNECTIONS": "10"},
            "min_connections (20) is more than max_connections (10)",
        ),
        ({"EDGE_KEYS_PREFIX": "bad prefix"}, "keys.prefix"),
        ({"EDGE_KEYS_PREFIX": "g"}, "keys.prefix"),
        ({"EDGE_KEYS_PREFIX": "gw"}, "keys.prefix"),
        ({"EDGE_KEYS_PREFIX": "gwsk"}, "keys.prefix"),
        ({"EDGE_LOG_LEVEL": "loud"}, "log.level"),
        ({"EDGE_PLANS_FREE_RPM": "-3"}, "plans.free.rpm (EDGE_PLANS_FREE_RPM)"),
        ({"EDGE_CONFIG": "/nonexistent/edge.toml"}, "not found"),
    ],
)
def test_bad_values_are_explained(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(REPO_CONFIG if "EDGE_CONFIG" not in env else None, env)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nope]\nx = 1\n", "nope"),
        ("[server]\nportt = 1\n", "server.portt"),
        ("[server]\nport = 18740.9\n", "server.port"),
        ("[server]\nport = '8080'\n", "server.port"),
        ("[server]\nkeepalive_timeout = true\n", "server.keepalive_timeout"),
        ("[redis]\ntimeout = '0.5'\n", "redis.timeout"),
        ("[plans.free]\nrpm = 1\n", "plans.free.rpd"),
        ("[plans.Free]\nrpm = 1\nrpd = 2\n", "plans.Free"),
        ("[plans.free]\nrpm = 1.5\nrpd = 2\n", "plans.free.rpm"),
        ("[plans]\n", "plans"),
        ("[server\n", "edge.toml"),
    ],
)
def test_bad_files_are_explained(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_whole_numbers_in_toml_are_fine_for_seconds(tmp_path: Path) -> None:
    path = tmp_path / "edge.toml"
    path.write_text("[server]\nkeepalive_timeout = 90\n[redis]\ntimeout = 1\n")
    s = load_settings(path, {})
    assert s.server.keepalive_timeout == 90.0 and s.redis.timeout == 1.0


def test_secrets_never_show_themselves() -> None:
    env = {
        "EDGE_REDIS_URL": "redis://user:hunter2@127.0.0.1:6390/0",
        "EDGE_UPSTREAM_URL": "https://u:pw-in-url@api.example.com/v1",
    }
    s = load_settings(REPO_CONFIG, env)
    s_key = load_settings(REPO_CONFIG, {"EDGE_UPSTREAM_API_KEY": "sk-very-secret"})
    for text in (repr(s), str(s), repr(s.redis), str(s.upstream), repr(s_key), str(s_key)):
        assert "sk-very-secret" not in text
        assert "hunter2" not in text
        assert "pw-in-url" not in text
    assert "redis://user:***@127.0.0.1:6390/0" in repr(s.redis)


def test_user_info_and_an_api_key_cannot_both_authenticate_upstream() -> None:
    env = {
        "EDGE_UPSTREAM_API_KEY": "sk-very-secret",
        "EDGE_UPSTREAM_URL": "https://u:pw-in-url@api.example.com/v1",
    }
    with pytest.raises(ConfigError, match="keep one") as caught:
        load_settings(REPO_CONFIG, env)
    assert "pw-in-url" not in str(caught.value) and "sk-very-secret" not in str(caught.value)


def test_errors_never_show_values() -> None:
    """A bad URL may carry a password: the error names the setting, not the value."""
    with pytest.raises(ConfigError) as caught:
        load_settings(REPO_CONFIG, {"EDGE_REDIS_URL": "redis://:hunter2@h:99999/0"})
    assert "hunter2" not in str(caught.value)
