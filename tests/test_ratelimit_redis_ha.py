"""The Redis store through Sentinel and through a Redis Cluster (real servers on loopback)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpproxy.ratelimit.redis_store import RedisStore
from smtpproxy.ratelimit.store import Entry, RateEntry, SlotAcquire
from tests.redisserver import REDIS_SERVER, RedisServer, Sentinel, create_cluster, free_port

pytestmark = pytest.mark.skipif(
    REDIS_SERVER is None or shutil.which("redis-cli") is None,
    reason="redis-server and redis-cli are not installed (apt-get install redis-server)",
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    nodes = []
    for i in range(3):
        folder = tmp_path / f"node{i}"
        folder.mkdir()
        # The bus port defaults to port + 10000, past 65535 for high free ports: pick one.
        extra = {
            "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf",
            "cluster-port": str(free_port()),
        }
        node = RedisServer(folder, extra=extra)
        nodes.append(node)
    try:
        for node in nodes:
            node.start()
        create_cluster(nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


async def test_through_sentinel(tmp_path: Path) -> None:
    master = RedisServer(tmp_path)
    master.start()
    sentinel = Sentinel(tmp_path, master)
    try:
        store = RedisStore(sentinel.url, timeout=2.0)
        entry = RateEntry("s:k", 60.0, 2)
        results = [await store.apply([entry]) for _ in range(3)]
        assert results[:2] == [[0.0], [0.0]] and results[2][0] > 0
        await store.close()
        assert master.command("EXISTS", "smtpproxy:rl:s:k") == b":1\r\n"  # state lives on the master
    finally:
        sentinel.stop()
        master.stop()


async def test_through_a_cluster_keys_of_a_stage_share_one_slot(cluster: list[RedisServer]) -> None:
    store = RedisStore(f"redis+cluster://127.0.0.1:{cluster[0].port}", timeout=2.0)
    entries: list[Entry] = [
        RateEntry("a:x", 60.0, 2),
        RateEntry("b:y", 60.0, 5),
        SlotAcquire("c:z", "conn1", 1, 30.0),
    ]
    results = [await store.apply(entries) for _ in range(3)]
    assert results[:2] == [[0.0, 0.0, 0.0]] * 2
    assert results[2][0] > 0
    assert (await store.apply([SlotAcquire("c:z", "conn2", 1, 30.0)]))[0] > 0
    await store.release([("c:z", "conn1")])
    assert await store.apply([SlotAcquire("c:z", "conn2", 1, 30.0)]) == [0.0]
    await store.close()
