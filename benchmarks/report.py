"""Turning measurements into the table, results.json, RESULTS.md and latency.png."""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.scenarios import (
    AccessLogResult,
    ColdStartResult,
    DriftResult,
    FixedRate,
    MemoryResult,
    SaturationRun,
    Settings,
)
from benchmarks.services import CpuLayout
from benchmarks.stack import PROJECT_ROOT, PROXIES, payment_body

# Targets: measurements, not tests. A miss is reported, never an error.
MIN_THROUGHPUT_VS_NAIVE = 1.5
MIN_THROUGHPUT_VS_NGINX = 0.25
MAX_P99_AT_RATE_MS = 3.0
MAX_RSS_MB = 80.0
MAX_DRIFT_PERCENT = 10.0
MIN_INFO_VS_WARNING = 0.90  # throughput with the access log on, against off


@dataclass(frozen=True, slots=True)
class Machine:
    date: str
    nproc: int
    cpu_model: str
    kernel: str
    python: str
    aiohttp: str
    nginx: str
    wrk: str
    hey: str
    uvloop: str | None  # mobilepay-proxy runs on uvloop when it is installed
    revision: str

    @classmethod
    def describe(cls) -> Machine:
        """Call before pinning this process to CPUs: ``nproc`` counts the allowed ones."""
        return cls(
            date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            nproc=len(os.sched_getaffinity(0)),
            cpu_model=_cpu_model(),
            kernel=platform.release(),
            python=platform.python_version(),
            aiohttp=importlib.metadata.version("aiohttp"),
            nginx=_nginx_version(),
            wrk=_debian_version("wrk"),
            hey=_debian_version("hey"),
            uvloop=_python_version("uvloop"),
            revision=_revision(),
        )

    def lines(self) -> list[str]:
        return [
            f"date: {self.date}",
            f"machine: {self.nproc} CPUs (nproc), {self.cpu_model}, Linux {self.kernel}",
            f"software: Python {self.python}, aiohttp {self.aiohttp}, nginx {self.nginx}, "
            f"wrk {self.wrk}, hey {self.hey}",
            f"event loops: mobilepay-proxy on "
            f"{f'uvloop {self.uvloop}' if self.uvloop else 'asyncio'} (it uses uvloop when "
            "installed), naive aiohttp on asyncio's own loop",
            f"mobilepay-proxy revision: {self.revision}",
        ]


def _python_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _revision() -> str:
    """The commit measured, and whether proxy/ had uncommitted changes."""

    def git(*args: str) -> str:
        completed = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, check=False
        )
        return completed.stdout.strip() if completed.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--", "proxy", "pyproject.toml")
    return f"{commit} + uncommitted changes in proxy/ or pyproject.toml" if changed else commit


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _nginx_version() -> str:
    completed = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    found = re.search(r"nginx/(\S+)", completed.stderr + completed.stdout)
    return found.group(1) if found else "unknown"


def _debian_version(package: str) -> str:
    completed = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return completed.stdout.strip() if completed.returncode == 0 else "unknown"


@dataclass(frozen=True, slots=True)
class Results:
    machine: Machine
    settings: Settings
    cpu_layout: CpuLayout
    saturation: list[SaturationRun]
    fixed_rate: FixedRate
    memory: list[MemoryResult]
    drift: DriftResult | None
    cold_start: ColdStartResult
    access_log: AccessLogResult


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    value: str
    limit: str
    passed: bool


@dataclass(frozen=True, slots=True)
class Row:
    figure: str
    nginx: str = ""
    naive: str = ""
    proxy: str = ""
    vs_nginx: str = ""
    vs_naive: str = ""
    target: Target | None = None


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else "-"


class Figures:
    """Medians over the rounds, per proxy."""

    def __init__(self, results: Results) -> None:
        self.results = results

    def saturation(self, name: str, pick: Callable[[SaturationRun], float]) -> float:
        return _median(pick(run) for run in self.results.saturation if run.proxy == name)

    def rate(self, name: str, tool: str, percent: float) -> float:
        """The median over the rounds of one latency percentile at the fixed rate."""
        runs = self.results.fixed_rate.runs
        return _median(
            run.percentiles_ms[percent] for run in runs if run.proxy == name and run.tool == tool
        )

    def memory(self, name: str) -> MemoryResult:
        return next(result for result in self.results.memory if result.proxy == name)


