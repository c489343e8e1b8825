"""Command line: ``mobilepay-proxy [run|check-config|sandbox|demo] ...``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from proxy import __version__
from proxy.config import LOG_FORMATS, ConfigError, LogFormat, load_config
from proxy.logs import configure_logging

EXIT_CONFIG = 2
# "worker" is started by the proxy itself when [server] workers > 1 (see proxy.workers).
SUBCOMMANDS = ("run", "check-config", "sandbox", "demo", "worker")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in SUBCOMMANDS else "run"
    if command == "sandbox":
        from proxy.sandbox.cli import main as sandbox_main

        return sandbox_main(args)
    if command == "demo":
        from proxy.sandbox.demo import main as demo_main

        return demo_main(args)

    parser = argparse.ArgumentParser(
        prog=f"mobilepay-proxy {command}" if command != "run" else "mobilepay-proxy",
        description="Authenticating reverse proxy from PoS terminals to MobilePay PoS V10. "
        "Subcommands: run (default), check-config, sandbox, demo.",
    )
    parser.add_argument("--config", required=True, type=Path, help="path to the TOML file")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MOBILEPAY_PROXY_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="text or json lines (default: MOBILEPAY_PROXY_LOG_FORMAT, else [logging] format, "
        "else text)",
    )
    parser.add_argument("--version", action="version", version=__version__)
    if command == "worker":
        parser.add_argument("--worker-index", type=int, required=True, help=argparse.SUPPRESS)
        parser.add_argument("--port", type=int, required=True, help=argparse.SUPPRESS)
        parser.add_argument("--control-socket", type=Path, required=True, help=argparse.SUPPRESS)
    options = parser.parse_args(args)

    from proxy.app import validate

    try:
        config = load_config(options.config, os.environ)
        # The same checks for every command: a file check-config accepts starts.
        validate(config)
    except ConfigError as exc:
        sys.stderr.write(f"mobilepay-proxy: configuration error: {exc}\n")
        return EXIT_CONFIG

    if command == "check-config":
        sys.stdout.write(f"{options.config}: OK\n{config.summary()}\n")
        return 0

    # The flag wins over the environment, which wins over the file (see load_config).
    chosen: LogFormat = options.log_format or config.logging.format
    writer = configure_logging(
        options.log_level,
        chosen,
        worker=options.worker_index if command == "worker" else None,
        supervisor=command == "run" and config.server.workers > 1,
    )
    from proxy.server import WorkerSockets, serve

    try:
        if command == "worker":
            from proxy.workers import run_worker

            sockets = WorkerSockets(port=options.port, control=options.control_socket)
            run_loop(run_worker(config, sockets, environ=os.environ))
        elif config.server.workers > 1:
            from proxy.workers import supervise

            return supervise(
                config, log_level=options.log_level, log_format=chosen, environ=os.environ
            )
        else:
            run_loop(serve(config, environ=os.environ))
    except OSError as exc:
        logging.getLogger("proxy").error("cannot start: %s", exc.strerror or exc)
        return 1
    except ConfigError as exc:
        sys.stderr.write(f"mobilepay-proxy: configuration error: {exc}\n")
        return EXIT_CONFIG
    finally:
        # Every buffered line, access lines included, is out before the process exits.
        writer.close()
    return 0


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (it is markedly faster here), else on asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
