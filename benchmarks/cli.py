"""``python -m benchmarks [--quick] [--no-drift] [--no-pin]``: measure, print, write."""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from benchmarks import chart, load, prerequisites, report, scenarios
from benchmarks.scenarios import Settings
from benchmarks.services import CpuLayout, StartupError
from benchmarks.stack import MERCHANT_HEADER, merchants, running_stack

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "out" / "results.json"
RESULTS_MD = HERE / "RESULTS.md"
CHART = HERE / "latency.png"
EXIT_MISSING = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="mobilepay-proxy against nginx and a naive aiohttp passthrough, on loopback.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="one round of 5 s runs and no drift run"
    )
    parser.add_argument(
        "--drift",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the 60 s RSS drift run (default: on, off with --quick)",
    )
    parser.add_argument("--no-pin", action="store_true", help="let every process run on every CPU")
    options = parser.parse_args(argv)
    drift = options.drift if options.drift is not None else not options.quick
    settings = Settings(
        rounds=1 if options.quick else 3,
        seconds=5.0 if options.quick else 10.0,
        warm_up_seconds=1.0,
        drift_seconds=60.0 if drift else None,
    )

    try:
        prerequisites.ensure_tools()
        prerequisites.ensure_modules()
    except prerequisites.Missing as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return EXIT_MISSING

    machine = report.Machine.describe()  # before pinning: nproc counts allowed CPUs
    layout = CpuLayout.for_this_machine(pin=not options.no_pin)
    layout.pin_this_process()
    _raise_open_files_limit()
    # SIGTERM unwinds like Ctrl-C, so every started process is stopped on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)

    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:4.0f} s] {message}", flush=True)

    progress(f"CPUs: {layout.describe()}")
    with tempfile.TemporaryDirectory(prefix="mobilepay-bench-") as directory:
        try:
            results = _measure(Path(directory), settings, layout, machine, progress)
        except StartupError as exc:
            print(f"benchmarks: could not start: {exc}", file=sys.stderr)
            return 1

    table = report.rows(results)
    report.write_json(RESULTS_JSON, results, table)
    chart.write(CHART, results)
    report.write_markdown(RESULTS_MD, results, table, CHART)
    print()
    print("\n".join(results.machine.lines()))
    print(f"CPUs: {results.cpu_layout.describe()}")
    print()
    print(report.text_table(table))
    print()
    warning = report.disturbance(results)
    if warning:
        print(f"warning: {warning}\n")
    for path in (RESULTS_JSON, RESULTS_MD, CHART):
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    progress("done")
    return 0


def _measure(
    directory: Path,
    settings: Settings,
    layout: CpuLayout,
    machine: report.Machine,
    progress: scenarios.Progress,
) -> report.Results:
    progress(f"starting the upstream and the three proxies in {directory}")
    with running_stack(directory, layout, merchants("store", settings.merchants)) as stack:
        fresh_rss = {name: service.rss_bytes() for name, service in stack.proxies.items()}
        saturation_script = load.write_wrk_script(
            directory / "saturation.lua", MERCHANT_HEADER, stack.merchant_key
        )
        poisson_script = load.write_wrk_script(
            directory / "poisson.lua",
            MERCHANT_HEADER,
            stack.merchant_key,
            mean_delay_ms=1000 * settings.rate_workers / settings.rate,
        )
        saturation = scenarios.saturation(stack, settings, saturation_script, progress)
        access_log = scenarios.access_log(
            stack, settings, saturation_script, directory / "access-log", progress
        )
        fixed_rate = scenarios.fixed_rate(stack, settings, poisson_script, progress)
        memory = scenarios.memory(stack, settings, fresh_rss, progress)
        drift = (
            scenarios.drift(stack, settings, directory, progress)
            if settings.drift_seconds
            else None
        )
        cold_start = scenarios.cold_start(stack, settings, directory / "cold-start", progress)
        return report.Results(
            machine=machine,
            settings=settings,
            cpu_layout=layout,
            saturation=saturation,
            fixed_rate=fixed_rate,
            memory=memory,
            drift=drift,
            cold_start=cold_start,
            access_log=access_log,
        )


def _raise_open_files_limit() -> None:
    """Room for 1,000 idle terminals and a 1,000-request burst; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 16_384 if hard == resource.RLIM_INFINITY else min(hard, 16_384)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)
