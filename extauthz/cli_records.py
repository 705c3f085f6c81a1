"""CLI commands for records: `quota show`, `usage show|export`, `audit
list|tail|query|verify|export`, `retention apply`. Reading records is itself audited
(DATA_ACCESSED), and pruning them too (DATA_MODIFIED)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from extauthz.app import Runtime
from extauthz.audit import DATA_ACCESSED, DATA_MODIFIED, Verification
from extauthz.errors import ConfigError, UsageError
from extauthz.model import AuditEvent, UsageRecord
from extauthz.settings import parse_duration
from extauthz.usage import month_start, totals

Handler = Callable[[argparse.Namespace, Runtime], int]


def parse_when(text: str | None, now: float) -> float | None:
    """``2026-11-01``, ``2026-11-01T12:00:00+01:00`` (UTC if no zone) or ``7d`` (ago)."""
    if text is None:
        return None
    try:
        return now - parse_duration(text, "time")
    except ConfigError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a time: use 2026-11-01, an ISO time, or 7d") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _accessed(rt: Runtime, what: str, **detail: object) -> None:
    rt.audit.event(DATA_ACCESSED, "success", actor=rt.keys.actor, reason=what, detail=detail)


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


# ---------------------------------------------------------------- quota


def cmd_quota_show(args: argparse.Namespace, rt: Runtime) -> int:
    tenant = rt.tenants.find(args.tenant)
    status = rt.quota(tenant.id).status()
    del status["in_flight"]  # slots live in the servers' memory, not in this process
    status["policy_version"] = rt.policy.version
    _accessed(rt, "quota.show", tenant_id=tenant.id)
    if args.json:
        _print_json(status)
        return 0
    for label, value in status.items():
        print(f"{label + ':':20} {'-' if value is None else value}")
    print("(counts as the running servers last wrote them: every flush_interval)")
    return 0


# ---------------------------------------------------------------- usage


def _usage_window(args: argparse.Namespace, rt: Runtime) -> tuple[float, float | None, str]:
    now = rt.clock.now()
    if args.days:
        return now - args.days * 86_400, None, f"the last {args.days} days"
    since = parse_when(args.since, now)
    if since is None:
        return month_start(now, rt.policy.timezone), None, "this month so far"
    return since, parse_when(args.until, now), f"since {_iso(since)}"


def cmd_usage_show(args: argparse.Namespace, rt: Runtime) -> int:
    tenant_id = rt.tenants.find(args.tenant).id if args.tenant else None
    since, until, label = _usage_window(args, rt)
    records = rt.usage.records(tenant_id, since, until)
    _accessed(rt, "usage.show", tenant_id=tenant_id, since=since, until=until)
    by_tenant: dict[str, list[UsageRecord]] = {}
    by_day: dict[str, list[UsageRecord]] = {}
    for r in records:
        by_tenant.setdefault(r.tenant_id, []).append(r)
        by_day.setdefault(r.day, []).append(r)
    tenants = {t: totals(rs) for t, rs in sorted(by_tenant.items())}
    days = {d: totals(rs) for d, rs in sorted(by_day.items())}
    total = totals(records)
    if args.json:
        _print_json(
            {
                "period": label,
                "since": _iso(since),
                "until": _iso(until) if until else None,
                "tenants": tenants,
                "days": days,
                "total": total,
            }
        )
        return 0
    head = (
        f"{'':28} {'REQUESTS':>9} {'TOKENS IN':>11} {'TOKENS OUT':>11} {'COST':>12} "
        f"{'INCOMPLETE':>10}"
    )

    def line(name: str, t: dict[str, Any]) -> str:
        return (
            f"{name:28} {t['requests']:>9} {t['tokens_in']:>11} {t['tokens_out']:>11} "
            f"{t['cost']:>12.6f} {t['incomplete']:>10}"
        )

    print(f"usage {label}" + (f" for {tenant_id}" if tenant_id else ""))
    print(head)
    for name, t in (days if tenant_id else tenants).items():
        print(line(name, t))
    print(line("TOTAL", total))
    return 0


def cmd_usage_export(args: argparse.Namespace, rt: Runtime) -> int:
    tenant_id = rt.tenants.find(args.tenant).id if args.tenant else None
    now = rt.clock.now()
    since, until = parse_when(args.since, now), parse_when(args.until, now)
    records = rt.usage.records(tenant_id, since, until)
    _accessed(rt, "usage.export", tenant_id=tenant_id, rows=len(records), format=args.format)
    _write(args, (r.to_dict() for r in records), list(UsageRecord.__slots__))
    return 0


def _write(args: argparse.Namespace, rows: Iterable[dict[str, Any]], fields: list[str]) -> None:
    out = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        if args.format == "csv":
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        else:
            for row in rows:
                out.write(json.dumps(row, separators=(",", ":")) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


# ---------------------------------------------------------------- audit


def _event_line(e: AuditEvent) -> str:
    who = e.actor or e.tenant_id or e.source or "-"
    extra = " ".join(x for x in (e.key_id, e.reason, e.detail) if x)
    return f"{e.seq:>7} {_iso(e.ts)} {e.action:15} {e.outcome:8} {who:24} {extra}"


def _show_events(args: argparse.Namespace, events: list[AuditEvent]) -> None:
    if args.json:
        _print_json([e.to_dict() for e in events])
    elif not events:
        print("no audit events match")
    else:
        for e in events:
            print(_event_line(e))


def cmd_audit_list(args: argparse.Namespace, rt: Runtime) -> int:
    events = rt.store.query_audit(
        action=args.audit_action, tenant_id=args.tenant, limit=args.limit, newest_first=True
    )[::-1]
    _accessed(rt, "audit.list", rows=len(events))
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
    _accessed(rt, "audit.query", rows=len(events))
    _show_events(args, events)
    if args.verify:
        return _report(args, rt.audit.verify())
    return 0


def _report(args: argparse.Namespace, result: Verification, to_head: bool = True) -> int:
    if args.json:
        _print_json(
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
    _accessed(rt, "audit.export", rows=len(events))
    fields = list(AuditEvent.__slots__)
    _write(args, (e.to_dict() for e in events), fields)
    return 0


# ---------------------------------------------------------------- retention


def cmd_retention_apply(args: argparse.Namespace, rt: Runtime) -> int:
    rules = rt.policy.retention
    now = rt.clock.now()
    rt.flush()
    usage = rt.store.prune_usage(now - rules.usage_days * 86_400)
    audit = rt.store.prune_audit(now - rules.audit_days * 86_400)
    result = {"usage_deleted": usage, "audit_deleted": audit, **vars(rules)}
    rt.audit.event(
        DATA_MODIFIED, "success", actor=rt.keys.actor, reason="retention.apply", detail=result
    )
    rt.audit.flush()
    if args.json:
        _print_json(result)
    else:
        print(
            f"deleted {usage} usage records older than {rules.usage_days} days and {audit} "
            f"audit events older than {rules.audit_days} days (a signed checkpoint keeps "
            "`audit verify` working)"
        )
    return 0


def add_commands(sub: Any, add: Any, with_runtime: Callable[[Handler], Any]) -> None:
    quota = sub.add_parser("quota", help="daily quotas").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = add(quota, "show", with_runtime(cmd_quota_show), "a tenant's usage and limits today")
    c.add_argument("tenant", help="tenant id or name")

    usage = sub.add_parser("usage", help="usage and billing records").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = add(usage, "show", with_runtime(cmd_usage_show), "usage and cost (default: this month)")
    c.add_argument("tenant", nargs="?", help="tenant id or name (default: all, one row each)")
    c.add_argument("--days", type=int, help="the last N days instead of this month")
    c.add_argument("--since", help="start: 2026-11-01, an ISO time, or 7d (ago)")
    c.add_argument("--until", help="end (exclusive), same forms")
    c = add(usage, "export", with_runtime(cmd_usage_export), "every usage record", json_flag=False)
    c.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    c.add_argument("--tenant", help="only this tenant")
    c.add_argument("--since")
    c.add_argument("--until")
    c.add_argument("--output", "-o", help="file to write (default: standard output)")

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

    retention = sub.add_parser("retention", help="record retention").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add(
        retention,
        "apply",
        with_runtime(cmd_retention_apply),
        "delete usage and audit records older than the policy's retention",
    )
