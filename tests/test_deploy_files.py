"""deploy/: the Prometheus rules checked by promtool and evaluated by a real Prometheus scraping
a real edge; the container, compose and Kubernetes files parsed and held to config/edge.toml
(ports, probes, drain times). Docker itself cannot run on these machines, so the image and the
compose stack are checked as files, not run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from edge.settings import load_settings
from tests.support.edge_process import REPO, EdgeProcess, auth, edge_env
from tests.support.fake_upstream import FakeUpstream
from tests.support.ports import free_port, wait_port
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

DEPLOY = REPO / "deploy"
PROM = DEPLOY / "prometheus"
SETTINGS = load_settings(REPO / "config" / "edge.toml", {})


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: make test installs it (scripts/ensure-packages.sh)")
    return path


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def k8s(kind: str) -> dict[str, Any]:
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == kind:
                return doc  # type: ignore[no-any-return]
    raise AssertionError(f"no {kind} in deploy/k8s")


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", str(PROM / "prometheus.yml")],
        ["check", "rules", str(PROM / "rules.yml")],
        ["test", "rules", str(PROM / "rules_test.yml")],
    ],
    ids=["config", "rules", "rule-tests"],
)
def test_promtool_accepts_the_prometheus_files(args: list[str]) -> None:
    done = subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=PROM
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """`start(edge_port)` runs a real Prometheus scraping that edge every second with the
    project's rule files, and returns its URL; stopped by PID afterwards."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(edge_port: int) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(PROM / "rules.yml")],
                    "scrape_configs": [
                        {
                            "job_name": "edge",
                            "static_configs": [{"targets": [f"127.0.0.1:{edge_port}"]}],
                        }
                    ],
                }
            )
        )
        with (tmp_path / "prometheus.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        tool("prometheus"),
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
        wait_port(port, timeout=30)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def query(prometheus_url: str, expr: str) -> float | None:
    data = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=5).json()
    result = data["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.mark.slow
def test_a_real_prometheus_records_per_plan_values_from_edge(
    prometheus: Callable[[int], str],
    spawn_edge: Callable[..., EdgeProcess],
    redis_server: RedisServer,
    upstream: FakeUpstream,
    make_key: Callable[..., Any],
) -> None:
    proc = spawn_edge(edge_env(redis_server.url, upstream.url), name="scraped")
    url = prometheus(proc.port)
    key, _ = make_key("pro")
    for _ in range(7):
        assert httpx.get(f"{proc.url}/v1/models", headers=auth(key)).status_code == 200
    expr = 'plan:edge_requests_allowed:total{plan="pro"}'
    assert wait_until(lambda: query(url, expr) == 7, 30, every=0.5), query(url, expr)
    assert query(url, 'plan:edge_plan_limit:minute{plan="pro"}') == 200
    assert query(url, 'plan:edge_plan_limit:day{plan="free"}') == 1000
    assert query(url, 'up{job="edge"}') == 1


def test_kubernetes_manifests_agree_with_the_config() -> None:
    deployment = k8s("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == SETTINGS.server.port
    admin_port = int(container["args"][container["args"].index("--admin-port") + 1])
    assert ports["admin"] == admin_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == admin_port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(env["EDGE_SERVER_DRAIN_DELAY"]) + float(env["EDGE_SERVER_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"]
    service = k8s("Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert k8s("PodDisruptionBudget")["spec"]["minAvailable"] >= 1
    assert k8s("HorizontalPodAutoscaler")["spec"]["minReplicas"] >= 2
    assert k8s("ConfigMap")["data"]["edge.toml"] == (REPO / "config" / "edge.toml").read_text()
    secret = k8s("Secret")["stringData"]
    assert {"EDGE_UPSTREAM_API_KEY", "EDGE_ADMIN_TOKEN", "EDGE_REDIS_URL"} <= set(secret)
    listed = load(DEPLOY / "k8s" / "kustomization.yaml")["resources"]
    assert all((DEPLOY / "k8s" / name).exists() for name in listed)
    assert set(listed) == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}


def test_compose_nginx_and_image_agree_with_the_config() -> None:
    compose = load(DEPLOY / "compose.yaml")["services"]
    edge = compose["edge"]
    assert edge["deploy"]["replicas"] >= 2
    assert str(SETTINGS.server.port) in edge["expose"]
    admin_port = edge["command"][edge["command"].index("--admin-port") + 1]
    assert admin_port in edge["expose"]
    env = edge["environment"]
    grace = int(edge["stop_grace_period"].rstrip("s"))
    assert grace >= float(env["EDGE_SERVER_DRAIN_DELAY"]) + float(env["EDGE_SERVER_DRAIN_TIMEOUT"])
    redis_command = compose["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    assert "volatile-lru" in redis_command
    assert {"nginx", "prometheus", "grafana"} <= set(compose)
    prom_config = load(PROM / "prometheus.yml")
    assert prom_config["scrape_configs"][0]["dns_sd_configs"][0]["port"] == int(admin_port)

    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert f"server edge:{SETTINGS.server.port};" in nginx
    idle = int(re.search(r"keepalive_timeout (\d+)s;", nginx).group(1))  # type: ignore[union-attr]
    assert idle < SETTINGS.server.keepalive_timeout  # nginx closes idle links before edge does
    assert "proxy_buffering off;" in nginx and 'proxy_set_header Connection "";' in nginx

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)$", dockerfile, re.MULTILINE)
    assert user is not None and user.group(1) not in ("root", "0")
    assert "/healthz" in dockerfile.split("HEALTHCHECK", 1)[1]
    assert 'ENTRYPOINT ["edge", "serve"]' in dockerfile
    assert f"EXPOSE {SETTINGS.server.port}" in dockerfile
    assert (REPO / ".dockerignore").exists()


def test_grafana_dashboard_uses_recorded_and_real_series() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "edge.json").read_text())
    records = {
        r["record"] for g in load(PROM / "rules.yml")["groups"] for r in g["rules"] if "record" in r
    }
    metric_names = {
        "edge_requests_total", "edge_plan_limit", "edge_admission_seconds_bucket",
        "edge_upstream_ttfb_seconds_bucket", "edge_upstream_responses_total",
        "edge_inflight_requests", "edge_redis_errors_total", "edge_fail_open_admissions_total",
    }  # fmt: skip
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        names = set(re.findall(r"\b((?:plan|edge|plan_outcome):[a-z0-9_:]+|edge_[a-z_]+)\b", expr))
        assert names, expr
        for name in names:
            assert name in records or name in metric_names, f"{name} in {expr!r} is not a series"
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for topic in ("per minute", "per day", "Outcomes", "overhead", "In flight"):
        assert topic in titles
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert (
        load(provisioning / "datasources" / "prometheus.yml")["datasources"][0]["uid"]
        == "prometheus"
    )
