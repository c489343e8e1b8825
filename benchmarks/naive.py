"""The yardstick: the twenty-line aiohttp passthrough anyone would write first.

No routing, no token service, no header hygiene, no limits, no metrics; one
ClientSession for the whole process, verifying the upstream against ``--ca-file``.

    python -m benchmarks.naive --port 8081 --upstream https://127.0.0.1:8443 --ca-file ca.pem
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

SESSION = web.AppKey("session", aiohttp.ClientSession)


def create_app(upstream: str, ca_file: str, token: str, ibm_client_id: str) -> web.Application:
    async def session(app: web.Application) -> AsyncIterator[None]:
        context = ssl.create_default_context(cafile=ca_file)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as client:
            app[SESSION] = client
            yield

    async def forward(request: web.Request) -> web.Response:
        headers = CIMultiDict(request.headers)
        headers.popall("Host", None)
        headers["Authorization"] = f"Bearer {token}"
        headers["x-ibm-client-id"] = ibm_client_id
        async with request.app[SESSION].request(
            request.method, upstream + request.path_qs, headers=headers, data=await request.read()
        ) as response:
            body = await response.read()
        return web.Response(status=response.status, body=body, content_type=response.content_type)

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="https://host:port")
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--token", default="naive-static-token")
    parser.add_argument("--ibm-client-id", default="bench-ibm-client")
    options = parser.parse_args()
    app = create_app(options.upstream, options.ca_file, options.token, options.ibm_client_id)
    web.run_app(app, host="127.0.0.1", port=options.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
