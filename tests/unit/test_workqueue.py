"""The work queue keeps claiming through a database that goes away for a moment."""

import asyncio

import pytest

from postback_libs.workqueue import WorkQueue

pytestmark = pytest.mark.unit


async def test_a_failed_claim_is_tried_again_not_the_end_of_the_queue():
    claims = 0
    done: list[str] = []

    async def claim(n: int) -> list[str]:
        nonlocal claims
        claims += 1
        if claims == 1:
            raise OSError("the database went away")
        return ["row"] if claims == 2 else []

    async def work(row: str) -> None:
        done.append(row)

    queue = WorkQueue(claim, work, concurrency=2, idle_poll_seconds=0.01)
    runner = asyncio.create_task(queue.run())
    try:
        for _ in range(300):
            if done:
                break
            await asyncio.sleep(0.01)
        assert done == ["row"]
        assert not runner.done()
    finally:
        await queue.drain(1)
        await asyncio.wait_for(runner, 5)
