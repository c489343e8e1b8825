"""``mobilepay-proxy sandbox``: run the local MobilePay simulator."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from .server import serve
from .settings import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_IBM_CLIENT_ID,
    FaultSettings,
    SandboxSettings,
    TlsSettings,
)

logger = logging.getLogger(__name__)

# The proxy reads its credentials from these; a simulator started beside it
# with the same environment accepts exactly those credentials.
CREDENTIAL_ENVIRONMENT = {
    "client_id": ("MOBILEPAY_CLIENT_ID", DEFAULT_CLIENT_ID),
    "client_secret": ("MOBILEPAY_CLIENT_SECRET", DEFAULT_CLIENT_SECRET),
    "ibm_client_id": ("MOBILEPAY_IBM_CLIENT_ID", DEFAULT_IBM_CLIENT_ID),
}


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mobilepay-proxy sandbox",
        description=(
            "Local simulator of MobilePay's token service, PoS V10 API and sandbox user "
            "simulation, with an admin API under /_sandbox/."
        ),
    )
    listen = parser.add_argument_group("listening")
    listen.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    listen.add_argument("--port", type=int, default=8443, help="port (default %(default)s)")
    listen.add_argument(
        "--no-tls", action="store_true", help="serve plain HTTP (tests and debugging only)"
    )
    listen.add_argument(
        "--tls-dir",
        type=Path,
        default=Path(".sandbox"),
        help="where ca.pem and the server certificate live (default %(default)s)",
    )
    listen.add_argument(
        "--tls-hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="extra DNS name or IP for the server certificate; repeatable",
    )

    creds = parser.add_argument_group(
        "accepted credentials",
        "defaults come from MOBILEPAY_CLIENT_ID, MOBILEPAY_CLIENT_SECRET and "
        "MOBILEPAY_IBM_CLIENT_ID, else demo values",
    )
    for name, (variable, fallback) in CREDENTIAL_ENVIRONMENT.items():
        creds.add_argument(f"--{name.replace('_', '-')}", default=environ.get(variable, fallback))

    behaviour = parser.add_argument_group("behaviour")
    behaviour.add_argument(
        "--token-lifetime",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="exp - iat of issued tokens; expires_in says 100 more (default %(default)s)",
    )
    behaviour.add_argument(
        "--poll-delay-ms", type=int, default=1000, help="pollDelayInMs (default %(default)s)"
    )
    behaviour.add_argument(
        "--payment-expiry",
        type=int,
        default=300,
        metavar="SECONDS",
        help="how long a payment waits for the user (default %(default)s)",
    )

    faults = parser.add_argument_group("faults (also settable at runtime: POST /_sandbox/faults)")
    faults.add_argument(
        "--unauthorized-every", type=int, default=0, metavar="N", help="401 every N-th PoS call"
    )
    faults.add_argument(
        "--unauthorized-next", type=int, default=0, metavar="N", help="401 the next N PoS calls"
    )
    faults.add_argument(
        "--latency-ms", type=int, default=0, help="delay before answering MobilePay calls"
    )
    faults.add_argument(
        "--error-rate", type=float, default=0.0, help="share of PoS calls answered 500 (0..1)"
    )
    faults.add_argument(
        "--errors-next", type=int, default=0, metavar="N", help="500 the next N PoS calls"
    )
    faults.add_argument(
        "--token-errors-next",
        type=int,
        default=0,
        metavar="N",
        help="500 the next N token requests",
    )
    faults.add_argument("--seed", type=int, default=None, help="seed for --error-rate")

    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default %(default)s)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> SandboxSettings:
    """Raises ValueError when a value is out of range."""
    return SandboxSettings(
        host=args.host,
        port=args.port,
        tls=None if args.no_tls else TlsSettings(args.tls_dir, tuple(args.tls_hostname)),
        client_id=args.client_id,
        client_secret=args.client_secret,
        ibm_client_id=args.ibm_client_id,
        token_lifetime_seconds=args.token_lifetime,
        poll_delay_ms=args.poll_delay_ms,
        payment_expiry_seconds=args.payment_expiry,
        faults=FaultSettings(
            unauthorized_every=args.unauthorized_every,
            unauthorized_next=args.unauthorized_next,
            latency_ms=args.latency_ms,
            error_rate=args.error_rate,
            errors_next=args.errors_next,
            token_errors_next=args.token_errors_next,
        ),
        seed=args.seed,
    )


def main(argv: list[str]) -> int:
    parser = build_parser(os.environ)
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_run(settings))
    return 0


async def _run(settings: SandboxSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with serve(settings) as running:
        logger.info("MobilePay sandbox listening on %s", running.url)
        if running.tls is not None:
            logger.info("clients must trust the CA in %s", running.tls.ca_cert.resolve())
        logger.info(
            "accepting client id %r and x-ibm-client-id %r; tokens live %d s",
            settings.client_id,
            settings.ibm_client_id,
            settings.token_lifetime_seconds,
        )
        await stop.wait()
        logger.info("shutting down")
