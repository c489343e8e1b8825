# syntax=docker/dockerfile:1
#
# mobilepay-proxy, with the local MobilePay simulator (`mobilepay-proxy sandbox`) included.
#
#   docker build -t mobilepay-proxy .
#   docker run -v /etc/mobilepay-proxy:/etc/mobilepay-proxy:ro -p 8080:8080 mobilepay-proxy
#
# The configuration is not baked in: mount it at /etc/mobilepay-proxy/proxy.toml.

# The build stage makes the project's wheel and fetches the dependencies pinned in
# requirements.lock (written from pyproject.toml by `make lock`), each checked against its
# hash there. Both stages share one Debian release and Python, so what is fetched here is
# what the runtime stage can install.
FROM python:3.11-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY proxy ./proxy
# Wheels only: a dependency without one for this platform fails the build here, instead of
# being compiled from a source the lock's hashes say nothing about.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && pip download --require-hashes --only-binary=:all: --dest /wheels \
        --requirement requirements.lock \
    && cp requirements.lock /wheels/


FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Offline, from the build stage's files, which are mounted, not copied, so they never end
# up in an image layer: the locked dependencies (their hashes checked again, and every
# dependency of theirs required to be in the lock), then the project without dependencies
# of its own; `pip check` fails the build if the lock does not satisfy the package.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels --require-hashes \
        --requirement /wheels/requirements.lock \
    && pip install --no-index --no-deps /wheels/mobilepay_proxy-*.whl \
    && pip check

# A fixed numeric uid, so file permissions on mounted secrets and volumes are predictable
# and orchestrators can verify the image does not run as root. /sandbox-tls is where the
# simulator writes its CA in docker-compose.yml; a fresh named volume mounted there takes
# this directory's owner, so the simulator can write to it without root.
RUN groupadd --system --gid 10001 mobilepay \
    && useradd --system --uid 10001 --gid mobilepay --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mobilepay \
    && mkdir -p /etc/mobilepay-proxy /sandbox-tls \
    && chown 10001:10001 /sandbox-tls

USER 10001:10001

# 8080: terminals. 9180: /metrics, /healthz and /readyz for operators.
EXPOSE 8080 9180

# The slim image has no curl. The empty ProxyHandler keeps an HTTP_PROXY set in the
# container's environment from routing the check somewhere else.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9180/healthz', timeout=2)"]

# The proxy stops accepting connections on SIGTERM and drains in-flight requests for up to
# drain_timeout_seconds; give it longer than that before the runtime sends SIGKILL.
STOPSIGNAL SIGTERM

ENTRYPOINT ["mobilepay-proxy"]
CMD ["--config", "/etc/mobilepay-proxy/proxy.toml"]
