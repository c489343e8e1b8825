"""The setup on loopback: an nginx upstream over TLS and the three proxies in front of it.

The upstream stands in for MobilePay: ``GET /pos/v10/payments/{id}`` answers a fixed
PoS V10 payment, and the token endpoint a fixed JWT-shaped token whose requests are
written to their own access log, so they can be counted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.services import CpuLayout, Service, free_port, start, wait_until_ok
from proxy.sandbox.tls import TlsFiles, ensure_tls_files

MERCHANT_HEADER = "X-Merchant-Id"
PAYMENT_ID = "3974eae6-e36f-4148-b5ee-22689e528c75"
PAYMENT_PATH = f"/pos/v10/payments/{PAYMENT_ID}"
TOKEN_PATH = "/integrator-authentication/connect/token"
CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-secret"  # nothing checks it: the upstream answers every token request
IBM_CLIENT_ID = "bench-ibm-client"
STATIC_TOKEN = "bench-static-token"  # what nginx and the naive passthrough inject
TOKEN_LIFETIME_SECONDS = 3600
PROJECT_ROOT = Path(__file__).resolve().parent.parent  # where `-m benchmarks.naive` resolves

# Display names, in table order.
PROXIES = {"nginx": "nginx", "naive": "naive aiohttp", "proxy": "mobilepay-proxy"}


def payment_body() -> str:
    """A PoS V10 ``GET /payments/{paymentid}`` answer, as in MobilePay's own example."""
    return json.dumps(
        {
            "paymentId": PAYMENT_ID,
            "posId": "c85916b1-8e17-4275-a388-551e16aa6293",
            "orderId": "ORDER-12345",
            "amount": 12.5,
            "currencyCode": "DKK",
            "restrictions": {"debitCardDisallowed": False, "creditCardDisallowed": False},
            "merchantPaymentLabel": "PaymentLabel",
            "plannedCaptureDelay": "None",
            "status": "Reserved",
            "customerToken": "09bee223516e44000811ab0988b802b72a193c22",
            "customerReceiptToken": "d0d0f8dc0adc4cec9398d82c93dad0d1",
            "loyaltyIds": ["123456"],
            "paymentExpiresAt": "2022-10-17T06:07:45.4847176+00:00",
            "partialCapturePossible": False,
            "pollDelayInMs": 1000,
        },
        separators=(",", ":"),
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token_body(now: float) -> str:
    """A token answer as MobilePay gives it: ``expires_in`` a little above the JWT's own life."""
    issued = int(now)
    header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    claims = {
        "iss": "https://api.sandbox.mobilepay.dk/integrator-authentication",
        "aud": "integrator_scope",
        "client_id": CLIENT_ID,
        "iat": issued,
        "nbf": issued,
        "exp": issued + TOKEN_LIFETIME_SECONDS,
    }
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signature = _b64url(os.urandom(256))  # never verified by the proxy; the shape matters
    return json.dumps(
        {
            "access_token": f"{header}.{payload}.{signature}",
            "expires_in": TOKEN_LIFETIME_SECONDS + 100,
            "token_type": "Bearer",
            "scope": "integrator_scope",
        },
        separators=(",", ":"),
    )


def merchants(prefix: str, count: int, country: str = "DK") -> list[tuple[str, str]]:
    """``count`` routing keys, each with its own VAT."""
    return [(f"{prefix}-{n:05d}", f"{country}{10_000_000 + n}") for n in range(count)]


def _nginx_quoted(text: str) -> str:
    # The bodies are JSON without quotes of this kind, backslashes or nginx variables.
    if any(character in text for character in "'\\$"):
        raise ValueError("text cannot be embedded in an nginx single-quoted string")
    return f"'{text}'"


def _nginx_main(prefix: Path) -> str:
    """The top of an nginx configuration that needs no root-owned path."""
    # As root the master drops its workers to nginx's default user; they only use
    # descriptors the master opened, but must be able to enter the prefix.
    prefix.chmod(0o755)
    return f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 8192;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
"""


def _nginx_temp_paths(prefix: Path) -> str:
    return "\n".join(
        f"    {kind}_temp_path {prefix}/{kind}-temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def upstream_conf(prefix: Path, port: int, tls: TlsFiles, token_log: Path) -> str:
    return f"""{_nginx_main(prefix)}
http {{
    access_log off;
{_nginx_temp_paths(prefix)}
    # Connections from the proxies stay open for the whole run, as a pool to MobilePay would.
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {tls.server_cert};
        ssl_certificate_key {tls.server_key};
        ssl_session_cache shared:tls:1m;
        location /pos/v10/payments/ {{
            default_type application/json;
            return 200 {_nginx_quoted(payment_body())};
        }}
        location = {TOKEN_PATH} {{
            access_log {token_log};
            default_type application/json;
            return 200 {_nginx_quoted(token_body(time.time()))};
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""


def nginx_proxy_conf(prefix: Path, port: int, upstream_port: int, tls: TlsFiles) -> str:
    return f"""{_nginx_main(prefix)}
http {{
    access_log off;
{_nginx_temp_paths(prefix)}
    keepalive_timeout 75s;
    upstream mobilepay {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://mobilepay;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {STATIC_TOKEN}";
            proxy_set_header x-ibm-client-id "{IBM_CLIENT_ID}";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {tls.ca_cert};
            # The certificate names localhost and 127.0.0.1; nginx checks a host name.
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"""


def mobilepay_proxy_conf(
    directory: Path,
    *,
    port: int,
    metrics_port: int,
    upstream_port: int,
    ca_file: Path,
    merchant_rows: Sequence[tuple[str, str]],
) -> Path:
    """A configuration file with its merchants in a ``key,vat`` CSV beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = directory / "merchants.csv"
    csv_path.write_text("key,vat\n" + "".join(f"{key},{vat}\n" for key, vat in merchant_rows))
    config = directory / "proxy.toml"
    base = f"https://127.0.0.1:{upstream_port}"
    config.write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
metrics_host = "127.0.0.1"
metrics_port = {metrics_port}
workers = 1

[mobilepay]
api_base_url = "{base}"
token_url = "{base}{TOKEN_PATH}"
ca_file = "{ca_file}"
client_id = "{CLIENT_ID}"
client_secret = "{CLIENT_SECRET}"
ibm_client_id = "{IBM_CLIENT_ID}"

[routing]
header = "{MERCHANT_HEADER}"
merchants_file = "{csv_path.name}"
"""
    )
    return config


_MAIN = "import sys; from proxy.cli import main; sys.exit(main())"


def _proxy_command() -> list[str]:
    script = Path(sys.executable).with_name("mobilepay-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


@dataclass(frozen=True, slots=True)
class MobilePayProxy:
    service: Service
    port: int
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def start_mobilepay_proxy(
    directory: Path,
    *,
    upstream_port: int,
    ca_file: Path,
    merchant_rows: Sequence[tuple[str, str]],
    cpus: Sequence[int],
    log_level: str = "WARNING",
    tree: Path | None = None,
) -> MobilePayProxy:
    """Start ``mobilepay-proxy`` and wait for /healthz; no request goes through it yet.

    At the default WARNING it writes no access lines, as nginx with ``access_log off``.
    With ``tree``, the ``proxy/`` package in that directory runs instead of the installed
    one (with the installed dependencies): another revision, for ``benchmarks.versus``.
    """
    port, metrics_port = free_port(), free_port()
    config = mobilepay_proxy_conf(
        directory,
        port=port,
        metrics_port=metrics_port,
        upstream_port=upstream_port,
        ca_file=ca_file,
        merchant_rows=merchant_rows,
    )
    # ``-c`` puts the working directory, the other tree, first on sys.path.
    command = _proxy_command() if tree is None else [sys.executable, "-c", _MAIN]
    argv = [*command, "--config", str(config), "--log-level", log_level]
    service = start("mobilepay-proxy", argv, log=directory / "proxy.log", cpus=cpus, cwd=tree)
    try:
        wait_until_ok(service, f"http://127.0.0.1:{metrics_port}/healthz")
    except BaseException:
        service.stop()
        raise
    return MobilePayProxy(service, port, metrics_port)


@dataclass(frozen=True, slots=True)
class Stack:
    """Everything that runs for the whole benchmark."""

    directory: Path
    layout: CpuLayout
    tls: TlsFiles
    upstream: Service
    upstream_port: int
    token_log: Path
    proxies: dict[str, Service]
    ports: dict[str, int]
    merchant_key: str  # what wrk and hey send in X-Merchant-Id
    proxy_metrics_url: str

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{PAYMENT_PATH}"

    def token_requests(self) -> int:
        """Token requests the upstream has answered so far."""
        try:
            return len(self.token_log.read_bytes().splitlines())
        except FileNotFoundError:
            return 0


@contextlib.contextmanager
def running_stack(
    directory: Path, layout: CpuLayout, merchant_rows: Sequence[tuple[str, str]]
) -> Iterator[Stack]:
    """Start the upstream and the three proxies; stop them all on the way out."""
    tls = ensure_tls_files(directory / "tls")
    upstream_port = free_port()
    token_log = directory / "upstream" / "tokens.log"
    with contextlib.ExitStack() as stack:
        upstream = _start_nginx(
            "upstream nginx",
            directory / "upstream",
            lambda prefix: upstream_conf(prefix, upstream_port, tls, token_log),
            layout.upstream,
        )
        stack.callback(upstream.stop)
        wait_until_ok(
            upstream,
            f"https://127.0.0.1:{upstream_port}{PAYMENT_PATH}",
            context=ssl.create_default_context(cafile=str(tls.ca_cert)),
        )

        nginx_port = free_port()
        nginx = _start_nginx(
            "nginx proxy",
            directory / "nginx-proxy",
            lambda prefix: nginx_proxy_conf(prefix, nginx_port, upstream_port, tls),
            layout.proxy,
        )
        stack.callback(nginx.stop)

        naive_port = free_port()
        naive = start(
            "naive aiohttp",
            [
                sys.executable,
                "-m",
                "benchmarks.naive",
                "--port",
                str(naive_port),
                "--upstream",
                f"https://127.0.0.1:{upstream_port}",
                "--ca-file",
                str(tls.ca_cert),
                "--token",
                STATIC_TOKEN,
                "--ibm-client-id",
                IBM_CLIENT_ID,
            ],
            log=directory / "naive.log",
            cpus=layout.proxy,
            cwd=PROJECT_ROOT,
        )
        stack.callback(naive.stop)

        ours = start_mobilepay_proxy(
            directory / "mobilepay-proxy",
            upstream_port=upstream_port,
            ca_file=tls.ca_cert,
            merchant_rows=merchant_rows,
            cpus=layout.proxy,
        )
        stack.callback(ours.service.stop)

        key = merchant_rows[0][0]
        result = Stack(
            directory=directory,
            layout=layout,
            tls=tls,
            upstream=upstream,
            upstream_port=upstream_port,
            token_log=token_log,
            proxies={"nginx": nginx, "naive": naive, "proxy": ours.service},
            ports={"nginx": nginx_port, "naive": naive_port, "proxy": ours.port},
            merchant_key=key,
            proxy_metrics_url=ours.metrics_url,
        )
        for name, service in result.proxies.items():
            wait_until_ok(service, result.url(name), headers={MERCHANT_HEADER: key})
        yield result


def _start_nginx(
    name: str, prefix: Path, render: Callable[[Path], str], cpus: Sequence[int]
) -> Service:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render(prefix))
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    return start(name, argv, log=prefix / "stderr.log", cpus=cpus)
