"""What can be tested of the deployment files on a machine without Docker: the compose
file parses and mounts only files that exist, its Envoy config is the renderer's output
and passes `envoy --mode validate`, and promtool accepts the Prometheus config, the
alert rules, and the dashboard's queries' metric names exist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from extauthz.envoyconf import render, to_yaml
from extauthz.launcher import find_envoy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install promtool (the prometheus package; see .ci/run)")
        pytest.skip("promtool not installed: sudo apt-get install prometheus")
    return found


def test_compose_parses_and_every_mounted_file_exists() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    replicas = {"extauthz-1", "extauthz-2", "extauthz-3"}
    assert {*replicas, "extauthz-init", "envoy", "backend", "redis", "postgres"} <= set(services)
    assert {"prometheus", "grafana"} <= set(services)
    for name in replicas:  # one shared store and counters, and the divisor for `local`
        env = services[name]["environment"]
        assert env["EXTAUTHZ_DATABASE_URL"].startswith("postgresql://")
        assert env["EXTAUTHZ_COUNTERS_URL"].startswith("redis://")
        assert env["EXTAUTHZ_REPLICAS"] == str(len(replicas))
    mounts = [v.split(":")[0] for s in services.values() for v in s.get("volumes", [])]
    files = [m for m in mounts if m.startswith("./")]
    assert files
    for path in files:
        assert (ROOT / path).exists(), path
    assert (ROOT / "Dockerfile").exists()


def test_compose_is_safe_to_start_as_it_is() -> None:
    """Published ports are on 127.0.0.1 only; Grafana has no anonymous access and no
    default password, PostgreSQL's password comes from the environment; the extauthz
    image is built once and reused; .dockerignore keeps the venv and git out."""
    text = (ROOT / "docker-compose.yml").read_text()
    services = yaml.safe_load(text)["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    grafana = services["grafana"]["environment"]
    assert grafana.get("GF_AUTH_ANONYMOUS_ENABLED") in (None, "false")
    assert (
        grafana["GF_SECURITY_ADMIN_PASSWORD"]
        == "${GRAFANA_ADMIN_PASSWORD:?set GRAFANA_ADMIN_PASSWORD}"
    )
    assert "admin/admin" not in text
    assert "admin / admin" not in text
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    assert "${POSTGRES_PASSWORD:?" in services["extauthz-1"]["environment"]["EXTAUTHZ_DATABASE_URL"]
    built = [name for name, s in services.items() if "build" in s]
    assert built == ["extauthz-init"]
    users = [n for n, s in services.items() if s.get("image") == "extauthz:local"]
    assert set(users) == {
        "extauthz-init",
        "extauthz-1",
        "extauthz-2",
        "extauthz-3",
        "backend",
        "envoy",
    }
    assert all(services[n]["pull_policy"] == "never" for n in users if n not in built)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_compose_envoy_config_is_the_renderer_output_and_validates() -> None:
    expected = render(
        listen=("0.0.0.0", 8080),  # noqa: S104 - inside the compose network
        upstream=("backend", 8000),
        authz=[(f"extauthz-{i}", 9001) for i in (1, 2, 3)],
        admin=("0.0.0.0", 9901),  # noqa: S104 - scraped by Prometheus in the network
        mode="grpc",
        als=[(f"extauthz-{i}", 9003) for i in (1, 2, 3)],
    )
    path = DEPLOY / "envoy" / "envoy.yaml"
    assert path.read_text() == to_yaml(expected)
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_promtool_accepts_the_rules_and_the_config(tmp_path: Path) -> None:
    tool = promtool()
    rules = DEPLOY / "prometheus" / "alerts.yml"
    checked = subprocess.run(
        [tool, "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    local = tmp_path / "prometheus.yml"
    local.write_text(config.replace("/etc/prometheus/alerts.yml", str(rules)))
    checked = subprocess.run(
        [tool, "check", "config", str(local)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_dashboard_and_alerts_only_use_metrics_we_export() -> None:
    """Every extauthz_* name in the dashboard and the rules is one /metrics serves (as
    docs/observability.md lists them, or its _bucket/_total form), so no panel or alert
    is silently empty."""
    readme = (ROOT / "docs" / "observability.md").read_text()
    exported = set(re.findall(r"^\| `([a-z_]+)`", readme, flags=re.MULTILINE))
    exported |= {
        n
        for row in re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)+)", readme, re.M)
        for n in re.findall(r"`([a-z_]+)`", row)
    }
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "extauthz.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs.append((DEPLOY / "prometheus" / "alerts.yml").read_text())
    used = {m for e in exprs for m in re.findall(r"extauthz_([a-z_]+)", e)}
    for name in used:
        base = re.sub(r"_(bucket|count|sum)$", "", name)
        assert base in exported or base.removesuffix("_total") in exported, name
