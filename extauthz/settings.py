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


def check_server(mode: str) -> str:
    """The server Envoy's checks reach in ``mode`` (grpc, http or bridge): "grpc", or
    "http" (a bridge ends at the HTTP service). Its address is ``<server>_addr`` and its
    port ``<server>_port`` in a ready line."""
    return "grpc" if mode == "grpc" else "http"


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


def setting(
    default: Any = None,
    parse: Callable[[Any, str], Any] = str,
    *,
    factory: Callable[[], Any] | None = None,
    env_only: bool = False,
    repr: bool = True,
) -> Any:
    """A setting's default, its parser (file and environment values), and whether it may
    come only from the environment (a secret): declared once, on the field."""
    metadata = {"parse": parse, "env_only": env_only}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, repr=repr, metadata=metadata)


def _text(value: object, what: str) -> str:
    return str(value)


def _path(value: object, what: str) -> Path:
    return Path(str(value)).expanduser()


def _one_of(*choices: str) -> Callable[[Any, str], str]:
    return lambda value, what: _choice(value, what, choices)


@dataclass(frozen=True)
class Settings:
    data_dir: Path = setting(parse=_path, factory=_default_data_dir)
    database_url: str = setting("", _text)  # default: sqlite file in data_dir
    pepper_file: Path | None = setting(None, _path)  # default: data_dir/pepper
    pepper: str = setting("", _text, env_only=True, repr=False)
    mode: str = setting("grpc", _mode)
    grpc_addr: str = setting("127.0.0.1:9001", _text)
    http_addr: str = setting("127.0.0.1:9002", _text)
    # Envoy's access-log stream (frees slots, settles tokens), and how Envoy sends it:
    # grpc (the access-log service) or fluentd.
    als_addr: str = setting("127.0.0.1:9003", _text)
    access_log: str = setting("grpc", _one_of("grpc", "fluentd"))
    grpc_workers: int = setting(4, _positive_int)
    key_headers: tuple[str, ...] = setting(("x-api-key", "authorization"), _header_names)
    key_prefix: str = setting("nk", _text)
    policy_file: Path | None = setting(None, _path)  # default: built-in tiers, no routes
    query_key_params: tuple[str, ...] = setting(("api_key", "apikey"), _names)
    key_cache_ttl: float = setting(30.0, parse_duration)
    key_cache_negative_ttl: float = setting(5.0, parse_duration)
    key_cache_size: int = setting(100_000, _positive_int)
    # While the store is down, cached keys keep working up to this age (then 503).
    key_cache_max_stale: float = setting(300.0, parse_duration)
    # A key lookup waits this long for PostgreSQL, then 503.
    store_timeout: float = setting(0.25, _positive_duration)
    revocation_poll: float = setting(0.25, parse_duration)
    last_used_flush: float = setting(5.0, parse_duration)
    shutdown_grace: float = setting(5.0, parse_duration)
    log_level: str = setting("info", _level)
    counters_url: str = setting("memory://", _counters_url)
    # A slot whose access-log entry never comes is freed after this.
    lease_ttl: float = setting(60.0, _positive_duration)
    # Each Redis call; then the tier's on_counters_down.
    counters_timeout: float = setting(0.05, _positive_duration)
    # How many servers share the counters: the local fallback's divisor.
    replicas: int = setting(1, _positive_int)
    # Daily counts and audit events reach the store this often.
    flush_interval: float = setting(1.0, _positive_duration)
    usage_headers: tuple[str, ...] = setting(
        ("x-usage-input-tokens", "x-usage-output-tokens"), _names
    )
    # Bodies Envoy sends for a max_tokens field; larger ones get 413.
    max_body_bytes: int = setting(1_048_576, _positive_int)
    # "No audit, no allow": write each event before answering.
    audit_blocking: bool = setting(False, _boolean)
    metrics_addr: str = setting("127.0.0.1:9004", _text)  # "off" disables
    metrics_namespace: str = setting("extauthz", _metric_name)
    metrics_tenant_label: bool = setting(True, _boolean)  # a `tenant` label on request counts
    # Tenants with their own label value; the rest are "other".
    metrics_tenant_cap: int = setting(1000, _positive_int)
    trace_exporter: str = setting("none", _one_of("none", "console", "otlp"))
    # The share of root traces sampled; parents decide for their children.
    trace_sample_ratio: float = setting(1.0, _ratio)
    log_format: str = setting("text", _one_of("text", "json"))
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


# From the fields above: each setting's parser, and the secrets accepted from the
# environment only (never from a settings file).
_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    f.name: f.metadata["parse"] for f in dataclasses.fields(Settings) if "parse" in f.metadata
}
_ENV_ONLY = {f.name for f in dataclasses.fields(Settings) if f.metadata.get("env_only")}


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
