"""`make bench`: mobilepay-proxy against nginx and a naive aiohttp passthrough.

Everything runs on 127.0.0.1: an nginx upstream over TLS standing in for MobilePay, the
three proxies in front of it, and wrk, hey and a few asyncio clients as terminals. The
figures go to the console, ``benchmarks/out/results.json``, ``benchmarks/RESULTS.md`` and
``benchmarks/latency.png``.

Layout: ``prerequisites`` (nginx, wrk, hey, matplotlib), ``procfs`` (RSS and CPU time of a
process tree), ``services`` (starting and stopping processes), ``stack`` (the upstream and
the three proxies), ``naive`` (the passthrough), ``load`` (wrk, hey and the asyncio
clients), ``scenarios`` (what is measured), ``report`` (the table, results.json and
RESULTS.md), ``chart`` (latency.png), ``cli``.
"""
