"""Prometheus metrics, one registry per app so many apps can live in one process.

Metrics observe; they never steer. Label values come from bounded sets (route
templates, a fixed method list, status codes), never from raw request data.

With several workers (``[server] workers``), each worker runs prometheus_client in
multiprocess mode and the supervisor exports what they all recorded
(:class:`WorkersMetrics`). Counters and histograms add up, those of exited workers
included; each gauge says how the workers' values combine (``multiprocess_mode``, ignored
by a single process), and the ``live`` modes drop a worker's values once it has exited.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

# Buckets for a proxy that adds well under a millisecond in front of an API that
# answers in tens to hundreds of milliseconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
TOKEN_EXPIRY = "mobilepay_proxy_token_expiry_seconds"
TOKEN_EXPIRY_HELP = "Remaining usable life of the token held for each merchant VAT."
# Every deadline the proxy keeps, one label value each, modelled on nginx's timeouts.
TIMEOUT_PHASES = (
    "request_head",  # the terminal's request head (client_header_timeout)
    "request_body",  # the terminal's request body (client_body_timeout)
    "response_send",  # the terminal stopped reading its answer (send_timeout)
    "upstream_connect",  # connecting to MobilePay (proxy_connect_timeout)
    "upstream_send",  # sending the request to MobilePay (proxy_send_timeout)
    "upstream_read",  # waiting for and reading MobilePay's response (proxy_read_timeout)
    "pool_wait",  # waiting for a free connection to MobilePay
    "request_deadline",  # the whole request, 401 replay and token fetch included
)
# In multiprocess mode a labelled series cannot be removed, so a worker marks a VAT whose
# token it no longer holds with this value; the supervisor drops such series.
NOT_HELD = math.inf
# A worker rewrites a token's published expiry time only when it moved by this much.
EXPIRY_TOLERANCE_SECONDS = 0.5


def multiprocess_enabled() -> bool:
    """Whether prometheus_client keeps values in per-process files for a supervisor to merge.

    It decides once, when first imported, from ``PROMETHEUS_MULTIPROC_DIR`` (or its
    deprecated lower-case spelling); a worker has it in its environment from the start.
    """
    return any(
        name in os.environ for name in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir")
    )


class Metrics:
    """The proxy's metric families, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry, *, multiprocess: bool | None = None) -> None:
        self.registry = registry
        self.multiprocess = multiprocess_enabled() if multiprocess is None else multiprocess
        self.requests = Counter(
            "mobilepay_proxy_requests",
            "Terminal requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "mobilepay_proxy_request_duration_seconds",
            "Whole request duration as the terminal sees it.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "mobilepay_proxy_upstream_duration_seconds",
            "Duration of each attempt at MobilePay, headers and body.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.token_refreshes = Counter(
            "mobilepay_proxy_token_refreshes",
            "Token fetches by reason (initial, expiring, forced) and result (success, failure).",
            ["reason", "result"],
            registry=registry,
        )
        self.token_fetch_duration = Histogram(
            "mobilepay_proxy_token_fetch_duration_seconds",
            "Duration of each call to the token endpoint.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_401_retries = Counter(
            "mobilepay_proxy_upstream_401_retries",
            "Replays after an upstream 401, by result (success, unauthorized, error).",
            ["result"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            "mobilepay_proxy_upstream_retries",
            "Replays after a connection failure before any response byte (safe requests only).",
            ["method"],
            registry=registry,
        )
        self.errors = Counter(
            "mobilepay_proxy_errors",
            "Errors the proxy answered itself, by error code.",
            ["code"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "mobilepay_proxy_in_flight_requests",
            "Terminal requests being handled right now.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        # Counted by the forwarders as a plain number, which the gauge reads at scrape time
        # (or, with workers, publish_sampled writes each second): a gauge's inc() and dec()
        # per request cost about 1.5 % of the CPU.
        self.requests_in_flight = 0
        self.token_store_up = Gauge(
            "mobilepay_proxy_token_store_up",
            "1 while the shared token store answers, 0 while it does not (1 for memory).",
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.token_store_errors = Counter(
            "mobilepay_proxy_token_store_errors",
            "Failed operations on the shared token store, by operation.",
            ["operation"],
            registry=registry,
        )
        self.timeouts = Counter(
            "mobilepay_proxy_timeouts",
            "Deadlines that expired, by phase (see TIMEOUT_PHASES).",
            ["phase"],
            registry=registry,
        )
        self.terminal_connections = Gauge(
            "mobilepay_proxy_terminal_connections",
            "Terminal connections open right now.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.connections_refused = Counter(
            "mobilepay_proxy_connections_refused",
            "Terminal connections refused because max_connections were open.",
            registry=registry,
        )
        self.log_lines_dropped = Counter(
            "mobilepay_proxy_log_lines_dropped",
            "Log lines dropped because the log output could not keep up.",
            registry=registry,
        )
        self.merchants = Gauge(
            "mobilepay_proxy_merchants",
            "Merchant keys in the loaded routing map.",
            multiprocess_mode="livemax",
            registry=registry,
        )
        for reason in ("initial", "expiring", "forced"):
            for result in ("success", "failure"):
                self.token_refreshes.labels(reason, result)
        self.token_store_up.set(1)
        for result in ("success", "unauthorized", "error"):
            self.upstream_401_retries.labels(result)
        for phase in TIMEOUT_PHASES:
            self.timeouts.labels(phase)
        # Set once tokens exist; read at scrape time, so the hot path pays nothing for it.
        self.token_lifetimes: Callable[[], Iterable[tuple[str, float]]] = lambda: ()
        self._token_expiry: Gauge | None = None
        self._expiry_children: dict[str, tuple[Gauge, float]] = {}
        if self.multiprocess:
            # A collector runs in the process being scraped, and the supervisor holds no
            # tokens: workers publish when each token expires (publish_sampled), and
            # WorkersMetrics turns that into the remaining life at scrape time.
            self._token_expiry = Gauge(
                TOKEN_EXPIRY,
                TOKEN_EXPIRY_HELP,
                ["merchant_vat"],
                multiprocess_mode="livemin",
                registry=registry,
            )
        else:
            registry.register(_TokenExpiryCollector(self))
            self.in_flight.set_function(lambda: self.requests_in_flight)
        self._published_in_flight = 0
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._duration_children: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(method, route, status)
        counter.inc()
        self._durations(method, route)[0].observe(seconds)

    def observe_upstream(self, method: str, route: str, seconds: float) -> None:
        self._durations(method, route)[1].observe(seconds)

    def publish_sampled(self) -> None:
        """Write what a single process reads at scrape time (multiprocess mode only).

        Called each second by the server: the requests in flight, and, as a Unix time,
        when each held token expires (only tokens that changed are written).
        """
        gauge = self._token_expiry
        if gauge is None:
            return
        if self.requests_in_flight != self._published_in_flight:
            self._published_in_flight = self.requests_in_flight
            self.in_flight.set(self._published_in_flight)
        now = time.time()
        held = {vat: now + seconds for vat, seconds in self.token_lifetimes()}
        children = self._expiry_children
        for vat, (child, published) in children.items():
            if vat not in held and published != NOT_HELD:
                child.set(NOT_HELD)
                children[vat] = (child, NOT_HELD)
        for vat, expires_at in held.items():
            child, published = children.get(vat) or (gauge.labels(vat), NOT_HELD)
            if abs(expires_at - published) >= EXPIRY_TOLERANCE_SECONDS:
                child.set(expires_at)
                children[vat] = (child, expires_at)

    def _durations(self, method: str, route: str) -> tuple[Histogram, Histogram]:
        key = (method, route)
        children = self._duration_children.get(key)
        if children is None:
            children = self._duration_children[key] = (
                self.request_duration.labels(method, route),
                self.upstream_duration.labels(method, route),
            )
        return children


class _TokenExpiryCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            TOKEN_EXPIRY,
            TOKEN_EXPIRY_HELP,
            labels=["merchant_vat"],
        )
        for vat, seconds in self._metrics.token_lifetimes():
            family.add_metric([vat], seconds)
        yield family


SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class _Archived:
    """The counts of exited workers in one counter or histogram family, added up."""

    name: str
    documentation: str
    type: str
    totals: dict[SampleKey, float] = field(default_factory=dict)

    def add(self, metric: Metric) -> None:
        # Merged histograms are cumulative per worker; sums of cumulative counts are the
        # cumulative counts of the sums, so adding them up is what the merge does too.
        for sample in metric.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            self.totals[key] = self.totals.get(key, 0.0) + sample.value


class WorkersMetrics(Collector):
    """What every worker has recorded in ``directory``, exported by their supervisor.

    prometheus_client's multiprocess merge, minus the series of tokens no worker holds,
    plus the counts of exited workers, which the supervisor keeps in memory so that a
    worker that keeps being restarted does not leave a file behind each time.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.registry = CollectorRegistry()
        # A scrape must not see an exited worker's counts both archived and in its own file.
        self._lock = threading.Lock()
        self._archived: dict[str, _Archived] = {}
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            files = [str(path) for path in self.directory.glob("*.db")]
            merged = MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
            archived = {
                name: _Archived(family.name, family.documentation, family.type, dict(family.totals))
                for name, family in self._archived.items()
            }
        now = time.time()
        for metric in merged:
            if metric.name == TOKEN_EXPIRY:
                # Workers record expiry times (the earliest wins); export the remaining life.
                metric.samples = [
                    sample._replace(value=max(0.0, sample.value - now))
                    for sample in metric.samples
                    if sample.value != NOT_HELD
                ]
            elif metric.name in archived:
                family = archived.pop(metric.name)
                family.add(metric)
                metric = _family(family)
            yield metric
        for family in archived.values():
            yield _family(family)

    def worker_exited(self, pid: int) -> None:
        """Drop an exited worker's gauges; fold its counts into the supervisor's archive.

        Its counters and histograms keep counting towards the totals.
        """
        with self._lock:
            # Every gauge in Metrics has a live mode: its values die with the worker.
            mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
            for kind in ("counter", "histogram"):
                exited = self.directory / f"{kind}_{pid}.db"
                if not exited.exists():
                    continue
                for metric in MultiProcessCollector.merge([str(exited)]):  # type: ignore[no-untyped-call]
                    family = self._archived.setdefault(
                        metric.name, _Archived(metric.name, metric.documentation, metric.type)
                    )
                    family.add(metric)
                exited.unlink()


def _family(archived: _Archived) -> Metric:
    metric = Metric(archived.name, archived.documentation, archived.type)
    for (name, labels), value in archived.totals.items():
        metric.add_sample(name, dict(labels), value)
    return metric


def method_label(method: str) -> str:
    return method if method in METHOD_LABELS else "OTHER"
