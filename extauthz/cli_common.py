"""What the CLI's commands share: time and JSON formats, tables, a Runtime per command."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from extauthz.app import Runtime
from extauthz.settings import Settings

Handler = Callable[[argparse.Namespace, Settings], int]


def when(ts: float | None) -> str:
    """A time as ISO 8601 UTC to the second, or "-"."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def with_runtime(fn: Callable[[argparse.Namespace, Runtime], int]) -> Handler:
    """A command run on a Runtime opened from the settings, closed afterwards."""

    def run(args: argparse.Namespace, settings: Settings) -> int:
        runtime = Runtime.open(settings)
        try:
            return fn(args, runtime)
        finally:
            runtime.close()

    return run
