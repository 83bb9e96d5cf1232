"""The relay puts each record on the partition Kafka's default partitioners would choose."""

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given
from hypothesis import strategies as st

from postback_libs.outbox import _partition, murmur2

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("key", "partition"),
    # The Java client's DefaultPartitioner over 1,000 partitions.
    [(b"", 681), (b"a", 524), (b"ab", 434), (b"abc", 107), (b"123456789", 566), (b"\x00 ", 742)],
)
def test_partition_matches_the_java_client(key, partition):
    assert _partition(key, tuple(range(1000))) == partition


@given(st.binary(max_size=80))
def test_murmur2_matches_aiokafkas(key):
    assert murmur2(key) == aiokafka_murmur2(key)
