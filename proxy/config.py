"""Configuration: parsed once, at the edge, into frozen typed objects.

Everything that can be wrong with a configuration file is reported as one
:class:`ConfigError` naming the key and the problem; nothing here logs, and no
secret value ever appears in a message or a ``repr``.
"""

from __future__ import annotations

import csv
import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from yarl import URL

VAT_PATTERN = re.compile(r"(DK|FI)\d{8}")
ROUTING_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
HEADER_NAME_PATTERN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
ENVIRONMENTS: Mapping[str, tuple[str, str]] = {
    "sandbox": (
        "https://api.sandbox.mobilepay.dk",
        "https://api.sandbox.mobilepay.dk/integrator-authentication/connect/token",
    ),
    "production": (
        "https://api.mobilepay.dk",
        "https://api.mobilepay.dk/integrator-authentication/connect/token",
    ),
}
ENV_CLIENT_ID = "MOBILEPAY_CLIENT_ID"
ENV_CLIENT_SECRET = "MOBILEPAY_CLIENT_SECRET"
ENV_IBM_CLIENT_ID = "MOBILEPAY_IBM_CLIENT_ID"
ENV_REDIS_PASSWORD = "MOBILEPAY_PROXY_REDIS_PASSWORD"
# How much longer than a token fetch (and its Redis calls) the refresh lock must live.
LOCK_MARGIN_SECONDS = 0.5
ENV_LOG_FORMAT = "MOBILEPAY_PROXY_LOG_FORMAT"
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
# Headers only the proxy may set; a routing header with one of these names
# would let a terminal pick a merchant by forging a credential header.
_RESERVED_ROUTING_HEADERS = frozenset(
    {
        "authorization",
        "x-ibm-client-id",
        "x-mobilepay-merchant-vat-number",
        "host",
        "connection",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "content-length",
        "transfer-encoding",
        "x-mobilepay-idempotency-key",
        "x-mobilepay-client-system-version",
    }
)


class ConfigError(Exception):
    """The configuration cannot be used; the message says which key and why."""


@dataclass(frozen=True, slots=True)
class Merchant:
    key: str
    vat: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    # /readyz lists every merchant VAT and token fingerprint: loopback unless told otherwise.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9180
    drain_timeout_seconds: float = 30.0
    max_body_bytes: int = 1024 * 1024
    body_timeout_seconds: float = 10.0
    header_timeout_seconds: float = 10.0
    keepalive_timeout_seconds: float = 75.0
    max_line_size: int = 8190
    max_field_size: int = 8190
    max_headers: int = 100
    send_timeout_seconds: float = 10.0
    max_connections: int = 1024
    workers: int = 1


