"""Command line: ``mobilepay-proxy [run|check-config|sandbox|demo] ...``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from proxy import __version__
from proxy.config import ConfigError, load_config

EXIT_CONFIG = 2
SUBCOMMANDS = ("run", "check-config", "sandbox", "demo")


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
    parser.add_argument("--version", action="version", version=__version__)
    options = parser.parse_args(args)

    try:
        config = load_config(options.config, os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"mobilepay-proxy: configuration error: {exc}\n")
        return EXIT_CONFIG

    if command == "check-config":
        sys.stdout.write(f"{options.config}: OK\n{config.summary()}\n")
        return 0

    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from proxy.server import serve

    try:
        asyncio.run(serve(config, environ=os.environ))
    except OSError as exc:
        logging.getLogger("proxy").error("cannot start: %s", exc.strerror or exc)
        return 1
    return 0
