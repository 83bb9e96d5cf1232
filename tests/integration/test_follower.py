"""Following a compacted topic into memory: a follower that stops says so, for the service
deciding by its view would otherwise go on with a view that no longer moves."""

from __future__ import annotations

from postback_libs.follower import TopicFollower
from tests.helpers import eventually


async def test_a_follower_that_stops_says_so(settings):
    crashes: list[BaseException] = []
    follower = TopicFollower(
        settings.kafka_bootstrap, settings.topic("postback.catalog"), lambda e: None, crashes.append
    )
    await follower.start()
    try:

        async def broken(*args, **kwargs):
            raise RuntimeError("the consumer broke")

        follower.consumer.getmany = broken  # type: ignore[method-assign]
        await eventually(lambda: crashes, timeout=10, what="the stop reported")
        assert "the consumer broke" in repr(crashes[0])
    finally:
        await follower.stop()