@dataclass(frozen=True, slots=True)
class MobilePayConfig:
    environment: str
    api_base_url: URL
    token_url: URL
    ca_file: Path | None
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)
    ibm_client_id: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The deadlines and the pool towards MobilePay, one per phase as nginx has them."""

    connect_timeout_seconds: float = 3.0  # TCP connect and TLS handshake
    send_timeout_seconds: float = 10.0  # the whole request written
    timeout_seconds: float = 15.0  # from the request written to the whole response read
    pool_timeout_seconds: float = 5.0  # waiting for one of max_connections to be free
    # The whole request: token wait, pool wait, every attempt and the 401 replay.
    request_deadline_seconds: float = 30.0
    max_connections: int = 100
    keepalive_timeout_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class TokenConfig:
    refresh_ahead_seconds: float = 300.0
    expiry_margin_seconds: float = 30.0
    timeout_seconds: float = 10.0
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 60.0
    unready_after_seconds: float = 120.0
    unauthorized_cooldown_seconds: float = 60.0
    store: RedisStoreConfig | None = None


@dataclass(frozen=True, slots=True)
class RedisStoreConfig:
    """A token store shared by every copy of the proxy."""

    url: str = field(repr=False)  # may carry a password
    password: str | None = field(repr=False, default=None)
    prefix: str = "mobilepay-proxy"
    lock_seconds: float = 15.0
    timeout_seconds: float = 0.5


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    header: str
    allowed_prefixes: tuple[str, ...]
    merchants: Mapping[str, Merchant]


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: LogFormat = "text"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    mobilepay: MobilePayConfig
    upstream: UpstreamConfig
    tokens: TokenConfig
    routing: RoutingConfig
    source: Path | None = None
    logging: LoggingConfig = LoggingConfig()

    def summary(self) -> str:
        """A human summary without any secret, for ``check-config``."""
        merchants = self.routing.merchants
        restricted = sum(1 for merchant in merchants.values() if merchant.networks)
        lines = [
            f"listen:           {self.server.host}:{self.server.port}, "
            f"{self.server.workers} worker(s)",
            f"metrics:          {self.server.metrics_host}:{self.server.metrics_port}",
            f"environment:      {self.mobilepay.environment}",
            f"api base url:     {self.mobilepay.api_base_url}",
            f"token url:        {self.mobilepay.token_url}",
            f"extra CA file:    {self.mobilepay.ca_file or '-'}",
            "credentials:      client id, client secret and x-ibm-client-id set",
            f"token store:      {_store_summary(self.tokens.store)}",
            f"routing header:   {self.routing.header}",
            f"allowed prefixes: {', '.join(self.routing.allowed_prefixes)}",
            f"merchants:        {len(merchants)} keys, "
            f"{len(set(m.vat for m in merchants.values()))} VATs, "
            f"{restricted} restricted to source networks",
            f"log format:       {self.logging.format}",
        ]
        return "\n".join(lines)


def _store_summary(store: RedisStoreConfig | None) -> str:
    if store is None:
        return "memory"
    url = URL(store.url)
    return f"{url.scheme}://{url.host}:{url.port}{url.path} (prefix {store.prefix})"


class _Table:
    """One TOML table, read key by key so unknown keys can be reported."""

    def __init__(self, name: str, data: object) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self._data: dict[str, Any] = data
        self._seen: set[str] = set()

    def _where(self, key: str) -> str:
        return f"[{self.name}] {key}"

    def names(self) -> list[str]:
        return list(self._data)

    def raw(self, key: str) -> Any:
        self._seen.add(key)
        return self._data.get(key)

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self._where(key)} must be a non-empty string")
        return value.strip()

    def number(
        self, key: str, default: float, *, minimum: float = 0.0, maximum: float = 86400.0
    ) -> float:
        """A finite number from ``minimum`` to ``maximum`` (TOML also allows nan and inf)."""
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self._where(key)} must be a number, not {value!r}")
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise ConfigError(
                f"{self._where(key)} must be a number from {minimum:g} to {maximum:g}, not {value}"
            )
        return float(value)

    def integer(
        self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._where(key)} must be a whole number, not {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{self._where(key)} must be {bounds}, not {value}")
        return value

    def table(self, key: str) -> _Table:
        value = self.raw(key)
        return _Table(f"{self.name}.{key}" if self.name else key, {} if value is None else value)

    def finish(self) -> None:
        unknown = sorted(set(self._data) - self._seen)
        if unknown:
            where = f"[{self.name}]" if self.name else "the top level"
            raise ConfigError(f"unknown key {unknown[0]!r} in {where}")


def load_config(path: Path, environ: Mapping[str, str]) -> Config:
    """Read, validate and resolve a configuration file; raise ConfigError if unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.parent, environ=environ, source=path)


def parse_config(
    data: Mapping[str, Any],
    *,
    base_dir: Path,
    environ: Mapping[str, str],
    source: Path | None = None,
) -> Config:
    root = _Table("", dict(data))
    server = _parse_server(root.table("server"))
    mobilepay = _parse_mobilepay(root.table("mobilepay"), base_dir, environ)
    upstream = _parse_upstream(root.table("upstream"))
    tokens = _parse_tokens(root.table("tokens"), base_dir, environ)
    routing = _parse_routing(root.table("routing"), base_dir)
    logging = _parse_logging(root.table("logging"), environ)
    root.finish()
    if server.port == server.metrics_port and server.port != 0:
        raise ConfigError("[server] port and metrics_port must differ")
    return Config(server, mobilepay, upstream, tokens, routing, source, logging)


