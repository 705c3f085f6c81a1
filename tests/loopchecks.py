"""Calls run the HTTP service's way: each as a check greenlet on one event loop
(suspend.py), so Redis is reached through the loop's own connection (resp.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from extauthz import suspend


class LoopChecks:
    def __init__(self) -> None:
        self.loop = suspend.new_event_loop()

    def run(self, *calls: Callable[[], Any], timeout: float = 10.0) -> list[Any]:
        """Start every call at once; their results (or raise the first error)."""

        async def main() -> list[Any]:
            futures: list[asyncio.Future[Any]] = []
            for call in calls:
                future: asyncio.Future[Any] = self.loop.create_future()

                def body(
                    call: Callable[[], Any] = call, future: asyncio.Future[Any] = future
                ) -> None:
                    try:
                        future.set_result(call())
                    except Exception as exc:
                        future.set_exception(exc)

                futures.append(future)
                suspend.start(body, self.loop)
            return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))

        return self.loop.run_until_complete(main())

    def close(self) -> None:
        async def end() -> None:
            suspend.end_loop(self.loop)
            await asyncio.sleep(0)

        self.loop.run_until_complete(end())
        self.loop.close()
