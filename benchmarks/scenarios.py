"""What is measured: each function runs one scenario and returns plain data."""

from __future__ import annotations

import asyncio
import functools
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from benchmarks import load, procfs
from benchmarks.services import Service, fetch
from benchmarks.stack import (
    MERCHANT_HEADER,
    PAYMENT_PATH,
    PROXIES,
    Stack,
    merchants,
    start_mobilepay_proxy,
)

T = TypeVar("T")
Progress = Callable[[str], None]
MB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    rounds: int
    seconds: float  # each saturation and fixed-rate run
    warm_up_seconds: float
    drift_seconds: float | None
    # wrk at saturation
    saturation_threads: int = 2
    saturation_connections: int = 32
    # the fixed rate: hey's workers x per-worker rate, and as many paced wrk connections
    rate_workers: int = 50
    rate_per_worker: float = 10.0
    # memory
    merchants: int = 10_000
    idle_connections: int = 1_000
    # drift: a moderate steady load
    drift_workers: int = 20
    drift_rate_per_worker: float = 10.0
    drift_reference_seconds: float = 10.0
    # cold start
    cold_merchants: int = 100
    cold_requests: int = 1_000

    @property
    def rate(self) -> float:
        return self.rate_workers * self.rate_per_worker


def rotated(names: Sequence[str], round_number: int) -> list[str]:
    """Each round starts with a different proxy, so a slow phase of the machine is shared."""
    shift = round_number % len(names)
    return [*names[shift:], *names[:shift]]


@dataclass(frozen=True, slots=True)
class CpuUse:
    """Where the CPU time went during a run, in percent of one core.

    ``other`` is busy time no process of the benchmark accounts for: someone else's
    work on the machine (or kernel work charged to no process); ``steal`` is time the
    hypervisor ran another guest instead. Both should be near zero.
    """

    proxy: float
    upstream: float
    load: float
    other: float
    steal: float
    busy: dict[int, float]  # per CPU

    def describe(self) -> str:
        cpus = ", ".join(f"CPU{cpu} {percent:.0f}%" for cpu, percent in self.busy.items())
        return (
            f"proxy {self.proxy:.0f}%, upstream {self.upstream:.0f}%, load {self.load:.0f}%, "
            f"other {self.other:.0f}%, steal {self.steal:.0f}%; busy {cpus}"
        )


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured(stack: Stack, name: str, run: Callable[[], T]) -> tuple[T, CpuUse]:
    """Run a load generator and account the CPU time of everyone involved.

    The load generator is the only child reaped during the run, so RUSAGE_CHILDREN
    grows by its CPU time alone.
    """
    proxy, upstream = stack.proxies[name], stack.upstream
    before = (proxy.cpu_seconds(), upstream.cpu_seconds(), _children_cpu_seconds())
    ticks = procfs.cpu_ticks()
    started = time.monotonic()
    result = run()
    wall = time.monotonic() - started
    busy, steal = procfs.cpu_percent(ticks, procfs.cpu_ticks())
    after = (proxy.cpu_seconds(), upstream.cpu_seconds(), _children_cpu_seconds())
    proxy_cpu, upstream_cpu, load_cpu = (
        100 * (end - start) / wall for start, end in zip(before, after, strict=True)
    )
    ours = proxy_cpu + upstream_cpu + load_cpu
    return result, CpuUse(
        proxy=proxy_cpu,
        upstream=upstream_cpu,
        load=load_cpu,
        other=max(0.0, sum(busy.values()) - ours),
        steal=sum(steal.values()),
        busy=busy,
    )


@dataclass(frozen=True, slots=True)
class SaturationRun:
    proxy: str
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    socket_errors: int
    non_2xx: int
    cpu: CpuUse


def saturation(
    stack: Stack, settings: Settings, script: Path, progress: Progress
) -> list[SaturationRun]:
    """``wrk -t2 -c32`` against each proxy in turn, ``settings.rounds`` times."""
    for name in PROXIES:  # warm pools, caches and the CPU frequency; not recorded
        load.run_wrk(
            stack.url(name), script, seconds=settings.warm_up_seconds, cpus=stack.layout.load
        )
    runs = []
    for round_number in range(settings.rounds):
        for name in rotated(list(PROXIES), round_number):
            result, cpu = measured(
                stack,
                name,
                functools.partial(
                    load.run_wrk,
                    stack.url(name),
                    script,
                    seconds=settings.seconds,
                    threads=settings.saturation_threads,
                    connections=settings.saturation_connections,
                    cpus=stack.layout.load,
                ),
            )
            run = SaturationRun(
                proxy=name,
                round=round_number + 1,
                rps=result.rps,
                p50_ms=result.percentiles_ms[50.0],
                p99_ms=result.percentiles_ms[99.0],
                max_ms=result.max_ms,
                socket_errors=result.socket_errors,
                non_2xx=result.non_2xx,
                cpu=cpu,
            )
            runs.append(run)
            progress(
                f"saturation round {run.round}/{settings.rounds} {PROXIES[name]:>15}: "
                f"{run.rps:8,.0f} req/s  p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                f"({cpu.describe()})"
            )
    return runs