def _parse_logging(table: _Table, environ: Mapping[str, str]) -> LoggingConfig:
    """``[logging] format``; the environment wins over the file, as for credentials."""
    in_file = table.string("format", "text")
    table.finish()
    value = environ.get(ENV_LOG_FORMAT) or in_file
    where = ENV_LOG_FORMAT if environ.get(ENV_LOG_FORMAT) else "[logging] format"
    return LoggingConfig(format=log_format(value, where))


def log_format(value: str | None, where: str) -> LogFormat:
    """``value`` as a log format; ConfigError naming ``where`` if it is none of them."""
    for known in LOG_FORMATS:
        if value == known:
            return known
    raise ConfigError(f"{where} must be one of {', '.join(LOG_FORMATS)}, not {value!r}")


def _port(table: _Table, key: str, default: int) -> int:
    return table.integer(key, default, minimum=0, maximum=65535)


def _parse_server(table: _Table) -> ServerConfig:
    defaults = ServerConfig()
    config = ServerConfig(
        host=table.string("host", defaults.host) or defaults.host,
        port=_port(table, "port", defaults.port),
        metrics_host=table.string("metrics_host", defaults.metrics_host) or defaults.metrics_host,
        metrics_port=_port(table, "metrics_port", defaults.metrics_port),
        drain_timeout_seconds=table.number(
            "drain_timeout_seconds", defaults.drain_timeout_seconds, maximum=3600
        ),
        max_body_bytes=table.integer(
            "max_body_bytes", defaults.max_body_bytes, minimum=0, maximum=64 * 1024 * 1024
        ),
        body_timeout_seconds=table.number(
            "body_timeout_seconds", defaults.body_timeout_seconds, minimum=0.01, maximum=3600
        ),
        header_timeout_seconds=table.number(
            "header_timeout_seconds", defaults.header_timeout_seconds, minimum=0.01, maximum=3600
        ),
        keepalive_timeout_seconds=table.number(
            "keepalive_timeout_seconds", defaults.keepalive_timeout_seconds, maximum=3600
        ),
        max_line_size=table.integer(
            "max_line_size", defaults.max_line_size, minimum=256, maximum=65536
        ),
        max_field_size=table.integer(
            "max_field_size", defaults.max_field_size, minimum=256, maximum=65536
        ),
        max_headers=table.integer("max_headers", defaults.max_headers, minimum=8, maximum=1000),
        send_timeout_seconds=table.number(
            "send_timeout_seconds", defaults.send_timeout_seconds, minimum=0.01, maximum=3600
        ),
        max_connections=table.integer(
            "max_connections", defaults.max_connections, minimum=1, maximum=100000
        ),
        workers=table.integer("workers", defaults.workers, minimum=1, maximum=64),
    )
    table.finish()
    return config


def _https_url(table: _Table, key: str, default: str) -> URL:
    text = table.string(key, default) or default
    url = _url(text, f"[mobilepay] {key}")
    if url.scheme != "https" or not url.host:
        raise ConfigError(f"[mobilepay] {key} must be an https:// URL, not {text!r}")
    if url.query_string or url.fragment or url.user or url.password:
        raise ConfigError(f"[mobilepay] {key} must not carry credentials, a query or a fragment")
    return url


def _url(text: str, where: str) -> URL:
    """``text`` as a URL; never echoed in the error, since it may carry a password."""
    try:
        url = URL(text)
        url.port  # noqa: B018 - yarl checks the port when it is read
    except ValueError:
        raise ConfigError(f"{where} is not a valid URL: check its host and port") from None
    return url


