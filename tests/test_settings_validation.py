"""Settings that would break the proxy at run time are refused when the file is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, parse_config
from tests.conftest import Exposure
from tests.helpers.configs import proxy_config

FLOAT_SETTINGS = [
    ("server", "drain_timeout_seconds"),
    ("server", "body_timeout_seconds"),
    ("server", "header_timeout_seconds"),
    ("server", "keepalive_timeout_seconds"),
    ("upstream", "connect_timeout_seconds"),
    ("upstream", "timeout_seconds"),
    ("upstream", "keepalive_timeout_seconds"),
    ("tokens", "refresh_ahead_seconds"),
    ("tokens", "expiry_margin_seconds"),
    ("tokens", "timeout_seconds"),
    ("tokens", "backoff_initial_seconds"),
    ("tokens", "backoff_max_seconds"),
    ("tokens", "unready_after_seconds"),
    ("tokens", "unauthorized_cooldown_seconds"),
    ("tokens", "redis_lock_seconds"),
    ("tokens", "redis_timeout_seconds"),
]


def _parse(tmp_path: Path, **sections: Any) -> Any:
    ca = tmp_path / "ca.pem"
    ca.write_text("unused")
    data = proxy_config("https://127.0.0.1/token", "https://127.0.0.1", ca)
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_config(data, base_dir=tmp_path, environ={})


@pytest.mark.parametrize(("table", "key"), FLOAT_SETTINGS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e12])
def test_non_finite_and_absurd_numbers_are_refused(
    tmp_path: Path, table: str, key: str, value: float
) -> None:
    with pytest.raises(ConfigError, match=rf"\[{table}\] {key} must"):
        _parse(tmp_path, **{table: {key: value}})


def test_every_float_setting_is_covered(tmp_path: Path) -> None:
    # Each listed setting exists (a typo would be an unknown key) and accepts a sane value.
    for table, key in FLOAT_SETTINGS:
        _parse(tmp_path, **{table: {key: 1 if key != "redis_timeout_seconds" else 0.1}})


def test_the_refresh_lock_must_outlive_a_token_fetch(tmp_path: Path) -> None:
    store = {"store": "redis://127.0.0.1:1/0"}
    with pytest.raises(ConfigError, match=r"redis_lock_seconds .* must exceed"):
        _parse(tmp_path, tokens={**store, "redis_lock_seconds": 10, "timeout_seconds": 10})
    with pytest.raises(ConfigError, match=r"redis_lock_seconds"):
        _parse(tmp_path, tokens={**store, "redis_lock_seconds": 3, "timeout_seconds": 2})
    # The defaults agree with each other.
    config = _parse(tmp_path, tokens=store)
    assert config.tokens.store.lock_seconds > config.tokens.timeout_seconds


def test_the_metrics_port_listens_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("unused")
    data = proxy_config("https://127.0.0.1/token", "https://127.0.0.1", ca)
    del data["server"]["metrics_host"]
    assert parse_config(data, base_dir=tmp_path, environ={}).server.metrics_host == "127.0.0.1"


def test_check_config_shows_the_metrics_port_on_loopback_by_default(
    tmp_path: Path, exposure: Exposure
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[mobilepay]\nclient_id = "id"\nclient_secret = "s"\nibm_client_id = "i"\n'
        '[routing.merchants]\n"store-1" = "DK12345678"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    exposure.texts += [result.stdout, result.stderr]
    assert result.returncode == 0, result.stderr
    assert "metrics:          127.0.0.1:9180" in result.stdout
