"""Log output: text or JSON lines, written in batches by one thread, off the event loop.

Every line the process logs goes through one :class:`LogWriter` on the root logger, the only
writer of the output file descriptor, so lines never interleave mid-line and stay in order.
Access lines (one per request) are the bulk: the pipeline hands the writer an
:class:`AccessEntry` (a few fields, no formatting), and the writer thread formats and writes
them in batches, like nginx's ``access_log ... buffer=64k flush=1s``:

- a batch is written when ``flush_lines`` lines wait, when the oldest has waited
  ``flush_seconds``, at once after any other log line (so ordinary lines are never held back),
  on :meth:`LogWriter.request_flush` (SIGHUP) and on :meth:`LogWriter.close` (exit, after the
  SIGTERM drain);
- writes are chunks of whole lines of at most ``PIPE_BUF`` bytes, so the lines of several
  workers sharing one pipe never mix;
- the event loop never waits for the disk: beyond ``max_pending`` lines waiting (the writer is
  stuck on a slow disk or a full pipe) new lines are dropped and counted
  (``mobilepay_proxy_log_lines_dropped_total``).

Why a thread rather than non-blocking writes from the loop: the output is usually stderr,
shared with the supervisor, other workers and whatever started the proxy; making it
non-blocking would change it for all of them.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from pythonjsonlogger.json import JsonFormatter

from proxy.config import LogFormat

ACCESS_LOGGER = "proxy.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s {where}%(name)s: %(message)s"
ACCESS_MESSAGE = (
    "%s %s %s %s -> %d in %.1f ms merchant=%s token=%s attempts=%d "
    "request_id=%s mobilepay_correlation_id=%s"
)

FLUSH_LINES = 256  # about 64 KiB of access lines
FLUSH_SECONDS = 1.0
MAX_PENDING = 8192  # about 2 MB of lines waiting for a stuck disk, then lines are dropped
CLOSE_TIMEOUT_SECONDS = 5.0  # exit does not wait longer than this for a stuck disk

_access_logger = logging.getLogger(ACCESS_LOGGER)


@dataclass(slots=True)
class AccessEntry:
    """One request as the access log records it; formatted only by the writer."""

    created: float  # time.time() when the answer was ready
    peer: str | None
    method: str
    route: str
    path: str | None
    status: int
    duration_ms: float
    merchant: str | None
    token_fingerprint: str | None
    attempts: int
    request_id: str
    mobilepay_correlation_id: str | None

    def message(self) -> str:
        return ACCESS_MESSAGE % (
            self.peer,
            self.method,
            self.route,
            self.path or "-",
            self.status,
            self.duration_ms,
            self.merchant or "-",
            self.token_fingerprint or "-",
            self.attempts,
            self.request_id,
            self.mobilepay_correlation_id or "-",
        )

    def record(self) -> logging.LogRecord:
        """A log record carrying the fields as attributes (JSON output shows them as fields)."""
        record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, "", 0, self.message(), None, None)
        record.created = self.created
        record.msecs = (self.created - int(self.created)) * 1000
        fields = asdict(self)
        del fields["created"]
        fields["duration_ms"] = round(self.duration_ms, 1)
        record.__dict__.update(fields)
        return record


class AccessLog:
    """The pipeline's access log: the process's :class:`LogWriter`, or plain logging without one.

    Without a writer (the proxy embedded in another program, or under test) each entry is an
    ordinary INFO record of ``proxy.access`` with the fields as attributes.
    """

    def __init__(self, dropped: Callable[[], None] | None = None) -> None:
        self._writer = next(
            (h for h in logging.getLogger().handlers if isinstance(h, LogWriter)), None
        )
        if self._writer is not None and dropped is not None:
            self._writer.count_drops(dropped)

    def enabled(self) -> bool:
        return _access_logger.isEnabledFor(logging.INFO)

    def write(self, entry: AccessEntry) -> None:
        if self._writer is not None:
            self._writer.add(entry)
        else:
            _access_logger.handle(entry.record())


class _TextAccessFormat:
    """Access lines in the text format without a LogRecord each: the hot part of the log."""

    def __init__(self, where: str) -> None:
        self._prefix = f" INFO {where}{ACCESS_LOGGER}: "
        self._second = -1
        self._stamp = ""

    def __call__(self, entry: AccessEntry) -> str:
        second = int(entry.created)
        if second != self._second:  # logging.Formatter's default asctime, once a second
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        msecs = int((entry.created - second) * 1000)
        return f"{self._stamp},{msecs:03d}{self._prefix}{entry.message()}"


class LogWriter(logging.Handler):
    """Formats records, buffers lines, and writes them from its own thread (see the module)."""

    def __init__(
        self,
        fd: int,
        formatter: logging.Formatter,
        access_format: Callable[[AccessEntry], str],
        *,
        flush_lines: int = FLUSH_LINES,
        flush_seconds: float = FLUSH_SECONDS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        super().__init__()
        self.setFormatter(formatter)
        self._fd = fd
        self._access_format = access_format
        self._flush_lines = flush_lines
        self._flush_seconds = flush_seconds
        self._max_pending = max_pending
        self._chunk = select.PIPE_BUF
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[str | AccessEntry] = []
        self._oldest = 0.0  # monotonic time the oldest pending line arrived
        self._now = False  # write what is pending without waiting
        self._added = 0
        self._done = 0  # lines written or given up on
        self._closed = False
        self.dropped = 0
        self._on_drop: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def count_drops(self, on_drop: Callable[[], None]) -> None:
        """Call ``on_drop`` for every line dropped from now on (it may run on any thread)."""
        self._on_drop = on_drop

    # producers (any thread; the event loop's is the busy one)

    def add(self, entry: AccessEntry) -> None:
        self._put(entry, now=False)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._put(line, now=True)

    def _put(self, item: str | AccessEntry, *, now: bool) -> None:
        with self._cond:
            if self._closed:  # a line logged while exiting: written as it comes
                self._write([item])
                return
            pending = len(self._pending)
            if pending >= self._max_pending:
                self.dropped += 1
                if self._on_drop is not None:
                    self._on_drop()
                return
            self._pending.append(item)
            self._added += 1
            if pending == 0:
                self._oldest = time.monotonic()
                self._cond.notify()  # starts the writer's flush_seconds timer
            if now or pending + 1 >= self._flush_lines:
                self._now = True
                self._cond.notify()

    def request_flush(self) -> None:
        """Have everything pending written soon; returns at once (safe on the event loop)."""
        with self._cond:
            self._now = True
            self._cond.notify()

    def flush(self, timeout: float = CLOSE_TIMEOUT_SECONDS) -> None:
        """Write everything pending and wait for it, at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._added
            self._now = True
            self._cond.notify_all()
            while self._done < target and self._thread.is_alive():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def close(self) -> None:
        """Write what is pending (within the close timeout) and stop the thread."""
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(CLOSE_TIMEOUT_SECONDS)
        super().close()

    # the writer thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._due()):
                    self._cond.wait(self._wait_seconds())
                batch, self._pending = self._pending, []
                self._now = False
                stop = self._closed
            if batch:
                self._write(batch)
                with self._cond:
                    self._done += len(batch)
                    self._cond.notify_all()
            if stop:
                return

    def _due(self) -> bool:
        if not self._pending:
            return False
        return (
            self._now
            or len(self._pending) >= self._flush_lines
            or time.monotonic() - self._oldest >= self._flush_seconds
        )

    def _wait_seconds(self) -> float | None:
        if not self._pending:
            return None
        return max(0.0, self._flush_seconds - (time.monotonic() - self._oldest))

    def _write(self, batch: list[str | AccessEntry]) -> None:
        chunk: list[bytes] = []
        size = 0
        for item in batch:
            text = item if isinstance(item, str) else self._format_access(item)
            line = (text + "\n").encode("utf-8", "backslashreplace")
            if size + len(line) > self._chunk and chunk:
                self._write_all(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write_all(b"".join(chunk))

    def _format_access(self, entry: AccessEntry) -> str:
        if isinstance(self.formatter, JsonFormatter):
            return self.formatter.format(entry.record())
        return self._access_format(entry)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:
            pass  # nowhere left to report it; the lines are lost


def flush_soon() -> None:
    """Have the process's :class:`LogWriter` write what it holds now, without waiting for it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LogWriter):
            handler.request_flush()


def configure_logging(
    level: str, log_format: LogFormat, *, worker: int | None = None, supervisor: bool = False
) -> LogWriter:
    """Send every log line of the process through one :class:`LogWriter` on stderr.

    A worker's or supervisor's lines say so: ``[worker 1 pid 42]`` / ``[supervisor]`` in
    text, ``worker``/``supervisor`` and ``pid`` fields in JSON. Call once, from ``main()``;
    close the writer before exiting.
    """
    pid = os.getpid()
    fields: dict[str, object] = {}
    where = ""
    if worker is not None:
        fields, where = {"worker": worker, "pid": pid}, f"[worker {worker} pid {pid}] "
    elif supervisor:
        fields, where = {"supervisor": True, "pid": pid}, "[supervisor] "
    formatter: logging.Formatter
    if log_format == "json":
        formatter = JsonFormatter(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
            static_fields=fields,
        )
    else:
        formatter = logging.Formatter(TEXT_FORMAT.format(where=where))
    writer = LogWriter(2, formatter, _TextAccessFormat(where))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(writer)
    root.setLevel(level)
    return writer