def _secret(
    table: _Table, key: str, env_name: str, environ: Mapping[str, str], base_dir: Path
) -> str:
    """A credential from the environment, a ``<key>_file`` or the file itself, in that order."""
    inline = table.string(key)
    file_name = table.string(f"{key}_file")
    from_env = environ.get(env_name, "").strip()
    if from_env:
        return from_env
    if file_name is not None:
        secret_path = _resolve(base_dir, file_name)
        try:
            value = secret_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"[mobilepay] {key}_file: cannot read {secret_path}: {_unreadable(exc)}"
            ) from None
        if not value:
            raise ConfigError(f"[mobilepay] {key}_file: {secret_path} is empty")
        return value
    if inline is not None:
        return inline
    raise ConfigError(f"[mobilepay] {key} is missing: set {key}, {key}_file or ${env_name}")


def _resolve(base_dir: Path, name: str) -> Path:
    path = Path(name).expanduser()
    return path if path.is_absolute() else base_dir / path


def _parse_mobilepay(table: _Table, base_dir: Path, environ: Mapping[str, str]) -> MobilePayConfig:
    environment = table.string("environment", "sandbox") or "sandbox"
    if environment not in ENVIRONMENTS:
        raise ConfigError(
            f"[mobilepay] environment must be one of {', '.join(ENVIRONMENTS)}, not {environment!r}"
        )
    default_api, default_token = ENVIRONMENTS[environment]
    api_base_url = _https_url(table, "api_base_url", default_api)
    if api_base_url.path not in ("", "/"):
        raise ConfigError("[mobilepay] api_base_url must be a bare origin such as https://host")
    ca_name = table.string("ca_file")
    ca_file = _resolve(base_dir, ca_name) if ca_name else None
    if ca_file is not None and ca_file.is_dir():
        raise ConfigError(f"[mobilepay] ca_file: {ca_file} is a directory, not a PEM file")
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(f"[mobilepay] ca_file: {ca_file} does not exist")
    config = MobilePayConfig(
        environment=environment,
        api_base_url=api_base_url.with_path(""),
        token_url=_https_url(table, "token_url", default_token),
        ca_file=ca_file,
        client_id=_secret(table, "client_id", ENV_CLIENT_ID, environ, base_dir),
        client_secret=_secret(table, "client_secret", ENV_CLIENT_SECRET, environ, base_dir),
        ibm_client_id=_secret(table, "ibm_client_id", ENV_IBM_CLIENT_ID, environ, base_dir),
    )
    table.finish()
    return config


def _parse_upstream(table: _Table) -> UpstreamConfig:
    defaults = UpstreamConfig()
    config = UpstreamConfig(
        connect_timeout_seconds=table.number(
            "connect_timeout_seconds", defaults.connect_timeout_seconds, minimum=0.01, maximum=600
        ),
        timeout_seconds=table.number(
            "timeout_seconds", defaults.timeout_seconds, minimum=0.01, maximum=600
        ),
        max_connections=table.integer(
            "max_connections", defaults.max_connections, minimum=1, maximum=10000
        ),
        send_timeout_seconds=table.number(
            "send_timeout_seconds", defaults.send_timeout_seconds, minimum=0.01, maximum=600
        ),
        pool_timeout_seconds=table.number(
            "pool_timeout_seconds", defaults.pool_timeout_seconds, minimum=0.01, maximum=600
        ),
        request_deadline_seconds=table.number(
            "request_deadline_seconds",
            defaults.request_deadline_seconds,
            minimum=0.01,
            maximum=3600,
        ),
        keepalive_timeout_seconds=table.number(
            "keepalive_timeout_seconds", defaults.keepalive_timeout_seconds, maximum=3600
        ),
    )
    table.finish()
    # A phase deadline longer than the whole request's could never expire: say so.
    for key in (
        "connect_timeout_seconds",
        "send_timeout_seconds",
        "timeout_seconds",
        "pool_timeout_seconds",
    ):
        if getattr(config, key) > config.request_deadline_seconds:
            raise ConfigError(
                f"[upstream] {key} must not exceed request_deadline_seconds "
                f"({config.request_deadline_seconds:g})"
            )
    return config


