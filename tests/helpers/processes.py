"""The one way tests start programs: an explicit environment, and every line they print fed
to the secret guard.

A child gets PATH, HOME, TMPDIR, the tests' (empty) system trust store, coverage's own
variables (so ``make coverage`` measures it), and what the test gives it: never the
operator's environment wholesale.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import ROOT
from tests.helpers.exposure import Exposure
from tests.helpers.ports import ADDRESS, http_url

# The environment as the test session found it, before fixtures replaced the system trust
# store with an empty one: what a step that reaches PyPI (pip, uv) must run with.
MACHINE_ENVIRON: dict[str, str] = dict(os.environ)
PASSED_THROUGH = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "SSL_CERT_FILE", "SSL_CERT_DIR")
STOP_SECONDS = 20.0
PROXY = (sys.executable, "-m", "proxy")
# What the proxy logs once it listens (proxy.server and proxy.workers).
SERVING = re.compile(rf"terminals on ({ADDRESS})(?:, {ADDRESS})*, metrics on ({ADDRESS})")


def child_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = {name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}
    environ.update({k: v for k, v in os.environ.items() if k.startswith("COVERAGE_")})
    environ.update(extra or {})
    return environ


@dataclass
class Running:
    """A started program; its output (stdout and stderr together) line by line."""

    process: asyncio.subprocess.Process
    exposure: Exposure
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        return "".join(self.lines)

    async def line(self, pattern: re.Pattern[str], seconds: float = 20.0) -> re.Match[str]:
        """The first line printed so far, or within ``seconds``, that matches ``pattern``."""
        async with asyncio.timeout(seconds):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if match := pattern.search(line):
                        return match
                seen = len(self.lines)
                if self._reader.done():
                    raise AssertionError(
                        f"exited without printing {pattern.pattern!r}:\n{self.output}"
                    )
                self._new_line.clear()
                await self._new_line.wait()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self, seconds: float = STOP_SECONDS) -> int:
        """The exit code, once the program has exited and all its output is read."""
        code = await asyncio.wait_for(self.process.wait(), seconds)
        await asyncio.wait_for(self._reader, seconds)
        return code

    async def stop(self, seconds: float = STOP_SECONDS) -> int:
        """SIGTERM, then SIGKILL after ``seconds``; the exit code."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            return await self.wait(seconds)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            return await self.wait(seconds)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            self.exposure.texts.append(line)
            self._new_line.set()
        self._new_line.set()


@dataclass
class Proxy:
    """A ``mobilepay-proxy`` process and the addresses it said it serves on."""

    running: Running
    url: str
    metrics_url: str


class Processes:
    """Starts programs for one test and stops whatever is still running when it ends."""

    def __init__(self, exposure: Exposure) -> None:
        self.exposure = exposure
        self._running: list[Running] = []

    async def start(
        self, *args: str | Path, env: Mapping[str, str] | None = None, cwd: Path = ROOT
    ) -> Running:
        process = await asyncio.create_subprocess_exec(
            *(str(arg) for arg in args),
            cwd=cwd,
            env=child_environ(env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        running = Running(process, self.exposure)
        self._running.append(running)
        return running

    async def start_proxy(
        self,
        config: Path,
        *args: str,
        env: Mapping[str, str] | None = None,
        log_level: str = "INFO",
    ) -> Proxy:
        """``python -m proxy --config ...`` as an operator starts it, once it listens."""
        running = await self.start(
            *PROXY, *args, "--config", config, "--log-level", log_level, env=env
        )
        match = await running.line(SERVING)
        return Proxy(running, http_url(match[1]), http_url(match[2]))

    def run(
        self,
        *args: str | Path,
        env: Mapping[str, str] | None = None,
        cwd: Path = ROOT,
        seconds: float = 30.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run to the end (``seconds`` at most, else TimeoutExpired); its output goes to the
        guard, a program that timed out included."""
        try:
            result = subprocess.run(
                [str(arg) for arg in args],
                capture_output=True,
                text=True,
                timeout=seconds,
                cwd=cwd,
                env=child_environ(env),
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            self.exposure.texts += [_text(exc.stdout), _text(exc.stderr)]
            raise
        self.exposure.texts += [result.stdout, result.stderr]
        return result

    def run_proxy(
        self, *args: str | Path, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.run(*PROXY, *args, env=env)

    async def close(self) -> None:
        for running in reversed(self._running):
            await running.stop()


def _text(output: str | bytes | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""