@dataclass(frozen=True, slots=True)
class RateRun:
    proxy: str
    round: int
    tool: str  # "hey" (requests in step) or "wrk-poisson"
    rate: float
    samples: int
    percentiles_ms: dict[float, float]
    max_ms: float
    errors: int
    cpu: CpuUse


@dataclass(slots=True)
class FixedRate:
    runs: list[RateRun] = field(default_factory=list)
    # every hey latency after warm-up, per proxy, for the chart
    hey_samples_ms: dict[str, list[float]] = field(default_factory=dict)


PERCENTILES = (50.0, 75.0, 90.0, 99.0, 99.9)


def fixed_rate(
    stack: Stack, settings: Settings, poisson_script: Path, progress: Progress
) -> FixedRate:
    """The same request rate two ways, alternating proxies: hey as asked, and paced wrk.

    hey starts its workers together and each ticks at ``-q`` per second, so its requests
    arrive in bursts of ``-c`` every ``1/q`` seconds; paced wrk sends the same mean rate
    with independent, exponentially distributed gaps per connection.
    """
    outcome = FixedRate(hey_samples_ms={name: [] for name in PROXIES})
    header = f"{MERCHANT_HEADER}: {stack.merchant_key}"
    for round_number in range(settings.rounds):
        for name in rotated(list(PROXIES), round_number):
            hey, cpu = measured(
                stack,
                name,
                functools.partial(
                    load.run_hey,
                    stack.url(name),
                    header=header,
                    seconds=settings.seconds,
                    workers=settings.rate_workers,
                    rate_per_worker=settings.rate_per_worker,
                    warm_up_seconds=1.0,
                    cpus=stack.layout.load,
                ),
            )
            outcome.hey_samples_ms[name].extend(hey.latencies_ms)
            _record(
                outcome,
                progress,
                settings,
                RateRun(
                    proxy=name,
                    round=round_number + 1,
                    tool="hey",
                    rate=hey.rate,
                    samples=len(hey.latencies_ms),
                    percentiles_ms={p: hey.percentile_ms(p / 100) for p in PERCENTILES},
                    max_ms=hey.latencies_ms[-1],
                    errors=hey.non_200,
                    cpu=cpu,
                ),
            )
        for name in rotated(list(PROXIES), round_number):
            paced, cpu = measured(
                stack,
                name,
                functools.partial(
                    load.run_wrk,
                    stack.url(name),
                    poisson_script,
                    seconds=settings.seconds,
                    connections=settings.rate_workers,
                    cpus=stack.layout.load,
                ),
            )
            _record(
                outcome,
                progress,
                settings,
                RateRun(
                    proxy=name,
                    round=round_number + 1,
                    tool="wrk-poisson",
                    rate=paced.rps,
                    samples=paced.requests,
                    percentiles_ms=paced.percentiles_ms,
                    max_ms=paced.max_ms,
                    errors=paced.socket_errors + paced.non_2xx,
                    cpu=cpu,
                ),
            )
    return outcome


def _record(outcome: FixedRate, progress: Progress, settings: Settings, run: RateRun) -> None:
    outcome.runs.append(run)
    progress(
        f"{run.tool:>11} round {run.round}/{settings.rounds} {PROXIES[run.proxy]:>15}: "
        f"{run.rate:5.0f} req/s  p50 {run.percentiles_ms[50.0]:6.2f} ms  "
        f"p99 {run.percentiles_ms[99.0]:6.2f} ms  (proxy CPU {run.cpu.proxy:3.0f}%)"
    )


@dataclass(frozen=True, slots=True)
class MemoryResult:
    proxy: str
    merchants: int
    connections: int
    answered_200: int
    rss_fresh_mb: float  # right after start-up and one request
    rss_loaded_mb: float  # after the load runs, before the idle connections
    rss_mb: float  # with the idle connections open


