"""``python -m benchmarks.versus REV``: this tree against an earlier revision.

The same upstream and nginx as ``make bench``; the proxy of the working tree and the proxy
of ``REV`` (extracted with ``git archive``, run with this virtualenv's packages) on the same
core. Two measurements:

- **alternated**, as ``make bench`` measures: nginx, ``REV`` and this tree take turns under
  ``wrk -t2 -c32``; throughput and its ratio to nginx. This is the figure ``make bench``
  reports, and the noisier one: a neighbour that slows the machine for one run slows only
  one proxy;
- **together**: both proxies at once, each under its own ``wrk -t1 -c16``, competing for
  the one core. Whatever the machine does meanwhile, it does to both, so the ratios of
  their throughput and of their CPU time per request are steady to about 1 % (the same
  revision against itself measures 0.99-1.01).
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import load
from benchmarks.scenarios import Settings, rotated
from benchmarks.services import CpuLayout, Service
from benchmarks.stack import (
    MERCHANT_HEADER,
    PAYMENT_PATH,
    PROJECT_ROOT,
    merchants,
    running_stack,
    start_mobilepay_proxy,
)

WARM_UP_SECONDS = 2.0
THIS_TREE = "this tree"


@dataclass
class Runs:
    rps: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # CPU time per request, µs

    def add(self, result: load.WrkResult, cpu_seconds: float) -> None:
        self.rps.append(result.rps)
        self.cpu_us.append(cpu_seconds / max(result.requests, 1) * 1e6)


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
    revision = options.revision

    layout = CpuLayout.for_this_machine(pin=True)
    layout.pin_this_process()
    with tempfile.TemporaryDirectory(prefix="mobilepay-versus-") as name:
        directory = Path(name)
        tree = extract(revision, directory / "tree")
        rows = merchants("store", settings.merchants)
        with running_stack(directory / "stack", layout, rows) as stack:
            before = start_mobilepay_proxy(
                directory / "revision",
                upstream_port=stack.upstream_port,
                ca_file=stack.tls.ca_cert,
                merchant_rows=rows,
                cpus=layout.proxy,
                tree=tree,
            )
            try:
                services = {
                    "nginx": stack.proxies["nginx"],
                    revision: before.service,
                    THIS_TREE: stack.proxies["proxy"],
                }
                urls = {
                    "nginx": stack.url("nginx"),
                    revision: f"http://127.0.0.1:{before.port}{PAYMENT_PATH}",
                    THIS_TREE: stack.url("proxy"),
                }
                script = load.write_wrk_script(
                    directory / "wrk.lua", MERCHANT_HEADER, stack.merchant_key
                )
                for url in urls.values():
                    load.run_wrk(url, script, seconds=settings.warm_up_seconds, cpus=layout.load)
                alternated = _alternated(services, urls, script, settings, layout)
                pair = (revision, THIS_TREE)
                together = _together(
                    {label: services[label] for label in pair},
                    {label: urls[label] for label in pair},
                    script,
                    settings,
                    layout,
                )
            finally:
                before.service.stop()
    _summary(alternated, together, revision)
    return 0


def _alternated(
    services: dict[str, Service],
    urls: dict[str, str],
    script: Path,
    settings: Settings,
    layout: CpuLayout,
) -> dict[str, Runs]:
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
            runs[label].add(result, services[label].cpu_seconds() - cpu_before)
            print(
                f"alternated {round_number + 1}/{settings.rounds} {label:>12}: "
                f"{result.rps:8,.0f} req/s {runs[label].cpu_us[-1]:6.1f} µs CPU/req"
                f" (non-2xx {result.non_2xx}, socket errors {result.socket_errors})",
                flush=True,
            )
    return runs


def _together(
    services: dict[str, Service],
    urls: dict[str, str],
    script: Path,
    settings: Settings,
    layout: CpuLayout,
) -> dict[str, Runs]:
    runs = {label: Runs() for label in urls}
    # Half of make bench's load each, so that the core sees the same number of connections.
    threads = max(1, settings.saturation_threads // 2)
    connections = max(1, settings.saturation_connections // 2)
    with ThreadPoolExecutor(len(urls)) as pool:
        for round_number in range(settings.rounds):
            cpu_before = {label: service.cpu_seconds() for label, service in services.items()}
            running = {
                label: pool.submit(
                    load.run_wrk,
                    url,
                    script,
                    seconds=settings.seconds,
                    threads=threads,
                    connections=connections,
                    cpus=layout.load,
                )
                for label, url in urls.items()
            }
            results = {label: future.result() for label, future in running.items()}
            line = []
            for label, result in results.items():
                runs[label].add(result, services[label].cpu_seconds() - cpu_before[label])
                line.append(f"{label} {result.rps:7,.0f} req/s {runs[label].cpu_us[-1]:6.1f} µs")
            print(f"together {round_number + 1}/{settings.rounds}: " + ", ".join(line), flush=True)
    return runs


def _summary(alternated: dict[str, Runs], together: dict[str, Runs], revision: str) -> None:
    rps = {label: statistics.median(r.rps) for label, r in alternated.items()}
    cpu = {label: statistics.median(r.cpu_us) for label, r in alternated.items()}
    print("\nalternated (medians):")
    for label in alternated:
        print(
            f"{label:>12}: {rps[label]:8,.0f} req/s ({rps[label] / rps['nginx']:.3f}x "
            f"nginx), {cpu[label]:6.1f} µs CPU/req"
        )
    print(
        f"this tree against {revision}: throughput {rps[THIS_TREE] / rps[revision]:.3f}x, "
        f"CPU per request {cpu[THIS_TREE] / cpu[revision]:.3f}x"
    )
    throughput = [
        new / old for new, old in zip(together[THIS_TREE].rps, together[revision].rps, strict=True)
    ]
    cpu_ratio = [
        new / old
        for new, old in zip(together[THIS_TREE].cpu_us, together[revision].cpu_us, strict=True)
    ]
    print(
        f"\ntogether: this tree against {revision}: throughput "
        f"{statistics.median(throughput):.3f}x ({min(throughput):.3f}-{max(throughput):.3f}), "
        f"CPU per request {statistics.median(cpu_ratio):.3f}x "
        f"({min(cpu_ratio):.3f}-{max(cpu_ratio):.3f})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
