"""The vendored PoS V10 description (tests/spec/pos.yaml) and checks against its schemas."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

SPEC_PATH = Path(__file__).parent / "spec" / "pos.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@functools.cache
def spec() -> dict[str, Any]:
    with SPEC_PATH.open(encoding="utf-8") as file:
        loaded: dict[str, Any] = yaml.safe_load(file)
    return loaded


def path_methods() -> dict[str, frozenset[str]]:
    """Every path template the description defines, with its methods (upper case)."""
    return {
        path: frozenset(name.upper() for name in operations if name in HTTP_METHODS)
        for path, operations in spec()["paths"].items()
    }


def error_response_problems(body: Any) -> list[str]:
    """Why ``body`` is not a complete ``ErrorResponse`` as the proxy must send it (empty: it is).

    The schema allows each property to be missing or null; the proxy always sends all three
    as strings, so this checks that too.
    """
    schema = spec()["components"]["schemas"]["ErrorResponse"]
    if not isinstance(body, dict):
        return [f"not an object: {body!r}"]
    properties: dict[str, Any] = schema["properties"]
    problems = []
    if schema.get("additionalProperties") is False:
        problems += [
            f"property {name!r} is not in the schema" for name in body if name not in properties
        ]
    for name, rules in properties.items():
        value = body.get(name)
        if rules.get("type") == "string" and not isinstance(value, str):
            problems.append(f"{name!r} is {value!r}, not a string")
        elif isinstance(value, str) and not value:
            problems.append(f"{name!r} is empty")
    return problems
