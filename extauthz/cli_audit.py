"""`extauthz audit list|tail|query|verify|export`: the trail, read (each reading is
itself audited, DATA_ACCESSED) and verified."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from extauthz.app import Runtime
from extauthz.audit import Verification
from extauthz.cli_common import print_json, with_runtime
from extauthz.cli_records import accessed, iso, parse_when, write_rows
from extauthz.errors import UsageError
from extauthz.model import AuditEvent


def _event_line(e: AuditEvent) -> str:
    who = e.actor or e.tenant_id or e.source or "-"
    extra = " ".join(x for x in (e.key_id, e.reason, e.detail) if x)
    return f"{e.seq:>7} {iso(e.ts)} {e.action:15} {e.outcome:8} {who:24} {extra}"


def _show_events(args: argparse.Namespace, events: list[AuditEvent]) -> None:
    if args.json:
        print_json([e.to_dict() for e in events])
    elif not events:
        print("no audit events match")
    else:
        for e in events:
            print(_event_line(e))


def cmd_audit_list(args: argparse.Namespace, rt: Runtime) -> int:
    events = rt.store.query_audit(
        action=args.audit_action, tenant_id=args.tenant, limit=args.limit, newest_first=True
    )[::-1]
    accessed(rt, "audit.list", rows=len(events))
    _show_events(args, events)
    return 0


def cmd_audit_tail(args: argparse.Namespace, rt: Runtime) -> int:
    cmd_audit_list(args, rt)
    if not args.follow:
        return 0
    last = rt.store.audit_head()
    after = last.seq if last else 0
    while True:  # until Ctrl-C (exit 130)
        time.sleep(0.5)
        events = rt.store.query_audit(tenant_id=args.tenant, after_seq=after)
        if events:
            _show_events(args, events)
            after = events[-1].seq
            sys.stdout.flush()


def cmd_audit_query(args: argparse.Namespace, rt: Runtime) -> int:
    now = rt.clock.now()
    events = rt.store.query_audit(
        tenant_id=args.tenant,
        action=args.audit_action,
        key_id=args.key_id,
        since=parse_when(args.since, now),
        until=parse_when(args.until, now),
        limit=args.limit,
    )
    accessed(rt, "audit.query", rows=len(events))
    _show_events(args, events)
    if args.verify:
        return _report(args, rt.audit.verify())
    return 0


def _report(args: argparse.Namespace, result: Verification, to_head: bool = True) -> int:
    if args.json:
        print_json(
            {
                "ok": result.ok,
                "checked": result.checked,
                "head_checked": to_head,
                "problem": str(result.problem or ""),
            }
        )
    elif result.ok:
        tail = ", signed head matches" if to_head else " (the range ends before the head)"
        print(f"audit chain OK: {result.checked} rows verified{tail}")
    else:
        print(f"audit chain BROKEN at {result.problem} ({result.checked} rows verified before it)")
    return 0 if result.ok else 1


def verify_range(args: argparse.Namespace, rt: Runtime) -> tuple[int | None, int | None]:
    """--from/--to checked against the log: reversed, below 1, or wholly past its end
    is a usage error; a range reaching past either end is clipped to the log."""
    first, last = args.first, args.last
    for flag, value in (("--from", first), ("--to", last)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be a row number from 1, not {value}")
    if first is not None and last is not None and first > last:
        raise UsageError(f"--from {first} is after --to {last}: give the lower row first")
    kept, end = rt.audit.bounds()
    if first is not None and first > end:
        where = f"the last row is {end}" if end else "the log has no rows yet"
        raise UsageError(f"--from {first} is past the end of the audit log ({where})")
    if last is not None and last < kept:
        raise UsageError(
            f"--to {last} is before the oldest row kept ({kept}; older rows were pruned)"
        )
    if first is not None and first < kept:
        first = kept
    if last is not None and last >= end:
        last = None  # to the end, where the signed head is checked too
    return first, last


def cmd_audit_verify(args: argparse.Namespace, rt: Runtime) -> int:
    rt.audit.flush()
    first, last = verify_range(args, rt)
    result = rt.audit.verify(first, last)
    return _report(args, result, to_head=last is None)


def cmd_audit_export(args: argparse.Namespace, rt: Runtime) -> int:
    now = rt.clock.now()
    events = rt.store.query_audit(
        since=parse_when(args.since, now), until=parse_when(args.until, now)
    )
    accessed(rt, "audit.export", rows=len(events))
    fields = list(AuditEvent.__slots__)
    write_rows(args, (e.to_dict() for e in events), fields)
    return 0


def add_commands(sub: Any, add: Any) -> None:
    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    for name, fn, help_ in (
        ("list", cmd_audit_list, "the newest audit events, oldest first"),
        ("tail", cmd_audit_tail, "the newest events; -f follows new ones"),
    ):
        c = add(audit, name, with_runtime(fn), help_)
        c.add_argument("--action", dest="audit_action", metavar="ACTION", help="e.g. KEY_REVOKED")
        c.add_argument("--tenant", help="only this tenant id")
        c.add_argument("--limit", type=int, default=50, help="how many (default 50)")
        if name == "tail":
            c.add_argument("-f", "--follow", action="store_true", help="keep printing new ones")
    c = add(audit, "query", with_runtime(cmd_audit_query), "events by tenant, action, key, time")
    c.add_argument("--tenant", help="tenant id")
    c.add_argument("--action", dest="audit_action", metavar="ACTION")
    c.add_argument("--key-id", help="e.g. key_Oz9d...")
    c.add_argument("--since")
    c.add_argument("--until")
    c.add_argument("--limit", type=int)
    c.add_argument("--verify", action="store_true", help="also verify the whole chain")
    c = add(audit, "verify", with_runtime(cmd_audit_verify), "check the hash chain")
    c.add_argument("--from", dest="first", type=int, metavar="SEQ", help="first row (default 1)")
    c.add_argument("--to", dest="last", type=int, metavar="SEQ", help="last row (default: head)")
    c = add(
        audit, "export", with_runtime(cmd_audit_export), "events as JSON lines", json_flag=False
    )
    c.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    c.add_argument("--since")
    c.add_argument("--until")
    c.add_argument("--output", "-o", help="file to write (default: standard output)")