def _compared(
    figure: str,
    values: dict[str, float],
    show: Callable[[float], str],
    target: Target | None = None,
) -> Row:
    """A row with a figure for each proxy and mobilepay-proxy's ratios to the others."""
    return Row(
        figure,
        nginx=show(values["nginx"]),
        naive=show(values["naive"]),
        proxy=show(values["proxy"]),
        vs_nginx=_ratio(values["proxy"], values["nginx"]),
        vs_naive=_ratio(values["proxy"], values["naive"]),
        target=target,
    )


def _p99_target(name: str, p99_ms: float) -> Target:
    return Target(
        name, f"{_ms(p99_ms)} ms", f"<= {MAX_P99_AT_RATE_MS:g} ms", p99_ms <= MAX_P99_AT_RATE_MS
    )


def _mb(value: float) -> str:
    return f"{value:.1f}"


def rows(results: Results) -> list[Row]:
    figures = Figures(results)
    settings = results.settings

    def each(pick: Callable[[str], float]) -> dict[str, float]:
        return {name: pick(name) for name in PROXIES}

    wrk = f"wrk -t{settings.saturation_threads} -c{settings.saturation_connections}"
    rps = each(lambda name: figures.saturation(name, lambda run: run.rps))
    vs_naive, vs_nginx = rps["proxy"] / rps["naive"], rps["proxy"] / rps["nginx"]
    table = [
        _compared(
            f"throughput, req/s ({wrk})",
            rps,
            lambda value: f"{value:,.0f}",
            Target(
                "throughput",
                f"{vs_naive:.2f}x naive, {vs_nginx:.2f}x nginx",
                f">= {MIN_THROUGHPUT_VS_NAIVE}x naive, >= {MIN_THROUGHPUT_VS_NGINX}x nginx",
                vs_naive >= MIN_THROUGHPUT_VS_NAIVE and vs_nginx >= MIN_THROUGHPUT_VS_NGINX,
            ),
        ),
        _compared(
            f"p50 at saturation, ms ({wrk})",
            each(lambda name: figures.saturation(name, lambda run: run.p50_ms)),
            _ms,
        ),
        _compared(
            f"p99 at saturation, ms ({wrk})",
            each(lambda name: figures.saturation(name, lambda run: run.p99_ms)),
            _ms,
        ),
    ]

    rate = f"{settings.rate:g} req/s"
    ways = {
        "hey": f"hey -c{settings.rate_workers} -q{settings.rate_per_worker:g}: "
        f"bursts of {settings.rate_workers}",
        "wrk-poisson": "wrk, Poisson arrivals",
    }
    for tool, how in ways.items():
        p50 = {name: figures.rate(name, tool, 50.0) for name in PROXIES}
        p99 = {name: figures.rate(name, tool, 99.0) for name in PROXIES}
        table.append(_compared(f"p50 at {rate}, ms ({how})", p50, _ms))
        table.append(
            _compared(
                f"p99 at {rate}, ms ({how})",
                p99,
                _ms,
                _p99_target(f"p99 at {rate} ({tool})", p99["proxy"]),
            )
        )

    rss = each(lambda name: figures.memory(name).rss_mb)
    table.append(
        _compared(
            "RSS after start-up, MB", each(lambda name: figures.memory(name).rss_fresh_mb), _mb
        )
    )
    table.append(
        _compared(
            "RSS after the load runs, MB",
            each(lambda name: figures.memory(name).rss_loaded_mb),
            _mb,
        )
    )
    table.append(
        _compared(
            f"RSS, {settings.merchants:,} merchants + {settings.idle_connections:,} idle "
            "connections, MB",
            rss,
            _mb,
            Target(
                "RSS", f"{rss['proxy']:.1f} MB", f"<= {MAX_RSS_MB:g} MB", rss["proxy"] <= MAX_RSS_MB
            ),
        )
    )

    drift = results.drift
    if drift is not None:
        growth = drift.growth_percent
        table.append(
            Row(
                f"RSS growth over {drift.seconds:g} s at {drift.rate:.0f} req/s "
                f"(from {drift.reference_seconds:g} s to the end)",
                proxy=f"{growth:+.1f}% ({drift.rss_reference_mb:.1f} -> {drift.rss_end_mb:.1f} MB)",
                target=Target(
                    "RSS drift",
                    f"{growth:+.1f}%",
                    f"<= {MAX_DRIFT_PERCENT:g}%",
                    growth <= MAX_DRIFT_PERCENT,
                ),
            )
        )

    access = results.access_log
    info, warning = access.median_rps("INFO"), access.median_rps("WARNING")
    table += [
        Row(
            "throughput with the access log: at INFO / at WARNING, req/s",
            proxy=f"{info:,.0f} / {warning:,.0f} ({_ratio(info, warning)})",
            target=Target(
                "access log cost",
                _ratio(info, warning),
                f">= {MIN_INFO_VS_WARNING:.2f}x",
                info >= MIN_INFO_VS_WARNING * warning,
            ),
        ),
        Row(
            "CPU per request with the access log: at INFO / at WARNING, µs",
            proxy=f"{access.median_cpu_us('INFO'):.0f} / {access.median_cpu_us('WARNING'):.0f}",
        ),
        Row(
            "access lines written at INFO / requests wrk counted (dropped)",
            proxy=f"{access.access_lines:,} / {access.requests_at_info:,} "
            f"({access.lines_dropped:.0f})",
        ),
    ]

    cold = results.cold_start
    answered_200 = cold.statuses.get("200", 0)
    table += [
        Row(
            f"cold start: token requests, {cold.merchants} merchants, "
            f"{cold.requests:,} concurrent requests",
            proxy=str(cold.token_requests),
            target=Target(
                "cold start tokens",
                str(cold.token_requests),
                f"= {cold.merchants}",
                cold.token_requests == cold.merchants,
            ),
        ),
        Row(
            "cold start: answers",
            proxy=", ".join(f"{count} x {status}" for status, count in cold.statuses.items()),
            target=Target(
                "cold start statuses",
                f"{answered_200} of {cold.requests} answered 200",
                "all 200",
                cold.all_200,
            ),
        ),
        Row(
            "cold start: p50 / p99 / max, ms",
            proxy=f"{_ms(cold.p50_ms)} / {_ms(cold.p99_ms)} / {_ms(cold.max_ms)}",
        ),
    ]
    return table


