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
from extauthz.errors import ConfigError, ExtauthzError
from extauthz.keys import Pepper, check_prefix
from extauthz.settings import Settings
from extauthz.store import Store, open_store
from extauthz.tenants import TenantManager

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
        return Authorizer(self.resolver, self.settings.key_headers, self.settings.query_key_params)

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
    """The running authorization service: gRPC Check plus upkeep."""

    def __init__(self, runtime: Runtime) -> None:
        from extauthz.transport.grpc_authz import GrpcAuthz, GrpcServer

        self.runtime = runtime
        self.authz = GrpcAuthz(runtime.authorizer())
        self.grpc = GrpcServer([self.authz.handler()], workers=runtime.settings.grpc_workers)
        self.upkeep = Upkeep(runtime)
        self.grpc_port = 0

    def start(self, grpc_addr: str | None = None) -> int:
        addr = grpc_addr or self.runtime.settings.grpc_addr
        try:
            self.grpc_port = self.grpc.bind(addr)
        except OSError as exc:
            raise ConfigError(f"{exc} (set EXTAUTHZ_GRPC_ADDR or --grpc-addr)") from None
        self.runtime.resolver.refresh()
        self.upkeep.start()
        self.grpc.start()
        host = addr.rsplit(":", 1)[0]
        log.info("ext_authz gRPC listening on %s:%d", host, self.grpc_port)
        return self.grpc_port

    def stop(self) -> None:
        log.info(
            "stopping: answering in-flight checks (up to %.1fs)",
            self.runtime.settings.shutdown_grace,
        )
        self.grpc.stop(self.runtime.settings.shutdown_grace)
        self.upkeep.stop()
        log.info("stopped")


def wait_for_signal(alive: Callable[[], bool] | None = None) -> str:
    """Block until SIGTERM or SIGINT, or until ``alive()`` turns False; returns the cause."""
    stop = threading.Event()
    received: list[str] = []

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.2):
            if alive is not None and not alive():
                return "exited"
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return received[0] if received else "stop"
