"""A local simulator of MobilePay's token service and PoS V10 API.

MobilePay closed PoS V10, so this simulator is the only live counterpart the
proxy has: it follows MobilePay's published API description, status codes
and error codes, and adds knobs (forced 401s, latency, 500s) and counters
under ``/_sandbox/`` for tests and demos. ``api.create_sandbox_app`` builds
the application, ``server.serve`` runs it on a socket, ``cli.main`` is
``mobilepay-proxy sandbox``, and ``demo.main`` is ``mobilepay-proxy demo``.

Nothing is imported here, so the demo runs without the simulator's
``cryptography`` dependency.
"""
