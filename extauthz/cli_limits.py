"""CLI commands for limits and records: `quota show` and `audit list`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from extauthz.app import Runtime


def cmd_quota_show(args: argparse.Namespace, rt: Runtime) -> int:
    tenant = rt.tenants.find(args.tenant)
    status = rt.quota(tenant.id).status()
    del status["in_flight"]  # slots live in the servers' memory, not in this process
    status["policy_version"] = rt.policy.version
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    for label, value in status.items():
        print(f"{label + ':':20} {'-' if value is None else value}")
    print("(counts as the running servers last wrote them: every flush_interval)")
    return 0


def cmd_audit_list(args: argparse.Namespace, rt: Runtime) -> int:
    events = rt.store.list_audit(args.limit, args.audit_action)
    if args.json:
        print(json.dumps([e.to_dict() for e in events], indent=2))
        return 0
    if not events:
        print("no audit events yet")
        return 0
    for e in events:
        when = datetime.fromtimestamp(e.ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
        who = e.tenant_id or e.actor or "-"
        print(f"{e.seq:>6} {when} {e.action:15} {e.outcome:8} {who:20} {e.reason} {e.detail}")
    return 0


def add_commands(
    sub: Any, add: Any, with_runtime: Callable[[Callable[[argparse.Namespace, Runtime], int]], Any]
) -> None:
    quota = sub.add_parser("quota", help="daily quotas").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = add(quota, "show", with_runtime(cmd_quota_show), "a tenant's usage and limits today")
    c.add_argument("tenant", help="tenant id or name")

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = add(audit, "list", with_runtime(cmd_audit_list), "the newest audit events, oldest first")
    c.add_argument("--action", dest="audit_action", metavar="ACTION", help="e.g. CONFIG_CHANGED")
    c.add_argument("--limit", type=int, default=50, help="how many (default 50)")