def _parse_tokens(table: _Table, base_dir: Path, environ: Mapping[str, str]) -> TokenConfig:
    defaults = TokenConfig()
    store = _parse_store(table, base_dir, environ)
    config = TokenConfig(
        refresh_ahead_seconds=table.number("refresh_ahead_seconds", defaults.refresh_ahead_seconds),
        expiry_margin_seconds=table.number("expiry_margin_seconds", defaults.expiry_margin_seconds),
        timeout_seconds=table.number(
            "timeout_seconds", defaults.timeout_seconds, minimum=0.01, maximum=600
        ),
        backoff_initial_seconds=table.number(
            "backoff_initial_seconds", defaults.backoff_initial_seconds, minimum=0.01, maximum=3600
        ),
        backoff_max_seconds=table.number(
            "backoff_max_seconds", defaults.backoff_max_seconds, minimum=0.01, maximum=3600
        ),
        unready_after_seconds=table.number("unready_after_seconds", defaults.unready_after_seconds),
        unauthorized_cooldown_seconds=table.number(
            "unauthorized_cooldown_seconds", defaults.unauthorized_cooldown_seconds, maximum=3600
        ),
        store=store,
    )
    table.finish()
    if config.backoff_max_seconds < config.backoff_initial_seconds:
        raise ConfigError("[tokens] backoff_max_seconds must not be below backoff_initial_seconds")
    if store is not None:
        # The lock holder loads, counts a generation, fetches and saves: the lock must
        # outlive all of it, or another copy fetches too and the older token may win.
        needed = config.timeout_seconds + 3 * store.timeout_seconds + LOCK_MARGIN_SECONDS
        if store.lock_seconds <= needed:
            raise ConfigError(
                f"[tokens] redis_lock_seconds ({store.lock_seconds:g}) must exceed "
                f"timeout_seconds + 3 x redis_timeout_seconds + {LOCK_MARGIN_SECONDS:g} s "
                f"({needed:g}), so the refresh lock outlives a token fetch"
            )
    return config


def _parse_store(
    table: _Table, base_dir: Path, environ: Mapping[str, str]
) -> RedisStoreConfig | None:
    store = table.string("store", "memory") or "memory"
    password_file = table.string("redis_password_file")
    prefix = table.string("redis_prefix", "mobilepay-proxy") or "mobilepay-proxy"
    defaults = RedisStoreConfig(url="")
    lock_seconds = table.number(
        "redis_lock_seconds", defaults.lock_seconds, minimum=0.1, maximum=3600
    )
    timeout_seconds = table.number(
        "redis_timeout_seconds", defaults.timeout_seconds, minimum=0.01, maximum=60
    )
    if store == "memory":
        return None
    url = _url(store, "[tokens] store")
    if url.scheme not in ("redis", "rediss") or not url.host:
        raise ConfigError(
            '[tokens] store must be "memory" or a redis:// or rediss:// URL such as '
            '"redis://127.0.0.1:6379/0"'
        )
    if not re.fullmatch(r"/?\d*", url.path):
        # The Redis client would silently use database 0 instead.
        raise ConfigError(
            '[tokens] store: the database must be a number, as in "redis://127.0.0.1:6379/0"'
        )
    password = environ.get(ENV_REDIS_PASSWORD, "").strip() or None
    if password is None and password_file is not None:
        path = _resolve(base_dir, password_file)
        try:
            password = path.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"[tokens] redis_password_file: cannot read {path}: {_unreadable(exc)}"
            ) from None
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", prefix):
        raise ConfigError("[tokens] redis_prefix must be 1-64 letters, digits, '.', '_', ':', '-'")
    return RedisStoreConfig(
        url=store,
        password=password,
        prefix=prefix,
        lock_seconds=lock_seconds,
        timeout_seconds=timeout_seconds,
    )