def memory(
    stack: Stack, settings: Settings, fresh_rss: dict[str, int], progress: Progress
) -> list[MemoryResult]:
    """RSS with ``idle_connections`` keep-alive terminals connected, one merchant each."""
    keys = [key for key, _ in merchants("store", settings.idle_connections)]
    results = []
    for name in PROXIES:
        loaded = stack.proxies[name].rss_bytes()
        answered, rss = asyncio.run(
            _rss_with_idle_connections(stack.proxies[name], stack.ports[name], keys)
        )
        result = MemoryResult(
            proxy=name,
            merchants=settings.merchants,
            connections=settings.idle_connections,
            answered_200=answered,
            rss_fresh_mb=fresh_rss[name] / MB,
            rss_loaded_mb=loaded / MB,
            rss_mb=rss / MB,
        )
        results.append(result)
        progress(
            f"memory {PROXIES[name]:>15}: {result.rss_mb:6.1f} MB with "
            f"{settings.idle_connections:,} idle connections ({answered} answered 200), "
            f"{result.rss_loaded_mb:.1f} MB before them, {result.rss_fresh_mb:.1f} MB fresh"
        )
    return results


async def _rss_with_idle_connections(
    service: Service, port: int, keys: Sequence[str]
) -> tuple[int, int]:
    """(requests answered 200, RSS) with one idle keep-alive connection per key."""
    async with load.idle_connections(port, PAYMENT_PATH, MERCHANT_HEADER, keys) as statuses:
        await asyncio.sleep(2)  # let the proxy settle: buffers freed, tasks done
        return statuses[200], service.rss_bytes()


@dataclass(frozen=True, slots=True)
class DriftResult:
    seconds: float
    rate: float
    errors: int
    reference_seconds: float
    rss_reference_mb: float
    rss_end_mb: float
    samples: list[tuple[float, float]]  # (seconds, MB)

    @property
    def growth_percent(self) -> float:
        return 100 * (self.rss_end_mb - self.rss_reference_mb) / self.rss_reference_mb


