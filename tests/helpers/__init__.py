"""What the tests share: the secret guard, ports, configurations, processes and raw HTTP."""

from __future__ import annotations

from pathlib import Path

# The repository: where ``python -m proxy`` runs and the shipped config/ files live.
ROOT = Path(__file__).resolve().parents[2]
