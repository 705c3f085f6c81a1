"""The check and access-log paths make no cyclic garbage: the server freezes its heap
once a second (upkeep.py), which is only safe while that holds."""

from __future__ import annotations

import gc
from pathlib import Path

from extauthz.app import Runtime
from extauthz.model import CheckInput, Completion, TenantTier
from extauthz.settings import Settings
from extauthz.sidecar import Sidecar


def test_allowed_denied_and_finished_requests_leave_no_cyclic_garbage(tmp_path: Path) -> None:
    """2,000 allowed checks with their access-log entries and 2,000 refused ones, with
    the cyclic collector off: a collection afterwards finds nothing unreachable."""
    runtime = Runtime.open(Settings(data_dir=tmp_path, metrics_addr="off"))
    try:
        runtime.tenants.create_tenant("x", TenantTier.PROFESSIONAL, "t")
        key = runtime.keys.create_key("t")[1]
        sidecar = Sidecar(runtime)
        check = sidecar.authorizer.check
        for i in range(50):  # caches and lazily built answers first
            check(CheckInput("GET", "/v1", {"x-api-key": key}, request_id=f"w{i}"))
        gc.collect()
        gc.disable()
        try:
            for i in range(2000):
                check(CheckInput("GET", "/v1", {"x-api-key": key}, request_id=f"r{i}"))
                sidecar._finished([Completion(f"r{i}", 200, 1.0, 10, 10, 1, 2, "t")])
                check(CheckInput("GET", "/v1", {"x-api-key": "nk_" + "x" * 43}))
            assert gc.collect() == 0
        finally:
            gc.enable()
    finally:
        runtime.close()
