"""Long-running processes: started in their own session, pinned to CPUs, always stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procfs

STOP_GRACE_SECONDS = 5.0
START_TIMEOUT_SECONDS = 20.0


class StartupError(Exception):
    """A service did not come up; the message carries the end of its log."""


@dataclass(frozen=True, slots=True)
class CpuLayout:
    """Which CPUs the proxy under test, the upstream and the load generators may use.

    The proxy under test gets a core of its own so that its figures do not depend on
    how the scheduler shares it with wrk; on a two-core machine the upstream and the
    load generators share the other core.
    """

    proxy: tuple[int, ...] = ()
    upstream: tuple[int, ...] = ()
    load: tuple[int, ...] = ()

    @classmethod
    def for_this_machine(cls, *, pin: bool = True) -> CpuLayout:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
        if not pin or len(cpus) < 2 or shutil.which("taskset") is None:
            return cls()
        if len(cpus) < 4:
            return cls(proxy=cpus[-1:], upstream=cpus[:-1], load=cpus[:-1])
        return cls(proxy=cpus[-1:], upstream=cpus[-2:-1], load=cpus[:-2])

    @property
    def pinned(self) -> bool:
        return bool(self.proxy)

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned: every process may run on every CPU"
        return (
            f"proxy under test on CPU {_cpus(self.proxy)}; upstream nginx on CPU "
            f"{_cpus(self.upstream)}; wrk, hey and the benchmark's own clients on CPU "
            f"{_cpus(self.load)}"
        )

    def pin_this_process(self) -> None:
        """The benchmark's own clients count as load generators."""
        if self.load:
            os.sched_setaffinity(0, self.load)


def _cpus(cpus: Sequence[int]) -> str:
    return ",".join(map(str, cpus))


def taskset(cpus: Sequence[int]) -> list[str]:
    """An argv prefix pinning a command, threads included, to ``cpus``."""
    return ["taskset", "-c", _cpus(cpus)] if cpus else []


@dataclass(slots=True)
class Service:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children (an nginx master and worker)."""
        return procfs.tree_rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        return procfs.tree_cpu_seconds(self.pid)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise StartupError(
                f"{self.name} exited with status {self.process.returncode}\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(f"  | {line}" for line in text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole session if it lingers."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE_SECONDS)
                return
            except subprocess.TimeoutExpired:
                pass
        # start_new_session made the process group id the service's pid: this reaches
        # an nginx worker whose master is gone, and nothing else.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()


def start(
    name: str,
    argv: Sequence[str],
    *,
    log: Path,
    cpus: Sequence[int] = (),
    cwd: Path | None = None,
) -> Service:
    with log.open("wb") as output:
        process = subprocess.Popen(
            [*taskset(cpus), *argv],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    return Service(name, process, log)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# Everything is on loopback: never through a proxy named in the environment.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def fetch(url: str, *, timeout: float = 5.0) -> bytes:
    """GET a loopback URL; raise on anything but a 2xx answer."""
    with _NO_PROXY_OPENER.open(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def wait_until_ok(
    service: Service,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> None:
    """Poll ``url`` until it answers 200; fail early if the service exits."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    opener = (
        urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        if context is not None
        else _NO_PROXY_OPENER
    )
    last = "no answer"
    while True:
        service.check_alive()
        try:
            request = urllib.request.Request(url, headers=dict(headers or {}))
            with opener.open(request, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"status {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except OSError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise StartupError(f"{service.name} did not answer {url}: {last}\n{service.log_tail()}")
        time.sleep(0.05)
