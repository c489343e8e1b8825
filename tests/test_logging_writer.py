"""The buffered log writer on a real pipe: batches, order, whole lines, bounds, flushes."""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from pythonjsonlogger.json import JsonFormatter

from proxy.logs import AccessEntry, LogWriter

TEXT = logging.Formatter("%(levelname)s %(name)s: %(message)s")


def entry(n: int) -> AccessEntry:
    return AccessEntry(
        created=time.time(),
        peer="10.0.0.7",
        method="GET",
        route="/pos/v10/payments/{paymentid}",
        path=f"/pos/v10/payments/p{n}",
        status=200,
        duration_ms=1.25,
        merchant="store-001",
        token_fingerprint="0123456789ab",
        attempts=1,
        request_id=f"req-{n}",
        mobilepay_correlation_id=None,
    )


def plain(item: AccessEntry) -> str:
    return item.message()


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read, write = os.pipe()
    try:
        yield read, write
    finally:
        os.close(read)
        os.close(write)


def read_lines(fd: int, count: int, seconds: float = 5.0) -> list[str]:
    data = b""
    deadline = time.monotonic() + seconds
    while data.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, remaining))
        if not ready:
            break
        data += os.read(fd, 1 << 16)
    return data.decode().splitlines()


def record(message: str, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("proxy.test", level, "", 0, message, None, None)


def test_access_lines_come_in_order_after_the_lines_before_them(pipe: tuple[int, int]) -> None:
    read, write = pipe
    writer = LogWriter(write, TEXT, plain, flush_lines=1000, flush_seconds=60)
    received: list[bytes] = []

    def reader() -> None:
        while not b"".join(received).endswith(b"END\n"):
            received.append(os.read(read, 1 << 20))

    thread = threading.Thread(target=reader)
    thread.start()
    writer.emit(record("BEGIN"))
    for n in range(3000):
        writer.add(entry(n))
    writer.emit(record("END"))
    writer.close()
    thread.join(5)
    lines = b"".join(received).decode().splitlines()
    assert lines[0] == "WARNING proxy.test: BEGIN"
    assert [line.split("request_id=")[1].split()[0] for line in lines[1:-1]] == [
        f"req-{n}" for n in range(3000)
    ]
    assert lines[-1] == "WARNING proxy.test: END"


def test_lines_of_writers_sharing_a_pipe_never_mix(pipe: tuple[int, int]) -> None:
    """Workers share the supervisor's stderr: each write is whole lines, at most PIPE_BUF."""
    read, write = pipe

    def tagged(tag: str) -> Callable[[AccessEntry], str]:
        return lambda item: f"{tag} {item.message()} {'x' * 200}"

    writers = [LogWriter(write, TEXT, tagged(w)) for w in ("A", "B", "C")]
    received: list[bytes] = []
    total = 3 * 2000

    def reader() -> None:
        count = 0
        while count < total:
            received.append(os.read(read, 1000))  # a slow reader: the pipe fills up
            count += received[-1].count(b"\n")

    thread = threading.Thread(target=reader)
    thread.start()
    for n in range(2000):
        for writer in writers:
            writer.add(entry(n))
    for writer in writers:
        writer.close()
    thread.join(10)
    lines = b"".join(received).decode().splitlines()
    assert len(lines) == total
    for w in "ABC":
        mine = [line for line in lines if line.startswith(f"{w} ")]
        assert [line.split("request_id=")[1].split()[0] for line in mine] == [
            f"req-{n}" for n in range(2000)
        ]
        assert all(line.endswith(" " + "x" * 200) and line.count("req-") == 1 for line in mine)


def test_access_lines_wait_for_the_flush_interval_then_come_out(pipe: tuple[int, int]) -> None:
    read, write = pipe
    writer = LogWriter(write, TEXT, plain, flush_lines=100, flush_seconds=0.2)
    try:
        writer.add(entry(1))
        assert read_lines(read, 1, seconds=0.05) == []  # held in the buffer
        (line,) = read_lines(read, 1)
        assert "request_id=req-1" in line
    finally:
        writer.close()


def test_a_full_buffer_and_an_ordinary_line_flush_at_once(pipe: tuple[int, int]) -> None:
    read, write = pipe
    writer = LogWriter(write, TEXT, plain, flush_lines=10, flush_seconds=60)
    try:
        for n in range(10):
            writer.add(entry(n))
        assert len(read_lines(read, 10)) == 10
        writer.add(entry(10))
        writer.emit(record("token fetch failed"))
        assert read_lines(read, 2)[1] == "WARNING proxy.test: token fetch failed"
    finally:
        writer.close()


def test_request_flush_writes_what_is_held_without_waiting(pipe: tuple[int, int]) -> None:
    read, write = pipe
    writer = LogWriter(write, TEXT, plain, flush_lines=100, flush_seconds=60)
    try:
        writer.add(entry(1))
        writer.request_flush()
        assert len(read_lines(read, 1, seconds=2)) == 1
    finally:
        writer.close()


def test_a_stuck_output_drops_and_counts_lines_instead_of_blocking(
    pipe: tuple[int, int],
) -> None:
    read, write = pipe
    os.set_blocking(write, False)
    with_room = 0
    try:
        while True:  # fill the pipe: the next write blocks the writer thread
            with_room += os.write(write, b"x" * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write, True)
    drops: list[None] = []
    writer = LogWriter(write, TEXT, plain, flush_lines=1, flush_seconds=60, max_pending=50)
    try:
        writer.count_drops(lambda: drops.append(None))
        writer.add(entry(0))  # taken by the writer thread, which then blocks on the full pipe
        time.sleep(0.2)
        for n in range(1, 200):
            writer.add(entry(n))  # returns at once: waits, or is dropped
        writer.emit(record("dropped too: the bound holds for every line"))
        assert writer.dropped == len(drops) == 199 - 50 + 1
        # The reader comes back: what was kept is written, in order.
        assert os.read(read, with_room) == b"x" * with_room
    finally:
        writer.close()
    lines = read_lines(read, 51)
    assert [line.split("request_id=")[1].split()[0] for line in lines] == [
        f"req-{n}" for n in range(51)
    ]


def test_json_access_lines_carry_the_fields(pipe: tuple[int, int]) -> None:
    read, write = pipe
    formatter = JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
    )
    writer = LogWriter(write, formatter, plain, flush_lines=1)
    writer.add(entry(7))
    writer.close()
    (line,) = read_lines(read, 1)
    parsed = json.loads(line)
    assert parsed["logger"] == "proxy.access"
    assert parsed["request_id"] == "req-7"
    assert parsed["status"] == 200
    assert parsed["duration_ms"] == 1.2
    assert parsed["mobilepay_correlation_id"] is None
    assert "req-7" in parsed["message"]
