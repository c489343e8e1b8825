"""Settings of the local MobilePay simulator, parsed once into frozen objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_CLIENT_ID = "demo-client"
DEFAULT_CLIENT_SECRET = "demo-secret"
DEFAULT_IBM_CLIENT_ID = "demo-ibm-client"
# The issuer a real sandbox token carries, so code that reads claims sees
# the same values here as against MobilePay's sandbox.
DEFAULT_ISSUER = "https://api.sandbox.mobilepay.dk/integrator-authentication"


@dataclass(frozen=True, slots=True)
class FaultSettings:
    """Misbehaviour to inject; the admin API can change it while running.

    ``unauthorized_every`` answers every n-th PoS call with 401,
    ``unauthorized_next`` the next n PoS calls; ``error_rate`` (0..1) and
    ``errors_next`` answer PoS calls with 500 and a code in 2000-2999;
    ``token_errors_next`` does the same to the next token requests;
    ``latency_ms`` delays the token service, the PoS API and the user
    simulation alike.
    """

    unauthorized_every: int = 0
    unauthorized_next: int = 0
    latency_ms: int = 0
    error_rate: float = 0.0
    errors_next: int = 0
    token_errors_next: int = 0

    def __post_init__(self) -> None:
        for name in (
            "unauthorized_every",
            "unauthorized_next",
            "latency_ms",
            "errors_next",
            "token_errors_next",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be between 0 and 1")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """Where the private CA and the server certificate live, and for which names."""

    directory: Path = Path(".sandbox")
    hostnames: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SandboxSettings:
    host: str = "127.0.0.1"
    port: int = 8443
    # None serves plain HTTP, which only tests and debugging should want.
    tls: TlsSettings | None = field(default_factory=TlsSettings)
    client_id: str = DEFAULT_CLIENT_ID
    client_secret: str = field(default=DEFAULT_CLIENT_SECRET, repr=False)
    ibm_client_id: str = DEFAULT_IBM_CLIENT_ID
    token_lifetime_seconds: int = 3600
    issuer: str = DEFAULT_ISSUER
    audience: str = "pos"
    poll_delay_ms: int = 1000
    # How long a payment waits for the user before it expires.
    payment_expiry_seconds: int = 300
    faults: FaultSettings = field(default_factory=FaultSettings)
    # Seeds the 5xx dice so a run with a given error rate can be replayed.
    seed: int | None = None
    # How many recent requests GET /_sandbox/requests remembers.
    request_log_size: int = 200

    def __post_init__(self) -> None:
        if self.token_lifetime_seconds <= 0:
            raise ValueError("token_lifetime_seconds must be positive")
        if self.poll_delay_ms < 0:
            raise ValueError("poll_delay_ms must not be negative")
        if self.payment_expiry_seconds <= 0:
            raise ValueError("payment_expiry_seconds must be positive")
        if not (self.client_id and self.client_secret and self.ibm_client_id):
            raise ValueError("client_id, client_secret and ibm_client_id must not be empty")
