"""The audit trail's hash chain: tamper evidence without trusting the database.

Every row gets a gap-free sequence number and ``hash = HMAC(audit_key, prev_hash ||
canonical(row))``, the first row chaining on 32 zero bytes. The audit key is derived
from the pepper, so it never sits in the database. The store also keeps a signed *head*
(the last sequence number and hash), which is how a cut-off tail is detected, and signed
*checkpoints*, which let verification start after rows were pruned by retention.

``verify`` names the first bad row: an edited row no longer matches its hash, a deleted
one leaves a gap, reordered rows break the chain where they moved, and a truncated log
ends before its head.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from operator import attrgetter

from extauthz.model import AuditEvent

GENESIS = bytes(32)
# The fields a row's hash covers, in this order: all of them except the hash itself.
CHAINED = (
    "seq",
    "ts",
    "action",
    "outcome",
    "tenant_id",
    "key_id",
    "actor",
    "reason",
    "request_id",
    "source",
    "policy_version",
    "trace_id",
    "detail",
)


_AFTER_SEQ = attrgetter(*CHAINED[1:])


def canonical(event: AuditEvent, seq: int | None = None) -> bytes:
    """A JSON array of the CHAINED fields, no spaces, ASCII: the same bytes for the same
    row in any process (floats print as their shortest round-trip form). ``seq``, when
    given, stands in for the event's own (numbering and hashing happen together)."""
    values = [event.seq if seq is None else seq, *_AFTER_SEQ(event)]
    return json.dumps(values, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Anchor:
    """A signed (seq, hash): the chain's head, or a checkpoint left by pruning."""

    seq: int
    hash: bytes
    signature: bytes


@dataclass(frozen=True)
class Problem:
    seq: int
    message: str

    def __str__(self) -> str:
        return f"row {self.seq}: {self.message}"


class AuditChain:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def link(self, prev: bytes, event: AuditEvent, seq: int | None = None) -> bytes:
        return hmac.digest(self._key, prev + canonical(event, seq), "sha256")

    def anchor(self, kind: str, seq: int, digest: bytes) -> Anchor:
        message = kind.encode() + b"\0" + seq.to_bytes(8, "big") + digest
        return Anchor(seq, digest, hmac.digest(self._key, message, "sha256"))

    def anchor_ok(self, kind: str, anchor: Anchor) -> bool:
        expected = self.anchor(kind, anchor.seq, anchor.hash).signature
        return hmac.compare_digest(expected, anchor.signature)

    def verify(
        self,
        rows: Iterable[AuditEvent],
        start: Anchor | None,
        head: Anchor | None,
        *,
        trust_start: bool = False,
        partial: bool = False,
    ) -> tuple[int, Problem | None]:
        """Check that ``rows`` (in seq order) chain on from ``start`` (None: the genesis)
        and, given a ``head``, end where it says. ``trust_start`` skips the start's
        signature (a range check starting from a row already in the log); ``partial``
        (a range that stops short of the log's end) needs no head. Returns (rows
        checked, the first problem or None)."""
        prev, expected = GENESIS, 1
        if start is not None:
            if not trust_start and not self.anchor_ok("checkpoint", start):
                return 0, Problem(start.seq, "the checkpoint's signature is not valid")
            prev, expected = start.hash, start.seq + 1
        checked = 0
        for row in rows:
            if row.seq != expected:
                what = "missing (deleted?)" if row.seq > expected else "out of order"
                return checked, Problem(expected, f"{what}: the next row is {row.seq}")
            stored = _unhex(row.hash)
            if not stored:
                return checked, Problem(row.seq, "has no hash (written without the audit key)")
            if not hmac.compare_digest(self.link(prev, row), stored):
                return checked, Problem(row.seq, "does not match its hash (edited or moved)")
            prev, expected, checked = stored, expected + 1, checked + 1
        if head is None:
            if expected > 1 and start is None and not partial:
                return checked, Problem(expected - 1, "the log has rows but no signed head")
            return checked, None
        if not self.anchor_ok("head", head):
            return checked, Problem(head.seq, "the head's signature is not valid")
        end = expected - 1
        if head.seq > end:
            return checked, Problem(
                expected, f"missing (truncated?): the log ends at {end}, its head at {head.seq}"
            )
        if head.seq < end or not hmac.compare_digest(head.hash, prev):
            return checked, Problem(head.seq, "the log does not end where its head says")
        return checked, None


def _unhex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return b""


def audit_key(pepper_secret: bytes) -> bytes:
    """The chain's key: derived from the pepper (outside the database), under a label of
    its own, so it is not the key that hashes API keys."""
    return hmac.digest(pepper_secret, b"extauthz audit chain v1", hashlib.sha256)
