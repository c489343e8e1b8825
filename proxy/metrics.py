"""Prometheus metrics, one registry per app so many apps can live in one process.

Metrics observe; they never steer. Label values come from bounded sets (route
templates, a fixed method list, status codes), never from raw request data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
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


class Metrics:
    """The proxy's metric families, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
            registry=registry,
        )
        self.token_store_up = Gauge(
            "mobilepay_proxy_token_store_up",
            "1 while the shared token store answers, 0 while it does not (1 for memory).",
            registry=registry,
        )
        self.token_store_errors = Counter(
            "mobilepay_proxy_token_store_errors",
            "Failed operations on the shared token store, by operation.",
            ["operation"],
            registry=registry,
        )
        self.merchants = Gauge(
            "mobilepay_proxy_merchants",
            "Merchant keys in the loaded routing map.",
            registry=registry,
        )
        for reason in ("initial", "expiring", "forced"):
            for result in ("success", "failure"):
                self.token_refreshes.labels(reason, result)
        self.token_store_up.set(1)
        for result in ("success", "unauthorized", "error"):
            self.upstream_401_retries.labels(result)
        # Set once tokens exist; read at scrape time, so the hot path pays nothing for it.
        self.token_lifetimes: Callable[[], Iterable[tuple[str, float]]] = lambda: ()
        registry.register(_TokenExpiryCollector(self))
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
            "mobilepay_proxy_token_expiry_seconds",
            "Remaining usable life of the token held for each merchant VAT.",
            labels=["merchant_vat"],
        )
        for vat, seconds in self._metrics.token_lifetimes():
            family.add_metric([vat], seconds)
        yield family


def method_label(method: str) -> str:
    return method if method in METHOD_LABELS else "OTHER"