def drift(stack: Stack, settings: Settings, directory: Path, progress: Progress) -> DriftResult:
    """mobilepay-proxy's RSS, sampled every second through a steady moderate load."""
    assert settings.drift_seconds is not None
    seconds = settings.drift_seconds
    service = stack.proxies["proxy"]
    argv = load.hey_command(
        stack.url("proxy"),
        header=f"{MERCHANT_HEADER}: {stack.merchant_key}",
        seconds=seconds,
        workers=settings.drift_workers,
        rate_per_worker=settings.drift_rate_per_worker,
        cpus=stack.layout.load,
    )
    samples: list[tuple[float, float]] = []
    output = directory / "drift-hey.csv"
    with output.open("w") as sink:
        hey = subprocess.Popen(argv, stdout=sink, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        try:
            while hey.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > seconds + load.OVERRUN_SECONDS:
                    raise RuntimeError("hey did not stop after the drift run")
                samples.append((elapsed, service.rss_bytes() / MB))
                time.sleep(1.0)
        finally:
            if hey.poll() is None:
                hey.kill()
                hey.wait()
    result = load.parse_hey(output.read_text(), seconds=seconds)
    reference = min(samples, key=lambda sample: abs(sample[0] - settings.drift_reference_seconds))
    drift = DriftResult(
        seconds=seconds,
        rate=result.rate,
        errors=result.non_200,
        reference_seconds=round(reference[0], 1),
        rss_reference_mb=reference[1],
        rss_end_mb=samples[-1][1],
        samples=[(round(t, 1), round(mb, 2)) for t, mb in samples],
    )
    progress(
        f"drift: {drift.rss_reference_mb:.1f} MB at {drift.reference_seconds:.0f} s, "
        f"{drift.rss_end_mb:.1f} MB at the end ({drift.growth_percent:+.1f}%), "
        f"{drift.rate:.0f} req/s, {drift.errors} errors"
    )
    return drift


@dataclass(frozen=True, slots=True)
class ColdStartResult:
    merchants: int
    requests: int
    token_requests: int  # counted in the upstream's token access log
    initial_token_fetches_metric: float  # the proxy's own count, from /metrics
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    seconds: float

    @property
    def all_200(self) -> bool:
        return self.statuses == {"200": self.requests}


def cold_start(
    stack: Stack, settings: Settings, directory: Path, progress: Progress
) -> ColdStartResult:
    """A freshly started proxy, then ``cold_requests`` concurrent first requests at once."""
    rows = merchants("cold", settings.cold_merchants, country="FI")
    keys = [key for key, _ in rows]
    cold = start_mobilepay_proxy(
        directory,
        upstream_port=stack.upstream_port,
        ca_file=stack.tls.ca_cert,
        merchant_rows=rows,
        cpus=stack.layout.proxy,
    )
    try:
        tokens_before = stack.token_requests()
        burst = asyncio.run(
            load.concurrent_first_requests(
                f"http://127.0.0.1:{cold.port}{PAYMENT_PATH}",
                MERCHANT_HEADER,
                keys,
                settings.cold_requests,
            )
        )
        time.sleep(0.5)  # nginx writes its access log line after the response
        token_requests = stack.token_requests() - tokens_before
        metrics = fetch(cold.metrics_url).decode()
    finally:
        cold.service.stop()
    result = ColdStartResult(
        merchants=settings.cold_merchants,
        requests=settings.cold_requests,
        token_requests=token_requests,
        initial_token_fetches_metric=_metric_sum(
            metrics, "mobilepay_proxy_token_refreshes_total", 'reason="initial"'
        ),
        statuses=dict(sorted(burst.statuses.items())),
        p50_ms=load.percentile(burst.latencies_ms, 0.50),
        p99_ms=load.percentile(burst.latencies_ms, 0.99),
        max_ms=burst.latencies_ms[-1],
        seconds=burst.seconds,
    )
    progress(
        f"cold start: {result.token_requests} token requests for {result.merchants} merchants, "
        f"statuses {result.statuses}, p99 {result.p99_ms:.0f} ms, "
        f"all answered in {result.seconds:.2f} s"
    )
    return result


@dataclass(frozen=True, slots=True)
class AccessLogRun:
    log_level: str
    round: int
    rps: float
    requests: int
    cpu_percent: float


@dataclass(frozen=True, slots=True)
class AccessLogResult:
    """The same proxy at INFO (an access line per request) and at WARNING, alternated."""

    runs: list[AccessLogRun]
    access_lines: int  # written by the INFO proxy during its runs, counted in its log
    requests_at_info: int  # answered by it during those runs, as wrk counted them
    lines_dropped: float  # mobilepay_proxy_log_lines_dropped_total of the INFO proxy

    def median_rps(self, log_level: str) -> float:
        return statistics.median(run.rps for run in self.runs if run.log_level == log_level)

    def median_cpu_us(self, log_level: str) -> float:
        """The proxy's CPU time per request, steadier than throughput on a busy machine."""
        return statistics.median(
            1e4 * run.cpu_percent / run.rps for run in self.runs if run.log_level == log_level
        )


def access_log(
    stack: Stack, settings: Settings, script: Path, directory: Path, progress: Progress
) -> AccessLogResult:
    """wrk against the benchmark's proxy (WARNING) and a second one at INFO, in turns."""
    info = start_mobilepay_proxy(
        directory,
        upstream_port=stack.upstream_port,
        ca_file=stack.tls.ca_cert,
        merchant_rows=merchants("store", settings.merchants),
        cpus=stack.layout.proxy,
        log_level="INFO",
    )
    services = {"WARNING": stack.proxies["proxy"], "INFO": info.service}
    urls = {"WARNING": stack.url("proxy"), "INFO": f"http://127.0.0.1:{info.port}{PAYMENT_PATH}"}
    try:
        load.run_wrk(urls["INFO"], script, seconds=settings.warm_up_seconds, cpus=stack.layout.load)
        time.sleep(1.5)  # the warm-up's access lines are written within a second
        lines_before = _access_lines(info.service.log)
        runs = []
        requests_at_info = 0
        for round_number in range(settings.rounds):
            for level in rotated(["INFO", "WARNING"], round_number):
                service = services[level]
                before, started = service.cpu_seconds(), time.monotonic()
                result = load.run_wrk(
                    urls[level],
                    script,
                    seconds=settings.seconds,
                    threads=settings.saturation_threads,
                    connections=settings.saturation_connections,
                    cpus=stack.layout.load,
                )
                cpu = 100 * (service.cpu_seconds() - before) / (time.monotonic() - started)
                if level == "INFO":
                    requests_at_info += result.requests
                run = AccessLogRun(level, round_number + 1, result.rps, result.requests, cpu)
                runs.append(run)
                progress(
                    f"access log round {run.round}/{settings.rounds} at {level:>7}: "
                    f"{run.rps:8,.0f} req/s (proxy CPU {cpu:.0f}%)"
                )
        time.sleep(1.5)  # access lines are written within a second
        lines = _access_lines(info.service.log) - lines_before
        dropped = _metric_sum(
            fetch(info.metrics_url).decode(), "mobilepay_proxy_log_lines_dropped_total", ""
        )
    finally:
        info.service.stop()
    return AccessLogResult(runs, lines, requests_at_info, dropped)


def _access_lines(log: Path) -> int:
    with log.open("rb") as file:
        return sum(1 for line in file if b" proxy.access: " in line)


def _metric_sum(text: str, name: str, label: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if (line.startswith(name + "{") or line.startswith(name + " ")) and label in line
    )
