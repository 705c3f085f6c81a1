"""Process settings: where to listen, which store, which headers. The only reader of os.environ.

Precedence: built-in default < settings file (``EXTAUTHZ_CONFIG`` or ``--config``) <
environment variable ``EXTAUTHZ_<NAME>``. Unknown names in the file are errors.
Business rules (tiers, limits) are policy, not settings, and live elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extauthz.errors import ConfigError, redact

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?")
MODES = ("grpc", "http", "both", "bridge")  # bridge: envoybridge.py
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # counters_url: shared counters
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str | float, what: str = "duration") -> float:
    """``1.5``, ``250ms``, ``30s``, ``15m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION.fullmatch(str(text).strip())
        if match is None:
            raise ConfigError(f"{what}: {text!r} is not a duration such as 30s, 15m, 12h or 30d")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 0:
        raise ConfigError(f"{what}: must not be negative")
    return value


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "extauthz"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=_default_data_dir)
    database_url: str = ""  # default: sqlite file in data_dir
    pepper_file: Path | None = None  # default: data_dir/pepper
    pepper: str = field(default="", repr=False)
    mode: str = "grpc"
    grpc_addr: str = "127.0.0.1:9001"
    http_addr: str = "127.0.0.1:9002"
    als_addr: str = "127.0.0.1:9003"  # Envoy's access-log stream (frees slots, settles tokens)
    access_log: str = "grpc"  # how Envoy sends it: grpc (access-log service) or fluentd
    grpc_workers: int = 4
    key_headers: tuple[str, ...] = ("x-api-key", "authorization")
    key_prefix: str = "nk"
    policy_file: Path | None = None  # default: the built-in tier defaults, no routes
    query_key_params: tuple[str, ...] = ("api_key", "apikey")
    key_cache_ttl: float = 30.0
    key_cache_negative_ttl: float = 5.0
    key_cache_size: int = 100_000
    # While the store is down, cached keys keep working up to this age (then 503).
    key_cache_max_stale: float = 300.0
    store_timeout: float = 0.25  # a key lookup waits this long for PostgreSQL, then 503
    revocation_poll: float = 0.25
    last_used_flush: float = 5.0
    shutdown_grace: float = 5.0
    log_level: str = "info"
    counters_url: str = "memory://"
    lease_ttl: float = 60.0  # a slot whose access-log entry never comes is freed after this
    counters_timeout: float = 0.05  # each Redis call; then the tier's on_counters_down
    replicas: int = 1  # how many servers share the counters: the local fallback's divisor
    flush_interval: float = 1.0  # daily counts and audit events reach the store this often
    usage_headers: tuple[str, ...] = ("x-usage-input-tokens", "x-usage-output-tokens")
    max_body_bytes: int = 1_048_576  # bodies Envoy sends for a max_tokens field; larger: 413
    audit_blocking: bool = False  # "no audit, no allow": write each event before answering
    metrics_addr: str = "127.0.0.1:9004"  # /metrics, /healthz, /readyz; "off" disables
    metrics_namespace: str = "extauthz"
    metrics_tenant_label: bool = True  # a `tenant` label on request counts
    metrics_tenant_cap: int = 1000  # tenants with their own label value; the rest "other"
    trace_exporter: str = "none"  # none, console (stderr) or otlp (the otlp extra)
    trace_sample_ratio: float = 1.0  # share of root traces sampled; parents decide for children
    log_format: str = "text"  # text or json (one JSON object per line)
    # Not a setting: the names the file or the environment gave (the rest are defaults).
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'extauthz.db'}"

    @property
    def pepper_path(self) -> Path:
        return self.pepper_file or self.data_dir / "pepper"

    def is_given(self, name: str) -> bool:
        """Whether ``name`` came from the settings file, the environment or a flag."""
        return name in self.given

    def with_flags(self, **flags: Any) -> Settings:
        """Command-line flags over these settings (None: that flag was not given)."""
        given = {name: value for name, value in flags.items() if value is not None}
        return self.with_overrides(**given) if given else self

    def with_overrides(self, **changes: Any) -> Settings:
        """These values instead (from command-line flags); they count as given."""
        given = self.given | {k for k in changes if k != "given"}
        return dataclasses.replace(self, **changes, given=given)


def _names(text: str | list[str], what: str) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(str(i).strip().lower() for i in items if str(i).strip())
    for name in names:
        if not re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", name):
            raise ConfigError(f"{what}: {name!r} is not a valid header or parameter name")
    return names


def _positive_int(value: object, what: str) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not an integer") from None
    if number < 1:
        raise ConfigError(f"{what}: must be at least 1")
    return number


