"""Policy hot reload: the file is watched (polled by the upkeep thread) and SIGHUP asks
for a reload at once. A new policy is validated whole before it replaces the old one in
a single reference swap, so a check sees either the old rules or the new, never a mix.
A bad file keeps the old policy. Both outcomes are audited as CONFIG_CHANGED.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

from extauthz.audit import AuditLogger
from extauthz.policy import Policy, PolicyError, load_policy

log = logging.getLogger("extauthz.policy")


class _Holder(Protocol):
    policy: Policy


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class PolicyWatcher:
    def __init__(
        self, path: Path, holders: tuple[_Holder, ...], audit: AuditLogger | None = None
    ) -> None:
        self.path = path
        self.holders = holders  # everything that reads `.policy` (authorizer, runtime)
        self.audit = audit
        self.requested = threading.Event()  # set by SIGHUP
        self._stamp = _stamp(path)
        self.reloads = 0
        self.failures = 0

    def poll(self) -> bool | None:
        """Reload if asked to or if the file changed: True (swapped), False (kept the
        old policy), None (nothing to do)."""
        stamp = _stamp(self.path)
        asked = self.requested.is_set()
        if not asked and stamp == self._stamp:
            return None
        self.requested.clear()
        self._stamp = stamp  # a bad file is reported once, not on every poll
        return self.reload("signal" if asked else "file changed")

    def reload(self, trigger: str) -> bool:
        old = self.holders[0].policy
        try:
            new = load_policy(self.path)
        except PolicyError as exc:
            self.failures += 1
            log.error("policy reload refused, keeping version %s: %s", old.version, exc)
            if self.audit is not None:
                self.audit.log_config_changed(
                    "failure",
                    old.version,
                    {"file": str(self.path), "trigger": trigger, "error": str(exc)},
                )
            return False
        for notice in new.notices:
            log.warning("%s", notice)
        for holder in self.holders:
            holder.policy = new
        self.reloads += 1
        log.info("policy reloaded (%s): version %s -> %s", trigger, old.version, new.version)
        if self.audit is not None:
            self.audit.log_config_changed(
                "success",
                new.version,
                {"file": str(self.path), "trigger": trigger, "previous_version": old.version},
            )
        return True
