"""Addresses on the command line and in settings: ``host:port``, ``[::1]:port``,
``:port`` and ``http://`` URLs, parsed with messages that say what is wrong."""

from __future__ import annotations

from urllib.parse import urlsplit

from extauthz.errors import ConfigError


def parse_hostport(text: str, what: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``host:port``, ``[::1]:port``, ``:port`` or a URL ``http://host[:port][/]`` ->
    (host, port); IPv6 hosts come back without their brackets."""
    raw = text.strip()
    if "://" in raw:
        return _parse_url(text, what)
    host, sep, port_text = raw.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT (for example 127.0.0.1:8000)")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(f"{what}: {text!r} is not HOST:PORT (IPv6 as [::1]:8000)")
    host = host.strip("[]") or default_host
    return host, int(port_text)


def _parse_url(text: str, what: str) -> tuple[str, int]:
    parts = urlsplit(text.strip())
    if parts.scheme != "http":
        raise ConfigError(
            f"{what}: {text!r}: only http:// is supported (Envoy speaks plain HTTP/1.1 to it)"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"{what}: {text!r} has a path or query; give only http://HOST:PORT "
            "(Envoy forwards each request's own path unchanged)"
        )
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{what}: a user or password in the URL is not supported")
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError(f"{what}: {text!r} has no valid port") from None
    if not parts.hostname:
        raise ConfigError(f"{what}: {text!r} has no host")
    return parts.hostname, port


def hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
