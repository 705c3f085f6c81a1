"""The `extauthz` command: init, tenants, policy and the parser live here; keys in
cli_keys.py, `serve` in runner.py, `up`, `demo` and `envoy-config` in stack.py, the
records' commands in cli_records.py and cli_audit.py.

Exit codes: 0 success, 1 error, 2 bad usage, 3 not found, 4 conflict, 130 interrupted,
141 the reader of the output went away.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from extauthz import __version__
from extauthz.app import Runtime, init
from extauthz.cli_common import Handler, print_json, table, when, with_runtime
from extauthz.errors import ConflictError, ExtauthzError, NotFoundError, UsageError
from extauthz.keys import without_secrets
from extauthz.model import Tenant, TenantTier
from extauthz.settings import Settings, load_settings
from extauthz.telemetry.logs import configure as configure_logs


def _tenant_json(t: Tenant) -> dict[str, object]:
    data = t.to_dict()
    data["created_at"], data["updated_at"] = when(t.created_at), when(t.updated_at)
    return data


# ---------------------------------------------------------------- init


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    result = init(settings)
    if args.json:
        print_json(result)
    else:
        if result["pepper_file"]:
            verb = "created" if result["pepper_created"] else "kept existing"
            print(f"pepper: {verb} {result['pepper_file']} (mode 0600; back it up, keep it secret)")
        else:
            print("pepper: from EXTAUTHZ_PEPPER")
        print(f"database: {result['database_url']} (schema version {result['schema_version']})")
    return 0


# ---------------------------------------------------------------- tenants


def _show_tenant(args: argparse.Namespace, rt: Runtime, t: Tenant, verb: str = "") -> int:
    if args.json:
        print_json(_tenant_json(t))
    elif verb:
        print(f"{verb} tenant {t.name} ({t.id}): tier {t.tier.value}, {t.status.value}")
    else:
        for label, value in _tenant_json(t).items():
            print(f"{label + ':':12} {value}")
        keys = rt.keys.list_keys(t.id)
        active = sum(1 for k in keys if k.state_at(rt.clock.now()) == "active")
        print(f"{'keys:':12} {active} active, {len(keys)} in all")
    return 0


@with_runtime
def cmd_tenants_create(args: argparse.Namespace, rt: Runtime) -> int:
    tenant = rt.tenants.create_tenant(args.name, TenantTier.parse(args.tier), args.id)
    return _show_tenant(args, rt, tenant, "created")


@with_runtime
def cmd_tenants_list(args: argparse.Namespace, rt: Runtime) -> int:
    tenants = rt.tenants.list_tenants()
    if args.json:
        print_json([_tenant_json(t) for t in tenants])
    elif not tenants:
        print("no tenants yet: create one with `extauthz tenants create NAME --tier free`")
    else:
        table(
            [[t.id, t.name, t.tier.value, t.status.value, when(t.created_at)] for t in tenants],
            ["ID", "NAME", "TIER", "STATUS", "CREATED"],
        )
    return 0


@with_runtime
def cmd_tenants_show(args: argparse.Namespace, rt: Runtime) -> int:
    return _show_tenant(args, rt, rt.tenants.find(args.tenant))


def _tenant_change(action: str) -> Handler:
    @with_runtime
    def run(args: argparse.Namespace, rt: Runtime) -> int:
        tenant = rt.tenants.find(args.tenant)
        if action == "suspend":
            return _show_tenant(args, rt, rt.tenants.suspend(tenant.id), "suspended")
        if action == "resume":
            return _show_tenant(args, rt, rt.tenants.resume(tenant.id), "resumed")
        if action == "set-tier":
            changed = rt.tenants.set_tier(tenant.id, TenantTier.parse(args.tier))
            return _show_tenant(args, rt, changed, "updated")
        rt.tenants.delete(tenant.id)
        if args.json:
            print_json({"id": tenant.id, "deleted": True})
        else:
            print(f"deleted tenant {tenant.name} ({tenant.id}) and all its keys")
        return 0

    return run


# ---------------------------------------------------------------- policy


def cmd_policy_check(args: argparse.Namespace, settings: Settings) -> int:
    """Validate a policy file without starting anything (errors exit 1 with file:line)."""
    from extauthz.policy import load_policy

    policy = load_policy(Path(args.file))
    if args.json:
        print_json(
            {
                "ok": True,
                "file": args.file,
                "version": policy.version,
                "timezone": policy.timezone,
                "tiers": {t.value: dataclasses.asdict(lim) for t, lim in policy.tiers.items()},
                "tenants": policy.tenants and {k: dict(v) for k, v in policy.tenants.items()},
                "routes": [dataclasses.asdict(r) for r in policy.routes],
                "tokens": dataclasses.asdict(policy.tokens),
                "audit": {"allowed": policy.audit.allowed},
                "warnings": list(policy.notices),
            }
        )
        return 0
    for notice in policy.notices:
        print(f"warning: {notice}", file=sys.stderr)
    sources = [f"header {policy.tokens.header}"] if policy.tokens.header else []
    if policy.tokens.body_field:
        sources.append(f"body field {policy.tokens.body_field}")
    print(f"policy OK: {args.file} (version {policy.version})")
    print(
        f"  {len(policy.tiers)} tiers, {len(policy.tenants)} tenant overrides, "
        f"{len(policy.routes)} route rules, time zone {policy.timezone}"
    )
    print(f"  token counts from: {', '.join(sources) or 'nowhere'}")
    allowed = policy.audit.allowed
    audited = "none" if allowed == 0 else "all" if allowed == 1 else f"{allowed:.0%}"
    print(f"  allowed requests audited: {audited} (denials and admin changes: all)")
    return 0


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse quotes what it refuses, and that can be a key pasted in the wrong place.
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {without_secrets(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    from extauthz import cli_audit, cli_keys, cli_records, runner, stack

    parser = _Parser(prog="extauthz", description="External authorization sidecar for Envoy.")
    parser.add_argument("--version", action="version", version=f"extauthz {__version__}")
    parser.add_argument("--config", metavar="FILE", help="settings file (or EXTAUTHZ_CONFIG)")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (or EXTAUTHZ_DATA_DIR)")
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="sqlite:///PATH or memory:// (or EXTAUTHZ_DATABASE_URL)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, fn: Handler, help_: str, json_flag: bool = True) -> Any:
        cmd = parent.add_parser(name, help=help_, description=help_)
        cmd.set_defaults(fn=fn)
        if json_flag:
            cmd.add_argument("--json", action="store_true", help="print JSON for scripts")
        return cmd

    add(sub, "init", cmd_init, "create the pepper file and the database (safe to re-run)")
    runner.add_commands(sub, add)
    stack.add_commands(sub, add)

    tenants = sub.add_parser("tenants", help="manage tenants").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = add(tenants, "create", cmd_tenants_create, "create a tenant")
    c.add_argument("name")
    c.add_argument("--tier", default="free", help="free, starter, professional or enterprise")
    c.add_argument("--id", help="choose the tenant id (default: generated)")
    add(tenants, "list", cmd_tenants_list, "list tenants")
    for name, help_ in (
        ("show", "show a tenant"),
        ("suspend", "suspend: its keys get 403"),
        ("resume", "resume a suspended tenant"),
        ("delete", "delete a tenant and all its keys"),
    ):
        fn = cmd_tenants_show if name == "show" else _tenant_change(name)
        add(tenants, name, fn, help_).add_argument("tenant", help="tenant id or name")
    c = add(tenants, "set-tier", _tenant_change("set-tier"), "change a tenant's tier")
    c.add_argument("tenant", help="tenant id or name")
    c.add_argument("tier", help="free, starter, professional or enterprise")

    policy = sub.add_parser("policy", help="tier policy tools").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = add(policy, "check", cmd_policy_check, "validate a policy file without starting anything")
    c.add_argument("file", help="e.g. config/policy.yaml")

    cli_keys.add_commands(sub, add)
    cli_records.add_commands(sub, add)
    cli_audit.add_commands(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        overrides: dict[str, Any] = {}
        if args.data_dir:
            data_dir = load_settings(environ={"EXTAUTHZ_DATA_DIR": args.data_dir}).data_dir
            overrides["data_dir"] = data_dir
        if args.database_url:
            overrides["database_url"] = args.database_url
        settings = settings.with_overrides(**overrides)
        configure_logs(settings.log_level, settings.log_format)
        handler: Handler = args.fn
        return handler(args, settings)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`extauthz audit list | head -1`): stop quietly, as Unix
        # tools do, and keep Python from failing again on the final flush of stdout.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ExtauthzError as exc:
        if args.debug:
            raise
        print(f"extauthz: error: {without_secrets(str(exc))}", file=sys.stderr)
        if isinstance(exc, UsageError):
            return 2
        if isinstance(exc, NotFoundError):
            return 3
        return 4 if isinstance(exc, ConflictError) else 1
    except Exception as exc:  # the user gets one line, not a traceback
        if args.debug:
            raise
        print(
            f"extauthz: unexpected error ({type(exc).__name__}): {without_secrets(str(exc))}; "
            "re-run with --debug for details",
            file=sys.stderr,
        )
        return 1
