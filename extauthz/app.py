"""Composition root: Settings -> store, pepper, managers -> Authorizer -> gRPC server.

Also the process lifecycle: background upkeep (cache refresh, last-used writes) and a
graceful stop on SIGTERM/SIGINT that answers in-flight checks before exiting.
"""

from __future__ import annotations

import hmac
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

from extauthz.apikeys import APIKeyManager, KeyResolver
from extauthz.authorizer import Authorizer
from extauthz.clock import SYSTEM_CLOCK, Clock
from extauthz.envoyconf import parse_hostport
from extauthz.errors import ConfigError, ExtauthzError
from extauthz.keys import Pepper, check_prefix
from extauthz.policy import Policy, load_policy
from extauthz.settings import Settings
from extauthz.store import Store, open_store
from extauthz.tenants import TenantManager
from extauthz.transport.grpc_authz import GrpcAuthz, GrpcServer
from extauthz.transport.http_authz import HttpAuthzThread

log = logging.getLogger("extauthz")


def load_pepper(settings: Settings) -> Pepper:
    if settings.pepper:
        return Pepper.from_hex(settings.pepper, "EXTAUTHZ_PEPPER")
    return Pepper.load(settings.pepper_path)


def open_secured(settings: Settings) -> tuple[Store, Pepper, bool]:
    """Open the store and the pepper, creating the pepper file if this is a new
    deployment, and refuse a pepper that is not the one the database's keys were made
    with (every key would silently become unknown). Returns (store, pepper, created)."""
    store = open_store(settings.db_url)
    try:
        check_name = "pepper_check_v1"
        created = False
        if not settings.pepper and not settings.pepper_path.exists():
            if store.get_meta(check_name) is not None:
                raise ConfigError(
                    f"pepper file {settings.pepper_path} does not exist, but the database "
                    f"{settings.db_url} holds keys made with a pepper: restore the file or "
                    "set EXTAUTHZ_PEPPER (a new pepper would invalidate every key)"
                )
            created = Pepper.create(settings.pepper_path)
        pepper = load_pepper(settings)
        stored = store.setdefault_meta(check_name, pepper.fingerprint())
        if not hmac.compare_digest(stored, pepper.fingerprint()):
            source = "EXTAUTHZ_PEPPER" if settings.pepper else str(settings.pepper_path)
            raise ConfigError(
                f"the pepper from {source} is not the one the database {settings.db_url} "
                "was initialised with: every key would be refused"
            )
    except BaseException:
        store.close()
        raise
    return store, pepper, created


def init(settings: Settings) -> dict[str, object]:
    """Create the pepper file (0600) and the database schema. Safe to run again."""
    store, _, created = open_secured(settings)
    try:
        version = store.schema_version()
    finally:
        store.close()
    return {
        "pepper_file": None if settings.pepper else str(settings.pepper_path),
        "pepper_created": created,
        "database_url": settings.db_url,
        "schema_version": version,
    }