def _level(value: object, what: str) -> str:
    level = str(value).lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise ConfigError(f"{what}: use debug, info, warning or error")
    return level


def _mode(value: object, what: str) -> str:
    mode = str(value).lower()
    if mode not in MODES:
        raise ConfigError(f"{what}: use grpc, http, both or bridge")
    return mode


def _header_names(value: Any, what: str) -> tuple[str, ...]:
    names = _names(value, what)
    if not names:
        raise ConfigError(f"{what}: name at least one header")
    return names


def _choice(value: object, what: str, choices: tuple[str, ...]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ConfigError(f"{what}: use {', '.join(choices)}, not {value!r}")
    return text


def _ratio(value: object, what: str) -> float:
    try:
        ratio = float(str(value))
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not a number from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"{what}: must be from 0 to 1, not {ratio}")
    return ratio


def _metric_name(value: object, what: str) -> str:
    name = str(value)
    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", name):
        raise ConfigError(f"{what}: {name!r} is not a valid Prometheus name prefix")
    return name


def _boolean(value: object, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what}: {value!r} is not true or false")


def _positive_duration(value: object, what: str) -> float:
    seconds = parse_duration(value, what)  # type: ignore[arg-type]
    if seconds <= 0:
        raise ConfigError(f"{what}: must be more than 0")
    return seconds


def _counters_url(value: object, what: str) -> str:
    url = str(value).strip()
    if url != "memory://" and not url.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"{what}: {redact(url)!r}: use memory://, redis://HOST:PORT/DB, "
            "rediss://HOST:PORT/DB (TLS) or unix:///PATH/TO/redis.sock"
        )
    return url


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "data_dir": lambda v, w: Path(str(v)).expanduser(),
    "database_url": lambda v, w: str(v),
    "pepper_file": lambda v, w: Path(str(v)).expanduser(),
    "pepper": lambda v, w: str(v),
    "mode": _mode,
    "grpc_addr": lambda v, w: str(v),
    "http_addr": lambda v, w: str(v),
    "grpc_workers": _positive_int,
    "key_headers": _header_names,
    "key_prefix": lambda v, w: str(v),
    "policy_file": lambda v, w: Path(str(v)).expanduser(),
    "query_key_params": _names,
    "key_cache_ttl": parse_duration,
    "key_cache_negative_ttl": parse_duration,
    "key_cache_size": _positive_int,
    "key_cache_max_stale": parse_duration,
    "store_timeout": _positive_duration,
    "revocation_poll": parse_duration,
    "last_used_flush": parse_duration,
    "shutdown_grace": parse_duration,
    "log_level": _level,
    "als_addr": lambda v, w: str(v),
    "access_log": lambda v, w: _choice(v, w, ("grpc", "fluentd")),
    "counters_url": _counters_url,
    "lease_ttl": _positive_duration,
    "counters_timeout": _positive_duration,
    "replicas": _positive_int,
    "flush_interval": _positive_duration,
    "usage_headers": _names,
    "max_body_bytes": _positive_int,
    "audit_blocking": _boolean,
    "metrics_addr": lambda v, w: str(v),
    "metrics_namespace": _metric_name,
    "metrics_tenant_label": _boolean,
    "metrics_tenant_cap": _positive_int,
    "trace_exporter": lambda v, w: _choice(v, w, ("none", "console", "otlp")),
    "trace_sample_ratio": _ratio,
    "log_format": lambda v, w: _choice(v, w, ("text", "json")),
}
# The pepper is a secret: accepted from the environment only, never from a settings file.
_ENV_ONLY = {"pepper"}


def load_settings(
    config_file: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or env.get("EXTAUTHZ_CONFIG")
    if path:
        values.update(_read_file(Path(path)))
    for name, parse in _PARSERS.items():
        raw = env.get("EXTAUTHZ_" + name.upper())
        if raw is not None and raw != "":
            values[name] = parse(raw, "EXTAUTHZ_" + name.upper())
    return Settings(**values, given=frozenset(values))


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of setting names to values")
    lines = {
        str(k): i + 1
        for i, line in enumerate(text.splitlines())
        for k in data
        if line.startswith(f"{k}:")
    }
    values: dict[str, Any] = {}
    for name, raw in data.items():
        where = f"{path}:{lines.get(str(name), 1)}"
        if name in _ENV_ONLY:
            raise ConfigError(f"{where}: {name} may only come from EXTAUTHZ_{name.upper()}")
        parse = _PARSERS.get(str(name))
        if parse is None:
            known = ", ".join(sorted(set(_PARSERS) - _ENV_ONLY))
            raise ConfigError(f"{where}: unknown setting {name!r} (known: {known})")
        values[str(name)] = parse(raw, f"{where}: {name}")
    return values
