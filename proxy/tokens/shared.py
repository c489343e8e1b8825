"""A token store in Redis, shared by every process and replica of the proxy.

What it holds, per client id and merchant VAT:
- ``<prefix>:<client>:<vat>``: the token, AES-GCM encrypted with a key derived from the
  client secret (a leaked Redis dump hands out no working token, and the secret itself is
  never stored), expiring with the token;
- ``<prefix>:<client>:<vat>:generation``: a counter, so every copy agrees which token is
  newer;
- ``<prefix>:<client>:<vat>:stored``: the generation of the token stored (or of the last one
  MobilePay refused): a save of an older generation is refused, in the same Lua call;
- ``<prefix>:<client>:<vat>:lock``: a short lock (``SET NX PX`` with a random owner
  value) taken by the one copy that fetches from MobilePay; it expires by itself if its
  holder dies.

Copies announce new and rejected generations on a pub/sub channel, so each drops its local
copy of a token as soon as another copy has replaced it or seen MobilePay refuse it; a
refused token is also deleted from Redis, so no copy adopts it again.

``<client>`` is derived from the client id and the key from the client secret: after a
credential rotation (:meth:`RedisTokenStore.rekey`) nothing stored before is read, and what
is stored after cannot be read with the old secret.

Redis is a help, never a dependency: any Redis failure raises :class:`StoreUnavailable`
(or is swallowed where nothing depends on it), the caller falls back to fetching on its own,
and a background task notices when Redis is back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis import asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.config import RedisStoreConfig
from proxy.metrics import Metrics
from proxy.tokens.store import SharedToken, StoreUnavailable

log = logging.getLogger(__name__)

# Releases the lock only for its owner: a holder whose lock expired and was taken over
# must not delete the new holder's lock.
_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# Stores a token unless a newer generation is stored (or was refused): the refresh lock can
# expire under a slow fetch, and the older token must not overwrite the newer one.
# KEYS: token, stored generation. ARGV: blob, generation, ttl in ms.
_SAVE = """
local stored = tonumber(redis.call('get', KEYS[2]) or '0')
if stored >= tonumber(ARGV[2]) then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('set', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""
# Deletes a refused token if it is the one stored (or older), and remembers the generation
# so that a late save of it is refused. KEYS: token, stored generation. ARGV: generation.
_REJECT = """
local stored = tonumber(redis.call('get', KEYS[2]) or '0')
if stored > tonumber(ARGV[1]) then return 0 end
redis.call('del', KEYS[1])
redis.call('set', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
# How long the generation of a refused token is remembered: longer than any token lives.
REJECTED_MEMORY_MS = 25 * 3600 * 1000
# How long, after a failure, the store is left alone before it is tried again.
RETRY_AFTER_FAILURE_SECONDS = 1.0
# How long the listener waits for an event before it looks whether to stop or re-subscribe.
LISTEN_SECONDS = 1.0
# Commands are few (per-merchant single flight), so a small pool suffices.
MAX_CONNECTIONS = 16


Listener = Callable[[str, str, int], None]


class RedisTokenStore:
    def __init__(
        self, config: RedisStoreConfig, client_id: str, client_secret: str, metrics: Metrics
    ) -> None:
        self.lock_seconds = config.lock_seconds
        self._metrics = metrics
        self._base_prefix = config.prefix
        self._prefix = self._channel = ""
        self._aead = AESGCM(bytes(32))
        self._use_credentials(client_id, client_secret)
        # Bursts wait for a free connection (up to the timeout) instead of failing.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=MAX_CONNECTIONS,
            timeout=config.timeout_seconds,
            password=config.password,
            socket_timeout=config.timeout_seconds,
            socket_connect_timeout=config.timeout_seconds,
            # One immediate retry covers a pooled connection that died with a restarted
            # server; more, with backoff, would only make an outage slower to notice.
            retry=Retry(NoBackoff(), 1),
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        # Pub/sub waits for messages indefinitely, so it gets a connection without a read
        # timeout; a periodic health check notices a dead server.
        self._events = aioredis.Redis.from_url(
            config.url,
            password=config.password,
            socket_connect_timeout=config.timeout_seconds,
            health_check_interval=5,
        )
        self._owner = secrets.token_hex(16)
        self._down_since: float | None = None
        self._listener: Listener | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def __repr__(self) -> str:
        return f"RedisTokenStore(prefix={self._prefix!r})"

    async def start(self, listener: Listener) -> None:
        self._listener = listener
        self._task = asyncio.get_running_loop().create_task(self._listen())

    def rekey(self, client_id: str, client_secret: str) -> None:
        """Use the keys of new credentials from now on: their own prefix, channel and AES key.

        Nothing stored under the old credentials is read again, and the old secret cannot
        decrypt what is stored from now on.
        """
        # The listener notices the new channel within a second and subscribes to it.
        self._use_credentials(client_id, client_secret)

    def _use_credentials(self, client_id: str, client_secret: str) -> None:
        client = hashlib.sha256(client_id.encode()).hexdigest()[:16]
        self._prefix = f"{self._base_prefix}:{client}"
        self._channel = f"{self._prefix}:events"
        self._aead = AESGCM(derive_key(client_id, client_secret))

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # The listener also stops by itself within a second, should a cancellation be
            # lost inside the Redis client.
            await asyncio.wait([self._task], timeout=LISTEN_SECONDS + 1)
        await self._redis.aclose()
        await self._pool.disconnect()
        await self._events.aclose()

    def available(self) -> bool:
        """False for a short while after a failure, so a dead Redis costs no timeouts."""
        return (
            self._down_since is None
            or time.monotonic() - self._down_since > RETRY_AFTER_FAILURE_SECONDS
        )

    async def load(self, vat: str) -> SharedToken | None:
        key, aead = self._key(vat), self._aead
        blob = await self._call("load", self._redis.get(key))
        if blob is None:
            return None
        try:
            data = json.loads(_open(aead, key, blob))
            return SharedToken(
                value=str(data["value"]),
                generation=int(data["generation"]),
                refresh_at=float(data["refresh_at"]),
                expires_at=float(data["expires_at"]),
            )
        except (InvalidTag, ValueError, KeyError, TypeError):
            # Written with another secret, or tampered with: as good as absent.
            log.warning("ignoring an undecryptable token for merchant %s in Redis", vat)
            return None

    async def save(self, vat: str, token: SharedToken) -> None:
        """Store and announce a new token unless a newer one is stored; a failure only costs
        the other copies a fetch."""
        ttl_ms = int((token.expires_at - time.time()) * 1000)
        if ttl_ms <= 0:
            return
        plain = json.dumps(
            {
                "value": token.value,
                "generation": token.generation,
                "refresh_at": token.refresh_at,
                "expires_at": token.expires_at,
            }
        ).encode()
        key = self._key(vat)
        nonce = os.urandom(12)
        blob = nonce + self._aead.encrypt(nonce, plain, key.encode())
        with contextlib.suppress(StoreUnavailable):
            saved = await self._call(
                "save",
                self._redis.eval(
                    _SAVE, 2, key, self._key(vat, "stored"), blob, token.generation, ttl_ms
                ),
            )
            if saved:
                await self._announce("new", vat, token.generation)

    async def next_generation(self, vat: str) -> int:
        generation = await self._call("generation", self._redis.incr(self._key(vat, "generation")))
        return int(generation)

    async def lock(self, vat: str) -> str | None:
        """The lock's owner value if this copy got the lock, else None."""
        owner = f"{self._owner}:{secrets.token_hex(4)}"
        got = await self._call(
            "lock",
            self._redis.set(
                self._key(vat, "lock"), owner, nx=True, px=int(self.lock_seconds * 1000)
            ),
        )
        return owner if got else None

    async def unlock(self, vat: str, owner: str) -> None:
        # On failure the lock expires by itself.
        with contextlib.suppress(StoreUnavailable):
            await self._call("unlock", self._redis.eval(_UNLOCK, 1, self._key(vat, "lock"), owner))

    async def report_rejected(self, vat: str, generation: int) -> None:
        """Delete the refused generation from Redis and tell the other copies."""
        with contextlib.suppress(StoreUnavailable):
            await self._call(
                "reject",
                self._redis.eval(
                    _REJECT,
                    2,
                    self._key(vat),
                    self._key(vat, "stored"),
                    generation,
                    REJECTED_MEMORY_MS,
                ),
            )
            await self._announce("rejected", vat, generation)

    def _key(self, vat: str, suffix: str = "") -> str:
        return f"{self._prefix}:{vat}:{suffix}" if suffix else f"{self._prefix}:{vat}"

    async def _announce(self, kind: str, vat: str, generation: int) -> None:
        await self._call(
            "publish", self._redis.publish(self._channel, f"{kind} {vat} {generation}")
        )

    async def _call(self, operation: str, command: Any) -> Any:
        try:
            result = await command
        except (RedisError, OSError) as exc:
            self._metrics.token_store_errors.labels(operation).inc()
            self._mark_down(operation, exc)
            raise StoreUnavailable(operation) from None
        self._mark_up()
        return result

    def _mark_down(self, operation: str, exc: BaseException) -> None:
        if self._down_since is None:
            # Once per outage; the metric counts every failed operation.
            log.error(
                "token store unavailable (%s failed: %s); fetching tokens without it",
                operation,
                type(exc).__name__,
            )
            self._metrics.token_store_up.set(0)
        self._down_since = time.monotonic()

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning("token store available again")
            self._down_since = None
            self._metrics.token_store_up.set(1)

    async def _listen(self) -> None:
        while not self._closing:
            try:
                async with self._events.pubsub(ignore_subscribe_messages=True) as pubsub:
                    channel = self._channel
                    await pubsub.subscribe(channel)
                    self._mark_up()
                    # Until closed, or re-keyed: then the new credentials' channel.
                    while channel == self._channel and not self._closing:
                        message = await pubsub.get_message(timeout=LISTEN_SECONDS)
                        if message is not None:
                            self._dispatch(message.get("data"))
                        elif self._down_since is not None:
                            # Commands failed while events flow: find out when they recover.
                            with contextlib.suppress(StoreUnavailable):
                                await self._call("ping", self._redis.ping())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever broke, the listener must live on
                self._metrics.token_store_errors.labels("subscribe").inc()
                self._mark_down("subscribe", exc)
                await asyncio.sleep(RETRY_AFTER_FAILURE_SECONDS)

    def _dispatch(self, data: object) -> None:
        if not isinstance(data, bytes) or self._listener is None:
            return
        try:
            kind, vat, generation = data.decode().split(" ")
            self._listener(kind, vat, int(generation))
        except ValueError:
            log.warning("ignoring a malformed token store event")


def derive_key(client_id: str, client_secret: str) -> bytes:
    """The AES-256-GCM key tokens are stored under: only holders of the client secret can
    derive it (HKDF-SHA256 of the secret, salted, bound to the client id)."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"mobilepay-proxy token store v1",
        info=base64.b64encode(client_id.encode()),
    ).derive(client_secret.encode())


def open_sealed(key: bytes, redis_key: str, blob: bytes) -> bytes:
    """The plaintext of a stored token entry (JSON); raises ``InvalidTag`` for any other key,
    another Redis key, or a blob that was tampered with."""
    return _open(AESGCM(key), redis_key, blob)


def _open(aead: AESGCM, redis_key: str, blob: bytes) -> bytes:
    # A 12-byte nonce, then the ciphertext; the Redis key is the associated data, so an
    # entry moved to another merchant's key does not decrypt.
    return aead.decrypt(blob[:12], blob[12:], redis_key.encode())