@dataclass
class Runtime:
    """Everything built from settings that both the CLI and the server use."""

    settings: Settings
    store: Store
    clock: Clock
    resolver: KeyResolver
    keys: APIKeyManager
    tenants: TenantManager

    @classmethod
    def open(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> Runtime:
        check_prefix(settings.key_prefix)
        # On first use this creates the pepper: the embedded default needs no setup step.
        store, pepper, _ = open_secured(settings)
        resolver = KeyResolver(
            store,
            pepper,
            clock,
            prefix=settings.key_prefix,
            ttl=settings.key_cache_ttl,
            negative_ttl=settings.key_cache_negative_ttl,
            size=settings.key_cache_size,
        )
        keys = APIKeyManager(store, pepper, clock, prefix=settings.key_prefix, resolver=resolver)
        return cls(settings, store, clock, resolver, keys, TenantManager(store, clock))

    def authorizer(self) -> Authorizer:
        policy = Policy()
        if self.settings.policy_file is not None:
            policy = load_policy(self.settings.policy_file)
            log.info("policy version %s from %s", policy.version, self.settings.policy_file)
        return Authorizer(
            self.resolver, self.settings.key_headers, self.settings.query_key_params, policy
        )

    def close(self) -> None:
        self.store.close()


class Upkeep(threading.Thread):
    """Polls the store's revision (so revocations from other processes land within
    ``revocation_poll``) and writes last-used times in batches."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(name="extauthz-upkeep", daemon=True)
        self.runtime = runtime
        self.stopping = threading.Event()

    def run(self) -> None:
        settings = self.runtime.settings
        clock = self.runtime.clock
        next_flush = clock.monotonic() + settings.last_used_flush
        while not self.stopping.wait(settings.revocation_poll):
            try:
                self.runtime.resolver.refresh()
                if clock.monotonic() >= next_flush:
                    next_flush = clock.monotonic() + settings.last_used_flush
                    self.runtime.resolver.flush_last_used()
            except ExtauthzError as exc:
                log.warning("store upkeep failed: %s", exc)
            except Exception:
                # Keep polling: a dead upkeep thread would silently stop revocations.
                log.exception("store upkeep failed unexpectedly")

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        try:
            self.runtime.resolver.flush_last_used()
        except ExtauthzError as exc:
            log.warning("could not write last-used times on stop: %s", exc)


class Sidecar:
    """The running authorization service: gRPC Check and/or the HTTP-service endpoint,
    plus upkeep. Both transports share one Authorizer (one cache, one store)."""

    def __init__(self, runtime: Runtime, mode: str | None = None) -> None:
        self.runtime = runtime
        self.mode = mode or runtime.settings.mode
        self.authorizer = runtime.authorizer()
        self.upkeep = Upkeep(runtime)
        self.grpc: GrpcServer | None = None
        self.http: HttpAuthzThread | None = None
        self.ports: dict[str, int] = {}

    def start(self, grpc_addr: str | None = None, http_addr: str | None = None) -> dict[str, int]:
        """Bind and start; returns the bound ports, e.g. ``{"grpc_port": 9001}``."""
        settings = self.runtime.settings
        try:
            if self.mode in ("grpc", "both"):
                addr = grpc_addr or settings.grpc_addr
                self.grpc = GrpcServer(
                    [GrpcAuthz(self.authorizer).handler()], workers=settings.grpc_workers
                )
                self.ports["grpc_port"] = self.grpc.bind(addr)
            if self.mode in ("http", "both"):
                host, port = parse_hostport(http_addr or settings.http_addr, "http address")
                self.http = HttpAuthzThread(self.authorizer)
                self.ports["http_port"] = self.http.start(host, port)
        except OSError as exc:
            self._stop_transports(0)
            raise ConfigError(f"{exc} (see EXTAUTHZ_GRPC_ADDR / EXTAUTHZ_HTTP_ADDR)") from None
        self.runtime.resolver.refresh()
        self.upkeep.start()
        if self.grpc is not None:
            self.grpc.start()
        for name, port in self.ports.items():
            log.info("ext_authz %s listening on port %d", name.split("_")[0], port)
        return self.ports

    def _stop_transports(self, grace: float) -> None:
        if self.grpc is not None:
            self.grpc.stop(grace)
        if self.http is not None:
            self.http.stop(grace)

    def stop(self) -> None:
        grace = self.runtime.settings.shutdown_grace
        log.info("stopping: answering in-flight checks (up to %.1fs)", grace)
        self._stop_transports(grace)
        if self.upkeep.is_alive():
            self.upkeep.stop()
        log.info("stopped")


class StopSignals:
    """Catches SIGTERM and SIGINT from the moment it is created, so a signal that arrives
    while the server is still starting is not lost (nor kills it without a graceful
    stop): ``wait()`` then returns as soon as it is called."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self.received: list[str] = []
        self._previous = {
            sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        self.received.append(signal.Signals(signum).name)
        self._stop.set()

    def wait(self, alive: Callable[[], bool] | None = None) -> str:
        """Block until a signal, or until ``alive()`` turns False; returns the cause."""
        while not self._stop.wait(0.2):
            if alive is not None and not alive():
                return "exited"
        return self.received[0]

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old)
