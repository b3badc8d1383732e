"""The production Compose file is valid and Prometheus scrapes services that exist in it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SECRETS = {
    name: "x"
    for name in (
        "POSTGRES_PASSWORD",
        "WRITER_DB_PASSWORD",
        "RULES_DB_PASSWORD",
        "GRAFANA_DB_PASSWORD",
        "COLLECTOR_MQTT_PASSWORD",
        "RULES_MQTT_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
    )
}


def _config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    assert binary is not None, "docker-compose (v1) is needed: apt-get install docker-compose"
    return subprocess.run(
        [binary, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        cwd=DEPLOY,
        check=False,
        timeout=60,
    )


def test_compose_file_is_valid() -> None:
    """`docker-compose config -q` accepts the file against the Compose specification."""
    out = _config(SECRETS)
    assert out.returncode == 0, out.stderr


def test_compose_refuses_to_run_without_secrets() -> None:
    """Without the passwords, Compose stops with a message naming what to set."""
    out = _config({k: v for k, v in SECRETS.items() if k != "COLLECTOR_MQTT_PASSWORD"})
    assert out.returncode != 0
    assert "mqtt-auth" in out.stderr


def test_prometheus_scrapes_only_compose_services() -> None:
    """Every host Prometheus scrapes is a Compose service; every citypulse service is scraped."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = set(compose["services"])
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scraped: set[str] = set()
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped.update(sd["names"])
        for sc in job.get("static_configs", []):
            scraped.update(t.split(":")[0] for t in sc["targets"])
    for am in prom["alerting"]["alertmanagers"]:
        for sc in am["static_configs"]:
            scraped.update(t.split(":")[0] for t in sc["targets"])
    assert scraped <= services, scraped - services
    long_running = {
        n
        for n, s in compose["services"].items()
        if s.get("command") in (["collect"], ["store"], ["rules", "run"])
    }
    assert long_running == {"collector", "writer", "rules"}
    assert long_running <= scraped


def test_replicas_and_health_checks() -> None:
    """Collectors and rule workers run twice, the writer once; every server has a check."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    svc = compose["services"]
    assert svc["collector"]["deploy"]["replicas"] == 2
    assert svc["rules"]["deploy"]["replicas"] == 2
    assert svc["writer"]["deploy"]["replicas"] == 1
    for name, s in svc.items():
        if name != "migrate":
            assert "healthcheck" in s, name
    assert "/readyz" in str(svc["collector"]["healthcheck"]["test"])
