"""A hostile TLS upstream on loopback: each connection runs a script over a blocking socket.

asyncio's TLS transport always ends a connection politely; a script here can also end it
with a TCP FIN and no TLS ``close_notify`` (a ragged EOF), with a RST, or stop reading
altogether, and it sends from the caller's buffer without copying it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

IO_SECONDS = 10.0  # no script thread outlives a test by much, whatever the proxy does


class Peer:
    """One accepted connection, as its script sees it."""

    def __init__(self, sock: ssl.SSLSocket, stopping: threading.Event) -> None:
        self.sock = sock
        self.received = bytearray()
        self._stopping = stopping

    def hold(self, seconds: float) -> None:
        """Do nothing (read nothing) for ``seconds``, or until the test ends."""
        self._stopping.wait(seconds)

    def read_head(self) -> bytes:
        """Read up to the end of a request head; what came after it stays in ``received``."""
        while b"\r\n\r\n" not in self.received:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the proxy closed before a request head")
            self.received += data
        end = self.received.index(b"\r\n\r\n") + 4
        head = bytes(self.received[:end])
        del self.received[:end]
        return head

    def read_request(self) -> tuple[bytes, bytes]:
        """A whole request head and its Content-Length body."""
        head = self.read_head()
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.received) < length:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the proxy closed mid-body")
            self.received += data
        body = bytes(self.received[:length])
        del self.received[:length]
        return head, body

    def read_for(self, seconds: float) -> int:
        """Read whatever arrives for ``seconds`` (or until the proxy closes); bytes read."""
        self.sock.settimeout(seconds)
        total = 0
        with contextlib.suppress(TimeoutError, OSError):
            while data := self.sock.recv(65536):
                total += len(data)
                self.received += data
        self.sock.settimeout(IO_SECONDS)
        return total

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def close_notify(self) -> None:
        """End the TLS session properly, then the connection."""
        with contextlib.suppress(OSError):
            self.sock.unwrap().close()

    def ragged_close(self) -> None:
        """A TCP FIN without a TLS close_notify: what a truncation attack looks like."""
        self.sock.shutdown(socket.SHUT_WR)  # SSLSocket.shutdown skips the TLS alert
        self.read_for(1.0)

    def reset(self) -> None:
        """A TCP RST: linger with a zero timeout, then close."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


Script = Callable[[Peer], None]


@dataclass
class ScriptedUpstream:
    """Accepts TLS connections on 127.0.0.1 (port 0) and runs ``script`` on each."""

    context: ssl.SSLContext
    script: Script
    peers: list[Peer] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    port: int = 0
    _listener: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.peers)

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.05)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop)

    def stop(self) -> None:
        self._stopping.set()
        for peer in self.peers:  # wakes a script blocked in recv
            with contextlib.suppress(OSError):
                socket.socket.shutdown(peer.sock, socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(IO_SECONDS + 2)
        if self._listener is not None:
            self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(IO_SECONDS)
            self._spawn(self._serve, raw)

    def _serve(self, raw: socket.socket) -> None:
        try:
            sock = self.context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False)
        except OSError:
            raw.close()
            return
        peer = Peer(sock, self._stopping)
        self.peers.append(peer)
        try:
            self.script(peer)
        except OSError:
            pass  # the proxy closed or reset: that is often the point
        except BaseException as exc:  # a broken script must fail the test, not vanish
            self.errors.append(exc)
        finally:
            sock.close()


@contextlib.contextmanager
def scripted_upstream(context: ssl.SSLContext, script: Script) -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream(context, script)
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()
    assert not upstream.errors, upstream.errors
