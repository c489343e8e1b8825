"""A real redis-server on loopback that tests can stop and start again on the same port."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.helpers.ports import unused_port

START_SECONDS = 10.0
ATTEMPTS = 5
READY = "Ready to accept connections"
PORT_TAKEN = "Address already in use"


class RedisServer:
    def __init__(self, log: Path) -> None:
        self._log = log
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port, "not started yet"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on a free port the first time; on the same port after a stop()."""
        if self.port:
            self._start(self.port)
            return
        # redis-server cannot bind port 0 and say which port it got: try free ports until
        # one is still free when it binds.
        for _ in range(ATTEMPTS):
            port = unused_port()
            try:
                self._start(port)
            except _PortTaken:
                continue
            self.port = port
            return
        raise AssertionError(f"redis-server found no free port in {ATTEMPTS} attempts")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def log(self) -> str:
        return self._log.read_text(errors="replace") if self._log.exists() else ""

    def _start(self, port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("redis-server is not installed: make test-tools installs it")
        start_of_log = len(self.log())
        self._process = subprocess.Popen(
            [
                binary,
                *("--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--logfile", str(self._log)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            log = self.log()[start_of_log:]
            if READY in log:
                return
            if self._process.poll() is not None:
                self._process = None
                if PORT_TAKEN in log:
                    raise _PortTaken(port)
                raise AssertionError(f"redis-server exited:\n{log}")
            time.sleep(0.02)
        self.stop()
        raise AssertionError("redis-server did not come up")


class _PortTaken(Exception):
    pass
