"""suspend.until: a check greenlet on an event loop yields while it waits, and is
resumed once, by the answer or by the timeout."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import greenlet

from extauthz import suspend


def run_on_loop(body: Any, seconds: float = 2.0) -> list[Any]:
    """Start ``body`` as a check greenlet on a fresh loop; collect what it returns."""
    out: list[Any] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        suspend.start(lambda: out.append(body()), loop)
        for _ in range(int(seconds / 0.01)):
            if out:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    return out


def test_outside_a_check_greenlet_the_caller_is_told_to_block() -> None:
    registered: list[Any] = []
    assert suspend.until(registered.append, 1.0) is suspend.NOT_SUSPENDABLE
    assert registered == []  # nothing was started


def test_an_answer_from_another_thread_resumes_the_check_with_it() -> None:
    def body() -> Any:
        def register(deliver: Any) -> None:
            threading.Timer(0.05, deliver, args=("answer",)).start()

        return suspend.until(register, 1.0)

    assert run_on_loop(body) == ["answer"]


def test_the_loop_keeps_serving_while_a_check_waits() -> None:
    """Two checks: the second finishes while the first still waits for its answer."""
    order: list[str] = []
    deliver_first: list[Any] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        suspend.start(lambda: order.append(suspend.until(deliver_first.append, 1.0)), loop)
        suspend.start(lambda: order.append("second"), loop)
        deliver_first[0]("first")
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert order == ["second", "first"]


def test_no_answer_in_time_is_timed_out_and_a_late_answer_is_ignored() -> None:
    late: list[Any] = []
    out: list[Any] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        suspend.start(lambda: out.append(suspend.until(late.append, 0.05)), loop)
        await asyncio.sleep(0.1)
        late[0]("too late")  # must not resume the finished greenlet (or raise)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert out == [suspend.TIMED_OUT]
    late[0]("after the loop closed")  # nobody waits: ignored


def test_a_finished_check_leaves_its_greenlet_for_the_next_one() -> None:
    """Greenlets are reused (a new one costs a fresh frame stack per check): checks
    run one after another on one loop share a greenlet; one that raises does not
    take its greenlet (or the loop) down."""
    seen: list[Any] = []

    def failing() -> None:
        seen.append(greenlet.getcurrent())
        raise RuntimeError("a bug in a check")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        suspend.start(lambda: seen.append(greenlet.getcurrent()), loop)
        suspend.start(failing, loop)
        suspend.start(lambda: seen.append(greenlet.getcurrent()), loop)

    asyncio.run(main())
    assert len(seen) == 3
    assert seen[0] is seen[1] is seen[2]


def test_an_answer_read_by_the_loop_itself_resumes_the_check_at_once() -> None:
    """Delivered on the loop's thread, outside any check (a Redis reply read by the
    loop): the check runs on before deliver() returns, not a turn of the loop later."""
    order: list[str] = []
    deliver: list[Any] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        suspend.start(lambda: order.append(suspend.until(deliver.append, None)), loop)
        deliver[0]("reply")
        order.append("after deliver")

    asyncio.run(main())
    assert order == ["reply", "after deliver"]
