"""`extauthz keys ...`: create (the key shown once), list, show, revoke, rotate. A secret
key passed where a key id belongs is taken by its key id and never printed back."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from extauthz.app import Runtime
from extauthz.cli_common import print_json, table, when, with_runtime
from extauthz.errors import ExtauthzError
from extauthz.model import APIKey
from extauthz.settings import parse_duration


def _key_state(k: APIKey, now: float) -> str:
    state = k.state_at(now)
    if state == "active" and k.expires_at is not None:
        return f"active until {when(k.expires_at)}"
    return state


def _key_json(k: APIKey, now: float) -> dict[str, object]:
    data: dict[str, object] = {
        "key_id": k.key_id,
        "tenant_id": k.tenant_id,
        "name": k.name,
        "state": k.state_at(now),
    }
    for field in ("created_at", "expires_at", "revoked_at", "last_used_at"):
        data[field] = None if getattr(k, field) is None else when(getattr(k, field))
    data["rotated_to"] = k.rotated_to
    return data


def _print_new_key(
    args: argparse.Namespace, rt: Runtime, key_id: str, full_key: str, verb: str
) -> None:
    key = rt.keys.get_key(key_id)
    if args.json:
        print_json(
            {
                "key_id": key_id,
                "key": full_key,
                "tenant_id": key.tenant_id,
                "name": key.name,
                "expires_at": key.expires_at and when(key.expires_at),
            }
        )
        return
    print(
        f"{verb} API key {key_id} for tenant {key.tenant_id}"
        + (f", expires {when(key.expires_at)}" if key.expires_at else "")
    )
    print(f"key: {full_key}")
    print("This is the only time the key is shown: store it now.", file=sys.stderr)


@with_runtime
def cmd_keys_create(args: argparse.Namespace, rt: Runtime) -> int:
    tenant = rt.tenants.find(args.tenant)
    expires = parse_duration(args.expires_in, "--expires-in") if args.expires_in else None
    if expires == 0:
        raise ExtauthzError("--expires-in must be more than 0")
    key_id, full_key = rt.keys.create_key(tenant.id, args.name, expires)
    _print_new_key(args, rt, key_id, full_key, "created")
    return 0


@with_runtime
def cmd_keys_list(args: argparse.Namespace, rt: Runtime) -> int:
    tenant_id = rt.tenants.find(args.tenant).id if args.tenant else None
    keys, now = rt.keys.list_keys(tenant_id), rt.clock.now()
    if args.json:
        print_json([_key_json(k, now) for k in keys])
    elif not keys:
        print("no API keys" + (f" for {args.tenant}" if args.tenant else ""))
    else:
        table(
            [
                [
                    k.key_id,
                    k.tenant_id,
                    k.name,
                    _key_state(k, now),
                    when(k.created_at),
                    when(k.last_used_at),
                ]
                for k in keys
            ],
            ["KEY ID", "TENANT", "NAME", "STATE", "CREATED", "LAST USED"],
        )
    return 0


@with_runtime
def cmd_keys_show(args: argparse.Namespace, rt: Runtime) -> int:
    data = _key_json(rt.keys.get_key(args.key_id), rt.clock.now())
    if args.json:
        print_json(data)
    else:
        for label, value in data.items():
            print(f"{label + ':':14} {'-' if value is None else value}")
    return 0


def _warn_if_secret(rt: Runtime, ref: str) -> None:
    if rt.keys.resolver.format.well_shaped(ref):
        print(
            "note: you passed the secret key itself, not its key id; it is not shown, but "
            "it may now be in your shell history",
            file=sys.stderr,
        )


@with_runtime
def cmd_keys_revoke(args: argparse.Namespace, rt: Runtime) -> int:
    key = rt.keys.revoke_key(args.key_id)
    _warn_if_secret(rt, args.key_id)
    if args.json:
        print_json(_key_json(key, rt.clock.now()))
    else:
        print(
            f"revoked API key {key.key_id} (tenant {key.tenant_id}); "
            "running servers refuse it within a second"
        )
    return 0


@with_runtime
def cmd_keys_rotate(args: argparse.Namespace, rt: Runtime) -> int:
    grace = parse_duration(args.grace, "--grace")
    old_id = rt.keys.key_id_of(args.key_id)
    key_id, full_key = rt.keys.rotate_key(old_id, grace)
    _warn_if_secret(rt, args.key_id)
    if not args.json:
        print(f"old key {old_id} keeps working until {when(rt.clock.now() + grace)}")
    _print_new_key(args, rt, key_id, full_key, "rotated to")
    return 0


def add_commands(sub: Any, add: Any) -> None:
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    c = add(keys, "create", cmd_keys_create, "create an API key (shown once)")
    c.add_argument("tenant", help="tenant id or name")
    c.add_argument("--name", default="default", help="a label for the key")
    c.add_argument("--expires-in", metavar="DURATION", help="e.g. 90d, 12h (default: never)")
    c = add(keys, "list", cmd_keys_list, "list API keys (never the keys themselves)")
    c.add_argument("tenant", nargs="?", help="only this tenant's keys")
    key_help = "the key id (key_...); the secret key itself is taken too, and never echoed"
    add(keys, "show", cmd_keys_show, "show one key's record").add_argument("key_id", help=key_help)
    add(keys, "revoke", cmd_keys_revoke, "revoke a key at once").add_argument(
        "key_id", help=key_help
    )
    c = add(keys, "rotate", cmd_keys_rotate, "issue a new key; the old one ends after --grace")
    c.add_argument("key_id", help=key_help)
    c.add_argument("--grace", default="1h", metavar="DURATION", help="default 1h; 0 ends it now")
