"""The one builder of proxy configurations: as data for ``parse_config``, or as a TOML file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.fakes import CLIENT_ID, CLIENT_SECRET, IBM_CLIENT_ID

MERCHANTS = {f"store-{n:03d}": f"DK{10000000 + n}" for n in range(1, 11)}


def proxy_config(token_url: str, api_url: str, ca_file: Path, **sections: Any) -> dict[str, Any]:
    """Loopback ports 0, the fakes' credentials, ten merchants; ``sections`` merge over that.

    A value of None removes the key (``mobilepay={"client_secret": None}``, say, to read the
    secret from a file or the environment instead).
    """
    data: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "metrics_host": "127.0.0.1",
            "metrics_port": 0,
            "drain_timeout_seconds": 2,
        },
        "mobilepay": {
            "api_base_url": api_url,
            "token_url": token_url,
            "ca_file": str(ca_file),
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "ibm_client_id": IBM_CLIENT_ID,
        },
        "routing": {"merchants": dict(MERCHANTS)},
        "upstream": {"timeout_seconds": 5},
    }
    for name, values in sections.items():
        if not isinstance(values, Mapping):  # a value where a table belongs
            data[name] = values
            continue
        table = data.setdefault(name, {})
        for key, value in values.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    return data


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(toml(data), encoding="utf-8")
    return path


def toml(data: Mapping[str, Any]) -> str:
    """TOML for the plain tables, strings, numbers, booleans and lists a configuration holds."""
    lines: list[str] = []
    _table(lines, [], data)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], path: list[str], table: Mapping[str, Any]) -> None:
    values = {key: value for key, value in table.items() if not isinstance(value, Mapping)}
    tables = {key: value for key, value in table.items() if isinstance(value, Mapping)}
    if path and (values or not tables):
        lines.append(f"[{'.'.join(_key(part) for part in path)}]")
    lines.extend(f"{_key(key)} = {_value(value)}" for key, value in values.items())
    for key, value in tables.items():
        _table(lines, [*path, key], value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")
