"""Terminals: wrk for saturation, hey for a fixed rate, asyncio clients for the rest."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import math
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from benchmarks.services import taskset

# How long a load generator may overrun its own duration before it is killed.
OVERRUN_SECONDS = 30.0


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


# The percentiles wrk reports for every run (its own HdrHistogram, microsecond resolution).
WRK_PERCENTILES = (50.0, 75.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    percentiles_ms: dict[float, float]
    max_ms: float
    socket_errors: int
    non_2xx: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


_WRK_SCRIPT = """-- Written by benchmarks/load.py: the routing header and a summary to parse.
wrk.headers["{header}"] = "{value}"
{pacing}
done = function(summary, latency, requests)
  local e = summary.errors
  local percentiles = {{}}
  for _, p in ipairs({{{percentiles}}}) do
    table.insert(percentiles, string.format('"%g":%d', p, latency:percentile(p)))
  end
  io.write(string.format(
    'WRK_RESULT {{"requests":%d,"duration_us":%d,"max_us":%d,"socket_errors":%d,' ..
    '"non_2xx":%d,"percentiles_us":{{%s}}}}\\n',
    summary.requests, summary.duration, latency.max,
    e.connect + e.read + e.write + e.timeout, e.status, table.concat(percentiles, ",")))
end
"""

# Each connection waits an exponentially distributed time before each request, so the
# arrivals of all connections together are close to a Poisson process: terminals that
# poll independently, not in step. Each wrk thread gets its own random seed.
_POISSON_PACING = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end
function init(args)
  math.randomseed(seed * 7919)
end
function delay()
  return -math.log(1 - math.random()) * {mean_ms}
end
"""


def write_wrk_script(
    path: Path, header: str, value: str, *, mean_delay_ms: float | None = None
) -> Path:
    """A wrk script sending ``header: value``; with ``mean_delay_ms``, paced per connection."""
    pacing = "" if mean_delay_ms is None else _POISSON_PACING.format(mean_ms=f"{mean_delay_ms:g}")
    path.write_text(
        _WRK_SCRIPT.format(
            header=header,
            value=value,
            pacing=pacing,
            percentiles=", ".join(f"{p:g}" for p in WRK_PERCENTILES),
        )
    )
    return path


def run_wrk(
    url: str,
    script: Path,
    *,
    seconds: float,
    threads: int = 2,
    connections: int = 32,
    cpus: Sequence[int] = (),
) -> WrkResult:
    argv = [
        *taskset(cpus),
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        url,
    ]
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + OVERRUN_SECONDS, check=True
    )
    for line in completed.stdout.splitlines():
        if line.startswith("WRK_RESULT "):
            data = json.loads(line.removeprefix("WRK_RESULT "))
            return WrkResult(
                requests=data["requests"],
                seconds=data["duration_us"] / 1e6,
                percentiles_ms={float(p): us / 1000 for p, us in data["percentiles_us"].items()},
                max_ms=data["max_us"] / 1000,
                socket_errors=data["socket_errors"],
                non_2xx=data["non_2xx"],
            )
    raise RuntimeError(f"wrk printed no summary:\n{completed.stdout}\n{completed.stderr}")


@dataclass(frozen=True, slots=True)
class HeyResult:
    latencies_ms: tuple[float, ...]  # sorted, warm-up excluded
    statuses: Counter[int]  # every request, warm-up included
    requests: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile_ms(self, fraction: float) -> float:
        return percentile(self.latencies_ms, fraction)

    @property
    def non_200(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)


def hey_command(
    url: str,
    *,
    header: str,
    seconds: float,
    workers: int,
    rate_per_worker: float,
    cpus: Sequence[int] = (),
) -> list[str]:
    """``hey -z`` at ``workers * rate_per_worker`` requests per second, every sample as CSV."""
    return [
        *taskset(cpus),
        "hey",
        "-z",
        f"{seconds:g}s",
        "-q",
        f"{rate_per_worker:g}",
        "-c",
        str(workers),
        "-H",
        header,
        "-o",
        "csv",
        url,
    ]


def parse_hey(output: str, *, seconds: float, warm_up_seconds: float = 0.0) -> HeyResult:
    """Requests started in the first ``warm_up_seconds`` (where hey opens its connections)
    count for the statuses but not for the latencies.
    """
    # response-time,DNS+dialup,DNS,Request-write,Response-delay,Response-read,status-code,offset
    # with times in seconds; offset is when the request started.
    rows = list(csv.DictReader(io.StringIO(output)))
    if not rows:
        raise RuntimeError("hey produced no samples")
    return HeyResult(
        latencies_ms=tuple(
            sorted(
                float(row["response-time"]) * 1000
                for row in rows
                if float(row["offset"]) >= warm_up_seconds
            )
        ),
        statuses=Counter(int(row["status-code"]) for row in rows),
        requests=len(rows),
        seconds=seconds,
    )


def run_hey(
    url: str,
    *,
    header: str,
    seconds: float,
    workers: int,
    rate_per_worker: float,
    warm_up_seconds: float = 0.0,
    cpus: Sequence[int] = (),
) -> HeyResult:
    argv = hey_command(
        url,
        header=header,
        seconds=seconds,
        workers=workers,
        rate_per_worker=rate_per_worker,
        cpus=cpus,
    )
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + OVERRUN_SECONDS, check=True
    )
    return parse_hey(completed.stdout, seconds=seconds, warm_up_seconds=warm_up_seconds)


def _request(path: str, host: str, header: str, key: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{header}: {key}\r\n"
        "User-Agent: pos-terminal/1.0\r\nAccept: application/json\r\n\r\n"
    ).encode()


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one Content-Length-framed response; return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


@contextlib.asynccontextmanager
async def idle_connections(
    port: int, path: str, header: str, keys: Sequence[str], *, concurrency: int = 100
) -> AsyncIterator[Counter[int]]:
    """One keep-alive request on each of ``len(keys)`` connections, then hold them open.

    Yields the statuses of those requests; the connections close on exit.
    """
    host = f"127.0.0.1:{port}"
    gate = asyncio.Semaphore(concurrency)
    writers: list[asyncio.StreamWriter] = []

    async def one(key: str) -> int:
        async with gate:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            writer.write(_request(path, host, header, key))
            await writer.drain()
            return await _read_response(reader)

    try:
        statuses = await asyncio.gather(*(one(key) for key in keys))
        yield Counter(statuses)
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@dataclass(frozen=True, slots=True)
class BurstResult:
    statuses: Counter[str]
    latencies_ms: tuple[float, ...]  # sorted
    seconds: float


async def concurrent_first_requests(
    url: str, header: str, keys: Sequence[str], total: int
) -> BurstResult:
    """``total`` requests at once, on as many fresh connections, spread over ``keys``."""
    connector = aiohttp.TCPConnector(limit=total)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(n: int) -> tuple[str, float]:
            started = time.perf_counter()
            try:
                async with session.get(url, headers={header: keys[n % len(keys)]}) as response:
                    await response.read()
                    outcome = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            return outcome, (time.perf_counter() - started) * 1000

        started = time.perf_counter()
        results = await asyncio.gather(*(one(n) for n in range(total)))
        elapsed = time.perf_counter() - started
    return BurstResult(
        statuses=Counter(outcome for outcome, _ in results),
        latencies_ms=tuple(sorted(latency for _, latency in results)),
        seconds=elapsed,
    )
