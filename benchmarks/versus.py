"""``python -m benchmarks.versus REV``: this tree against an earlier revision, alternated.

The same upstream and nginx as ``make bench``; the proxy of the working tree and the proxy
of ``REV`` (extracted with ``git archive``, run with this virtualenv's packages) take turns
under ``wrk -t2 -c32``, nginx in the rotation as the reference. Prints throughput and CPU
time per request of each run, then the medians and their ratios. CPU time per request is
the steadier figure on a shared machine: a neighbour that slows the machine down stretches
both proxies' runs, but costs neither of them CPU time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import load
from benchmarks.scenarios import Settings, rotated
from benchmarks.services import CpuLayout
from benchmarks.stack import (
    MERCHANT_HEADER,
    PAYMENT_PATH,
    PROJECT_ROOT,
    merchants,
    running_stack,
    start_mobilepay_proxy,
)

WARM_UP_SECONDS = 2.0


@dataclass
class Runs:
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # CPU time per request, µs


def extract(revision: str, directory: Path) -> Path:
    """The revision's files in ``directory``; raises if git does not know the revision."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.versus", description=__doc__)
    parser.add_argument("revision", help="the git revision to compare with, e.g. HEAD~5")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0)
    options = parser.parse_args(argv)
    # make bench's own settings: the same merchants and wrk connections.
    settings = Settings(
        rounds=options.rounds,
        seconds=options.seconds,
        warm_up_seconds=WARM_UP_SECONDS,
        drift_seconds=None,
    )

    layout = CpuLayout.for_this_machine(pin=True)
    layout.pin_this_process()
    with tempfile.TemporaryDirectory(prefix="mobilepay-versus-") as name:
        directory = Path(name)
        tree = extract(options.revision, directory / "tree")
        rows = merchants("store", settings.merchants)
        with running_stack(directory / "stack", layout, rows) as stack:
            revision = start_mobilepay_proxy(
                directory / "revision",
                upstream_port=stack.upstream_port,
                ca_file=stack.tls.ca_cert,
                merchant_rows=rows,
                cpus=layout.proxy,
                tree=tree,
            )
            before = revision.service
            try:
                services = {
                    "nginx": stack.proxies["nginx"],
                    options.revision: before,
                    "this tree": stack.proxies["proxy"],
                }
                urls = {
                    "nginx": stack.url("nginx"),
                    options.revision: f"http://127.0.0.1:{revision.port}{PAYMENT_PATH}",
                    "this tree": stack.url("proxy"),
                }
                script = load.write_wrk_script(
                    directory / "wrk.lua", MERCHANT_HEADER, stack.merchant_key
                )
                for url in urls.values():
                    load.run_wrk(url, script, seconds=settings.warm_up_seconds, cpus=layout.load)
                runs = {label: Runs() for label in urls}
                for round_number in range(settings.rounds):
                    for label in rotated(list(urls), round_number):
                        cpu_before = services[label].cpu_seconds()
                        result = load.run_wrk(
                            urls[label],
                            script,
                            seconds=settings.seconds,
                            threads=settings.saturation_threads,
                            connections=settings.saturation_connections,
                            cpus=layout.load,
                        )
                        cpu = services[label].cpu_seconds() - cpu_before
                        runs[label].rps.append(result.rps)
                        runs[label].cpu_us.append(cpu / max(result.requests, 1) * 1e6)
                        print(
                            f"round {round_number + 1}/{settings.rounds} {label:>12}: "
                            f"{result.rps:8,.0f} req/s {runs[label].cpu_us[-1]:6.1f} µs CPU/req"
                            f" (non-2xx {result.non_2xx}, socket errors {result.socket_errors})",
                            flush=True,
                        )
            finally:
                before.stop()
    _summary(runs, options.revision)
    return 0


def _summary(runs: dict[str, Runs], revision: str) -> None:
    rps = {label: statistics.median(r.rps) for label, r in runs.items()}
    cpu = {label: statistics.median(r.cpu_us) for label, r in runs.items()}
    print()
    for label in runs:
        print(
            f"{label:>12}: median {rps[label]:8,.0f} req/s ({rps[label] / rps['nginx']:.3f}x "
            f"nginx), {cpu[label]:6.1f} µs CPU/req"
        )
    print(
        f"this tree against {revision}: throughput {rps['this tree'] / rps[revision]:.3f}x, "
        f"CPU per request {cpu['this tree'] / cpu[revision]:.3f}x"
    )


if __name__ == "__main__":
    raise SystemExit(main())