def _parse_routing(table: _Table, base_dir: Path) -> RoutingConfig:
    header = table.string("header", "X-Merchant-Id") or "X-Merchant-Id"
    if not HEADER_NAME_PATTERN.fullmatch(header):
        raise ConfigError(f"[routing] header {header!r} is not a valid header name")
    if header.lower() in _RESERVED_ROUTING_HEADERS:
        raise ConfigError(f"[routing] header {header!r} is reserved; choose another name")
    prefixes = _parse_prefixes(table.raw("allowed_prefixes"))
    merchants: dict[str, Merchant] = {}
    inline = table.table("merchants")
    for key in inline.names():
        merchants[key] = _parse_merchant_entry(key, inline.raw(key))
    file_name = table.string("merchants_file")
    if file_name is not None:
        for merchant in _read_merchants_csv(_resolve(base_dir, file_name)):
            if merchant.key in merchants:
                raise ConfigError(f"merchant key {merchant.key!r} is defined twice")
            merchants[merchant.key] = merchant
    table.finish()
    if not merchants:
        raise ConfigError("[routing] no merchants: add [routing.merchants] or merchants_file")
    return RoutingConfig(header=header, allowed_prefixes=prefixes, merchants=merchants)


def _parse_prefixes(value: object) -> tuple[str, ...]:
    if value is None:
        return ("/pos/v10/",)
    if not isinstance(value, list) or not value:
        raise ConfigError("[routing] allowed_prefixes must be a non-empty list of paths")
    prefixes = []
    for prefix in value:
        if (
            not isinstance(prefix, str)
            or not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+/", prefix)
            or "/../" in prefix
            or "/./" in prefix
        ):
            raise ConfigError(
                f'[routing] allowed_prefixes: {prefix!r} must look like "/pos/v10/" '
                "(plain segments, leading and trailing slash)"
            )
        prefixes.append(prefix)
    return tuple(prefixes)


def _parse_merchant_entry(key: str, value: object) -> Merchant:
    where = f"[routing.merchants] {key!r}"
    networks: object = None
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"vat", "networks"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
        vat, networks = value.get("vat"), value.get("networks")
    else:
        vat = value
    if networks is not None and not (
        isinstance(networks, list) and all(isinstance(n, str) for n in networks)
    ):
        raise ConfigError(f"{where}: networks must be a list of CIDR strings")
    return _merchant(where, key, vat, networks or [])


def _merchant(where: str, key: str, vat: object, networks: list[str]) -> Merchant:
    if not ROUTING_KEY_PATTERN.fullmatch(key):
        raise ConfigError(
            f"{where}: the key must be 1-64 letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit"
        )
    if not isinstance(vat, str) or not VAT_PATTERN.fullmatch(vat):
        raise ConfigError(f"{where}: VAT {vat!r} must look like DK12345678 or FI12345678")
    parsed = []
    for network in networks:
        try:
            parsed.append(ipaddress.ip_network(network.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"{where}: {network!r} is not a network such as 10.1.2.0/24"
            ) from None
    return Merchant(key=key, vat=vat, networks=tuple(parsed))


def _unreadable(exc: OSError | UnicodeDecodeError) -> str:
    """Why a file could not be read, never quoting what is in it (it may hold a secret)."""
    if isinstance(exc, UnicodeDecodeError):
        return "not UTF-8 text"
    return exc.strerror or type(exc).__name__


def _read_merchants_csv(path: Path) -> list[Merchant]:
    """Read ``key,vat[,networks]`` rows; ``networks`` holds space-separated CIDRs."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"[routing] merchants_file: cannot read {path}: {_unreadable(exc)}"
        ) from None
    if not rows or [cell.strip().lower() for cell in rows[0][:2]] != ["key", "vat"]:
        raise ConfigError(f"{path}: the first line must be the header key,vat[,networks]")
    has_networks = len(rows[0]) > 2 and rows[0][2].strip().lower() == "networks"
    merchants: list[Merchant] = []
    seen: set[str] = set()
    for line_number, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row) or row[0].startswith("#"):
            continue
        where = f"{path}:{line_number}"
        if len(row) < 2 or len(row) > (3 if has_networks else 2):
            raise ConfigError(f"{where}: expected key,vat{',networks' if has_networks else ''}")
        key = row[0].strip()
        if key in seen:
            raise ConfigError(f"{where}: merchant key {key!r} is defined twice")
        seen.add(key)
        networks = row[2].split() if has_networks and len(row) > 2 else []
        merchants.append(_merchant(where, key, row[1].strip(), networks))
    return merchants
