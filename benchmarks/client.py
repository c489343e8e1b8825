"""``python -m benchmarks.client``: the upstream response parser, llhttp by two bindings.

Against the benchmark's TLS upstream (nginx answering a PoS V10 payment), one blocking
keep-alive connection sends the request the proxy sends and parses each response in full,
alternately with :class:`proxy.http1.ResponseParser` (httptools) and with aiohttp's
exported ``aiohttp.http.HttpResponseParser`` (its C parser, the same llhttp). The figure is
exchanges per CPU second of this process: TLS and system calls are the same for both, so
the difference is the parser and what it takes to get a status, headers and a body out.
A parse-only figure, the same response bytes fed again and again, isolates the parser.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp.http import HttpResponseParser
from multidict import CIMultiDict

from benchmarks.services import CpuLayout, free_port, wait_until_ok
from benchmarks.stack import PAYMENT_PATH, _start_nginx, upstream_conf
from proxy.http1 import ResponseParser
from proxy.sandbox.tls import ensure_tls_files

REQUEST = (
    f"GET {PAYMENT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n"
    "x-ibm-client-id: bench\r\nX-MobilePay-Merchant-VAT-Number: DK12345678\r\n\r\n"
).encode()

# Reads one response from ``recv`` and returns its status, headers and body size.
Reader = Callable[[Callable[[], bytes]], tuple[int, CIMultiDict[str], int]]


def httptools_reader() -> Reader:
    parser = ResponseParser()  # one per connection, as the proxy keeps it

    def read(recv: Callable[[], bytes]) -> tuple[int, CIMultiDict[str], int]:
        while not parser.feed(recv()):
            pass
        response = parser.response
        assert response is not None
        parser.reset()
        return response.status, response.headers, len(response.body)

    return read


class _FlowControl:
    """What aiohttp's payload stream calls on its protocol; a blocking client needs none."""

    _reading_paused = False  # read by aiohttp's StreamReader itself

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def aiohttp_reader() -> Reader:
    loop = asyncio.new_event_loop()  # the payload stream wants one; it is never run
    parser = HttpResponseParser(_FlowControl(), loop, 2**16)  # type: ignore[arg-type]

    def read(recv: Callable[[], bytes]) -> tuple[int, CIMultiDict[str], int]:
        while True:
            messages, _, _ = parser.feed_data(recv())
            if messages:
                message, payload = messages[0]
                while not payload.is_eof():
                    parser.feed_data(recv())
                body = payload.read_nowait(-1)
                # The proxy strips hop-by-hop headers in place: it needs its own copy.
                return message.code, CIMultiDict(message.headers), len(body)

    return read


READERS: dict[str, Callable[[], Reader]] = {
    "httptools (proxy.http1.ResponseParser)": httptools_reader,
    "aiohttp.http.HttpResponseParser": aiohttp_reader,
}


def exchanges_per_cpu_second(
    port: int, ca_file: Path, make: Callable[[], Reader], seconds: float
) -> float:
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            read = make()

            def recv() -> bytes:
                return sock.recv(65536)

            count = 0
            started_cpu, started = time.process_time(), time.monotonic()
            while time.monotonic() - started < seconds:
                sock.sendall(REQUEST)
                status, _, _ = read(recv)
                assert status == 200
                count += 1
            return count / (time.process_time() - started_cpu)


def parses_per_second(raw: bytes, make: Callable[[], Reader], count: int = 50_000) -> float:
    read = make()
    started = time.process_time()
    for _ in range(count):
        read(lambda: raw)
    return count / (time.process_time() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs per parser")
    options = parser.parse_args(argv)
    layout = CpuLayout.for_this_machine(pin=True)
    layout.pin_this_process()
    with tempfile.TemporaryDirectory(prefix="mobilepay-client-bench-") as name:
        directory = Path(name)
        tls = ensure_tls_files(directory / "tls")
        port = free_port()
        upstream = _start_nginx(
            "upstream nginx",
            directory / "upstream",
            lambda prefix: upstream_conf(prefix, port, tls, directory / "tokens.log"),
            layout.upstream,
        )
        try:
            url = f"https://127.0.0.1:{port}{PAYMENT_PATH}"
            wait_until_ok(
                upstream, url, context=ssl.create_default_context(cafile=str(tls.ca_cert))
            )
            results: dict[str, list[float]] = {label: [] for label in READERS}
            for _ in range(options.rounds):
                for label, make in READERS.items():
                    results[label].append(
                        exchanges_per_cpu_second(port, tls.ca_cert, make, options.seconds)
                    )
            recorded = _one_response(port, tls.ca_cert)
        finally:
            upstream.stop()
    print(f"{'parser':42} {'exchanges per CPU second (median)':>34} {'parses per CPU second':>22}")
    for label, make in READERS.items():
        runs = sorted(results[label])
        print(
            f"{label:42} {runs[len(runs) // 2]:>34,.0f} {parses_per_second(recorded, make):>22,.0f}"
        )
    return 0


def _one_response(port: int, ca_file: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_file))
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        sock.sendall(REQUEST)
        parser = ResponseParser()
        data = bytearray()
        while True:
            chunk = sock.recv(65536)
            data += chunk
            if parser.feed(chunk):
                return bytes(data)


if __name__ == "__main__":
    raise SystemExit(main())
