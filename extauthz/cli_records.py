"""CLI commands for records: `quota show`, `usage show|export`, `retention apply` (the
audit trail's in cli_audit.py). Reading records is itself audited (DATA_ACCESSED), and
pruning them too (DATA_MODIFIED)."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from extauthz.app import Runtime
from extauthz.audit import DATA_ACCESSED, DATA_MODIFIED
from extauthz.cli_common import print_json, with_runtime
from extauthz.errors import ConfigError
from extauthz.model import UsageRecord
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


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def accessed(rt: Runtime, what: str, **detail: object) -> None:
    rt.audit.event(DATA_ACCESSED, "success", actor=rt.keys.actor, reason=what, detail=detail)


# ---------------------------------------------------------------- quota


def cmd_quota_show(args: argparse.Namespace, rt: Runtime) -> int:
    tenant = rt.tenants.find(args.tenant)
    status = rt.quota(tenant.id).status()
    del status["in_flight"]  # slots live in the servers' memory, not in this process
    status["policy_version"] = rt.policy.version
    accessed(rt, "quota.show", tenant_id=tenant.id)
    if args.json:
        print_json(status)
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
    return since, parse_when(args.until, now), f"since {iso(since)}"


def cmd_usage_show(args: argparse.Namespace, rt: Runtime) -> int:
    tenant_id = rt.tenants.find(args.tenant).id if args.tenant else None
    since, until, label = _usage_window(args, rt)
    records = rt.usage.records(tenant_id, since, until)
    accessed(rt, "usage.show", tenant_id=tenant_id, since=since, until=until)
    by_tenant: dict[str, list[UsageRecord]] = {}
    by_day: dict[str, list[UsageRecord]] = {}
    for r in records:
        by_tenant.setdefault(r.tenant_id, []).append(r)
        by_day.setdefault(r.day, []).append(r)
    tenants = {t: totals(rs) for t, rs in sorted(by_tenant.items())}
    days = {d: totals(rs) for d, rs in sorted(by_day.items())}
    total = totals(records)
    if args.json:
        print_json(
            {
                "period": label,
                "since": iso(since),
                "until": iso(until) if until else None,
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
    accessed(rt, "usage.export", tenant_id=tenant_id, rows=len(records), format=args.format)
    write_rows(args, (r.to_dict() for r in records), list(UsageRecord.__slots__))
    return 0


def write_rows(args: argparse.Namespace, rows: Iterable[dict[str, Any]], fields: list[str]) -> None:
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
        print_json(result)
    else:
        print(
            f"deleted {usage} usage records older than {rules.usage_days} days and {audit} "
            f"audit events older than {rules.audit_days} days (a signed checkpoint keeps "
            "`audit verify` working)"
        )
    return 0


def add_commands(sub: Any, add: Any) -> None:
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

    retention = sub.add_parser("retention", help="record retention").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    add(
        retention,
        "apply",
        with_runtime(cmd_retention_apply),
        "delete usage and audit records older than the policy's retention",
    )