HEADERS = (
    "figure",
    PROXIES["nginx"],
    PROXIES["naive"],
    PROXIES["proxy"],
    "vs nginx",
    "vs naive",
    "target",
    "",
)


def _cells(row: Row) -> list[str]:
    target = row.target
    return [
        row.figure,
        row.nginx or "-",
        row.naive or "-",
        row.proxy,
        row.vs_nginx,
        row.vs_naive,
        target.limit if target else "",
        ("PASS" if target.passed else "FAIL") if target else "",
    ]


def text_table(table: Sequence[Row]) -> str:
    lines = [list(HEADERS), *(_cells(row) for row in table)]
    widths = [max(len(line[column]) for line in lines) for column in range(len(HEADERS))]

    def render(cells: Sequence[str]) -> str:
        first, *rest = cells
        aligned = [first.ljust(widths[0])]
        aligned += [cell.rjust(width) for cell, width in zip(rest[:5], widths[1:6], strict=True)]
        aligned += [cell.ljust(width) for cell, width in zip(rest[5:], widths[6:], strict=True)]
        return "  ".join(aligned).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])


def markdown_table(table: Sequence[Row]) -> str:
    header = "| " + " | ".join(HEADERS) + " |"
    align = "|" + "|".join(["---", *["---:"] * 5, "---", "---"]) + "|"
    body = ["| " + " | ".join(_cells(row)) + " |" for row in table]
    return "\n".join([header, align, *body])


def targets(table: Sequence[Row]) -> list[Target]:
    return [row.target for row in table if row.target is not None]


def write_json(path: Path, results: Results, table: Sequence[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = Figures(results)
    medians = {
        name: {
            "throughput_rps": figures.saturation(name, lambda run: run.rps),
            "saturation_p50_ms": figures.saturation(name, lambda run: run.p50_ms),
            "saturation_p99_ms": figures.saturation(name, lambda run: run.p99_ms),
            "saturation_cpu_percent": figures.saturation(name, lambda run: run.cpu.proxy),
            "upstream_cpu_percent_at_saturation": figures.saturation(
                name, lambda run: run.cpu.upstream
            ),
            **{
                f"{tool}_p{p:g}_ms": figures.rate(name, tool, p)
                for tool in ("hey", "wrk-poisson")
                for p in (50.0, 99.0)
            },
            "rss_fresh_mb": figures.memory(name).rss_fresh_mb,
            "rss_idle_connections_mb": figures.memory(name).rss_mb,
        }
        for name in PROXIES
    }
    document: dict[str, Any] = {
        "machine": dataclasses.asdict(results.machine),
        "settings": dataclasses.asdict(results.settings),
        "cpu_layout": {
            **dataclasses.asdict(results.cpu_layout),
            "description": results.cpu_layout.describe(),
        },
        "disturbance": disturbance(results),
        "medians": medians,
        "targets": [dataclasses.asdict(target) for target in targets(table)],
        "saturation_runs": [dataclasses.asdict(run) for run in results.saturation],
        "fixed_rate_runs": [dataclasses.asdict(run) for run in results.fixed_rate.runs],
        "memory": [dataclasses.asdict(result) for result in results.memory],
        "drift": dataclasses.asdict(results.drift) if results.drift else None,
        "cold_start": dataclasses.asdict(results.cold_start),
        "access_log": dataclasses.asdict(results.access_log),
    }
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")


def _bullet(title: str, *sentences: str) -> str:
    """A Markdown list item, wrapped so the file reads well as plain text too."""
    return textwrap.fill(
        f"**{title}**: " + " ".join(sentences),
        width=92,
        initial_indent="- ",
        subsequent_indent="  ",
        break_on_hyphens=False,
    )


def _saturation_story(results: Results) -> str:
    """What bounded each proxy's throughput, read from the CPU figures."""
    figures = Figures(results)
    layout = results.cpu_layout
    if not layout.pinned:
        return "Processes were not pinned, so the CPU figures do not separate the parties."
    cpu = {name: figures.saturation(name, lambda run: run.cpu.proxy) for name in PROXIES}
    load_busy = figures.saturation(
        "nginx", lambda run: max(run.cpu.busy.get(cpu, 0.0) for cpu in layout.load)
    )
    python = (
        f"The naive passthrough and mobilepay-proxy used {cpu['naive']:.0f}% and "
        f"{cpu['proxy']:.0f}% of their core"
    )
    if min(cpu["naive"], cpu["proxy"]) >= 90:
        python += ": their own CPU, not the upstream or wrk, set their throughput."
    else:
        python += ": less than a full core, so something besides their own CPU held them back."
    nginx = (
        f"nginx used {cpu['nginx']:.0f}% of its core while the core shared by the upstream "
        f"and wrk was {load_busy:.0f}% busy"
    )
    if load_busy >= 90:
        nginx += (
            ", so nginx's figure is partly bounded by the load generator and the upstream, "
            "and the ratio to nginx flatters the Python proxies."
        )
    else:
        nginx += "."
    return f"{python} {nginx}"


def write_markdown(path: Path, results: Results, table: Sequence[Row], chart: Path) -> None:
    settings = results.settings
    found = disturbance(results)
    mean_gap_ms = 1000 * settings.rate_workers / settings.rate
    drift = (
        _bullet(
            "Drift",
            "mobilepay-proxy's RSS sampled every second through",
            f"`hey -z {settings.drift_seconds:g}s -q {settings.drift_rate_per_worker:g} "
            f"-c {settings.drift_workers}`,",
            f"right after the memory scenario; growth is from the sample nearest "
            f"{settings.drift_reference_seconds:g} s to the last one.",
        )
        if settings.drift_seconds
        else _bullet("Drift", "not run (`--no-drift` or `--quick`).")
    )
    sections = [
        "# Benchmarks",
        "Generated by `make bench` (`python -m benchmarks`, about 6 minutes); rerun it rather "
        "than editing this file.\n`python -m benchmarks --quick` is one round of 5 s runs "
        "without the drift run (about a minute); `--no-drift` and `--no-pin` do what they say.\n"
        "The targets are goals, not tests: a FAIL is a measurement, and the command exits 0.",
        "\n".join(
            [
                *(f"- {line}" for line in results.machine.lines()),
                f"- CPUs: {results.cpu_layout.describe()}",
            ]
        ),
        *([f"**Warning**: {found}."] if found else []),
        markdown_table(table),
        textwrap.fill(
            '"vs nginx" and "vs naive" are mobilepay-proxy\'s figure divided by theirs: above 1 '
            "is better for throughput, worse for latency and memory. Medians of "
            f"{settings.rounds} round(s); in each round the proxies run one after the other, "
            "the first one rotating.",
            width=92,
        ),
        f"![Latency at {settings.rate:g} req/s]({chart.name})",
        "## What runs",
        "\n".join(
            [
                _bullet(
                    "Upstream",
                    "the stand-in for MobilePay, one nginx process with one worker, TLS with "
                    "an ECDSA P-256 certificate from a throwaway CA.",
                    "`GET /pos/v10/payments/{id}` answers a fixed PoS V10 payment "
                    f"({len(payment_body())} bytes of JSON, MobilePay's own example);",
                    "the token endpoint answers a fixed JWT-shaped token (`exp - iat` = 3600 s, "
                    "`expires_in` 3700) and logs each request to a file of its own, whose lines "
                    "are counted. Connections from the proxies are kept open.",
                ),
                _bullet(
                    "nginx",
                    "one worker, `proxy_pass https://` to an `upstream` block with "
                    "`keepalive 32`, HTTP/1.1, a static `Authorization: Bearer` and "
                    "`x-ibm-client-id`, `proxy_ssl_verify on` against the throwaway CA, TLS "
                    "session reuse, `access_log off`.",
                ),
                _bullet(
                    "naive aiohttp",
                    "`benchmarks/naive.py`, one process: one `ClientSession` verifying the CA, "
                    "request headers copied minus `Host`, the same two headers added, body read "
                    "and returned. No access log.",
                ),
                _bullet(
                    "mobilepay-proxy",
                    f"one process, `--log-level WARNING`, {settings.merchants:,} merchants from "
                    "a `merchants_file`, the upstream as `api_base_url`/`token_url`, the "
                    "throwaway CA as `ca_file`. Routing, the token cache, header hygiene and "
                    "metrics all work as in production; only the access log is silent, because "
                    "its lines are INFO.",
                ),
                _bullet(
                    "Terminals",
                    "every request is `GET /pos/v10/payments/{id}` with `X-Merchant-Id`, sent "
                    "to all three proxies (only mobilepay-proxy uses it).",
                ),
            ]
        ),
        "## How it is measured",
        _bullet(
            "Throughput",
            f"`wrk -t{settings.saturation_threads} -c{settings.saturation_connections} "
            f"-d{settings.seconds:g}s` after a {settings.warm_up_seconds:g} s warm-up per "
            "proxy; p50 and p99 are wrk's own. Where the CPU went, in percent of one core "
            "(medians over the rounds):",
        ),
        cpu_table(results),
        textwrap.indent(
            textwrap.fill(
                _saturation_story(results)
                + ' "Not ours" is CPU time no process of the benchmark accounts for (another '
                'workload on the machine); "stolen" is time the hypervisor gave to another '
                "guest. Both should be near 0; when they are not, the figures are lower and "
                "noisier than on a quiet machine.",
                width=90,
                break_on_hyphens=False,
            ),
            "  ",
        ),
        "\n".join(
            [
                _bullet(
                    f"{settings.rate:g} req/s, hey",
                    f"`hey -z {settings.seconds:g}s -q {settings.rate_per_worker:g} "
                    f"-c {settings.rate_workers}`.",
                    f"hey starts its workers together and each ticks "
                    f"{settings.rate_per_worker:g} times a second, so the requests arrive "
                    f"{settings.rate_workers} at once every "
                    f"{1000 / settings.rate_per_worker:g} ms: these percentiles measure "
                    f"queueing behind a burst of {settings.rate_workers}, which a "
                    "single-threaded proxy serves one after the other. The first second (hey "
                    "connecting) is not counted.",
                ),
                _bullet(
                    f"{settings.rate:g} req/s, Poisson",
                    f"wrk with {settings.rate_workers} connections, each waiting an "
                    f"exponentially distributed time (mean {mean_gap_ms:g} ms) before each "
                    "request: independent terminals at the same mean rate.",
                ),
                _bullet(
                    "Memory",
                    f"after the load runs, {settings.idle_connections:,} connections to each "
                    "proxy, each sending one keep-alive request (to mobilepay-proxy each as a "
                    f"different merchant, so it also fetches and holds "
                    f"{settings.idle_connections:,} tokens) and then staying open and idle; "
                    "RSS 2 s later from `/proc/<pid>/status` (nginx: master and worker "
                    "together).",
                ),
                drift,
                _bullet(
                    "Access log",
                    "a second mobilepay-proxy, configured the same but at `--log-level INFO` "
                    "(an access line per request, its stderr to a file), and the one above at "
                    f"WARNING, each through the same wrk run as for throughput, {settings.rounds} "
                    "round(s) alternating, the first one rotating; medians. The access lines "
                    "the INFO proxy wrote during its runs are counted in its log and compared "
                    "with the requests wrk counted (a few more lines than requests: those "
                    "answered as wrk stopped).",
                ),
                _bullet(
                    "Cold start",
                    f"a freshly started mobilepay-proxy with {settings.cold_merchants} "
                    f"merchants (one VAT each) gets {settings.cold_requests:,} requests at "
                    "once on as many connections, spread evenly over the merchants, from an "
                    "aiohttp client in the benchmark process; token requests are counted in "
                    "the upstream's token log. Latency is as that client sees it, connection "
                    "set-up included.",
                ),
            ]
        ),
    ]
    path.write_text("\n\n".join(sections) + "\n")


def cpu_table(results: Results) -> str:
    """Markdown: CPU use at saturation per proxy under test, medians over the rounds."""
    figures = Figures(results)
    layout = results.cpu_layout
    lines: list[tuple[str, Callable[[SaturationRun], float]]] = [
        ("the proxy under test", lambda run: run.cpu.proxy),
        ("upstream nginx", lambda run: run.cpu.upstream),
        ("wrk", lambda run: run.cpu.load),
        ("not ours", lambda run: run.cpu.other),
        ("stolen", lambda run: run.cpu.steal),
    ]
    cpus = sorted(results.saturation[0].cpu.busy)
    for cpu in cpus:
        role = (
            "proxy under test"
            if cpu in layout.proxy
            else "upstream and load"
            if cpu in layout.load
            else "upstream"
            if cpu in layout.upstream
            else "any"
        )
        lines.append((f"CPU{cpu} busy ({role})", functools.partial(_busy, cpu)))
    header = "  | at saturation | " + " | ".join(PROXIES.values()) + " |"
    align = "  |---|" + "---:|" * len(PROXIES)
    body = [
        f"  | {label} | "
        + " | ".join(f"{figures.saturation(name, pick):.0f}%" for name in PROXIES)
        + " |"
        for label, pick in lines
    ]
    return "\n".join([header, align, *body])


def _busy(cpu: int, run: SaturationRun) -> float:
    return run.cpu.busy.get(cpu, 0.0)


# Percent of a core that may go to work outside the benchmark, or to another guest, in a
# saturation run before the figures are flagged as disturbed.
DISTURBED_OTHER_PERCENT = 20.0
DISTURBED_STEAL_PERCENT = 5.0


def disturbance(results: Results) -> str | None:
    """A warning when something besides the benchmark took CPU during the saturation runs."""
    runs = results.saturation
    disturbed = [
        run
        for run in runs
        if run.cpu.other > DISTURBED_OTHER_PERCENT or run.cpu.steal > DISTURBED_STEAL_PERCENT
    ]
    if not disturbed:
        return None
    worst_other = max(run.cpu.other for run in runs)
    worst_steal = max(run.cpu.steal for run in runs)
    return (
        f"the machine was not quiet: in {len(disturbed)} of {len(runs)} saturation runs, work "
        f"outside the benchmark took up to {worst_other:.0f}% of a core and the hypervisor "
        f"stole up to {worst_steal:.0f}%; the figures are lower and noisier than on a quiet "
        "machine"
    )
