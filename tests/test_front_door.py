"""Dependencies through their front door: only names they export, no underscore attributes.

Every module of ``proxy/`` is read with :mod:`ast`. A name imported from a third-party
module, or an attribute taken from an imported third-party module, must be in that
module's ``__all__``; where a module has no ``__all__``, the name must be on the short,
documented list below. No code touches an attribute starting with ``_`` except on
``self``, ``cls`` or the project's own modules.
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "proxy"
OWN = "proxy"

# Public by the package's documentation although its module declares no ``__all__``.
DOCUMENTED: dict[str, frozenset[str]] = {
    # cryptography.io/en/latest/hazmat/primitives/: every one of these modules is a page of
    # the reference; cryptography declares no __all__ anywhere.
    "cryptography": frozenset({"x509"}),
    "cryptography.exceptions": frozenset({"InvalidSignature", "InvalidTag"}),
    "cryptography.hazmat.primitives": frozenset({"hashes", "serialization"}),
    "cryptography.hazmat.primitives.asymmetric": frozenset({"ec", "padding", "rsa"}),
    "cryptography.hazmat.primitives.asymmetric.ec": frozenset(
        {"EllipticCurvePrivateKey", "SECP256R1", "generate_private_key"}
    ),
    "cryptography.hazmat.primitives.asymmetric.padding": frozenset({"PKCS1v15"}),
    "cryptography.hazmat.primitives.asymmetric.rsa": frozenset(
        {"RSAPrivateKey", "generate_private_key"}
    ),
    "cryptography.hazmat.primitives.ciphers.aead": frozenset({"AESGCM"}),
    "cryptography.hazmat.primitives.kdf.hkdf": frozenset({"HKDF"}),
    # docs.aiohttp.org: the server is ``aiohttp.web`` ("Server Reference"); ``hdrs`` is in
    # aiohttp.__all__ but declares no __all__ of its own: the header names it spells.
    "aiohttp": frozenset({"web"}),
    "aiohttp.hdrs": frozenset({"AUTHORIZATION", "CACHE_CONTROL", "PRAGMA", "WWW_AUTHENTICATE"}),
    # redis-py.readthedocs.io "Asyncio", "Retry Helpers" and "Exceptions".
    "redis": frozenset({"asyncio"}),
    "redis.backoff": frozenset({"ExponentialBackoff", "NoBackoff"}),
    "redis.exceptions": frozenset(
        {"ConnectionError", "RedisError", "TimeoutError", "ResponseError", "WatchError"}
    ),
    "redis.asyncio.retry": frozenset({"Retry"}),
    # prometheus.github.io/client_python/collector/custom/ and /multiprocess/.
    "prometheus_client.registry": frozenset({"Collector", "CollectorRegistry"}),
    "prometheus_client.metrics_core": frozenset({"Metric"}),
    "prometheus_client.multiprocess": frozenset({"MultiProcessCollector", "mark_process_dead"}),
    # python-json-logger declares no __all__; its documented formatter class, as its
    # quickstart imports it (nhairs.github.io/python-json-logger).
    "pythonjsonlogger.json": frozenset({"JsonFormatter"}),
}


@dataclass(frozen=True)
class Finding:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def _modules(package: Path) -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(package.rglob("*.py")):
        name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
        yield name.removesuffix(".__init__"), ast.parse(path.read_text(), str(path))


def _third_party(module: str) -> bool:
    top = module.partition(".")[0]
    return top != OWN and top not in sys.stdlib_module_names


# A named tuple's methods start with an underscore only to stay clear of its fields.
NAMED_TUPLE_METHODS = frozenset({"_replace", "_asdict", "_fields", "_make"})


def _exported(module: ModuleType, name: str) -> bool:
    documented = DOCUMENTED.get(module.__name__, frozenset())
    return name in getattr(module, "__all__", ()) or name in documented


def _is_module(module: ModuleType, name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"{module.__name__}.{name}")
    except ImportError:
        return None


def findings(package: Path = PACKAGE) -> list[Finding]:
    """Every import or attribute of ``package`` that goes past a dependency's front door."""
    found: list[Finding] = []
    for current, tree in _modules(package):
        modules: dict[str, ModuleType] = {}  # local name -> third-party module
        own_modules: set[str] = set()
        for node in ast.walk(tree):
            where = f"{current}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(Finding(where, f"import {alias.name}: a private module"))
                    if not _third_party(alias.name):
                        own_modules.add(alias.asname or alias.name.partition(".")[0])
                        continue
                    local = alias.asname or alias.name.partition(".")[0]
                    target = alias.name if alias.asname else local
                    modules[local] = importlib.import_module(target)
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level or not _third_party(source):
                    own_modules.update(alias.asname or alias.name for alias in node.names)
                    continue
                if any(part.startswith("_") for part in source.split(".")):
                    found.append(Finding(where, f"from {source}: a private module"))
                    continue
                module = importlib.import_module(source)
                for alias in node.names:
                    if alias.name.startswith("_"):
                        found.append(Finding(where, f"from {source} import {alias.name}: private"))
                        continue
                    submodule = _is_module(module, alias.name)
                    if submodule is not None:
                        if not _exported(module, alias.name):
                            found.append(
                                Finding(where, f"from {source} import {alias.name}: not exported")
                            )
                        modules[alias.asname or alias.name] = submodule
                    elif not _exported(module, alias.name):
                        found.append(
                            Finding(where, f"from {source} import {alias.name}: not exported")
                        )
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            where = f"{current}:{node.lineno}"
            base = node.value
            if isinstance(base, ast.Name) and base.id in modules:
                module = modules[base.id]
                if _is_module(module, node.attr) is None and not _exported(module, node.attr):
                    found.append(Finding(where, f"{module.__name__}.{node.attr}: not exported"))
            if (
                not node.attr.startswith("_")
                or (node.attr.startswith("__") and node.attr.endswith("__"))
                or node.attr in NAMED_TUPLE_METHODS
            ):
                continue
            if isinstance(base, ast.Name) and (
                base.id in ("self", "cls") or base.id in own_modules
            ):
                continue
            found.append(Finding(where, f"{ast.unparse(node)}: an underscore attribute"))
    return found


@functools.cache
def proxy_findings() -> tuple[Finding, ...]:
    """``findings()`` of proxy/, from a fresh interpreter.

    CPython 3.11.7's ast module can fail with "AST constructor recursion depth mismatch"
    when it runs deep inside a long test session; a new process has a clean stack.
    """
    script = (
        "import json; from tests.test_front_door import findings; "
        "print(json.dumps([[f.where, f.what] for f in findings()]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
    )
    return tuple(Finding(where, what) for where, what in json.loads(result.stdout))


def test_dependencies_are_used_through_their_front_door() -> None:
    problems = [str(finding) for finding in proxy_findings()]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("from aiohttp.base_protocol import BaseProtocol\n", "not exported"),
        ("from aiohttp import _http_parser\n", "private"),
        ("import aiohttp\naiohttp.BaseProtocol\n", "not exported"),
        ("import aiohttp\nsession = aiohttp.ClientSession()\nsession._retry_connection = 0\n", "_"),
    ],
)
def test_the_checker_notices_a_back_door(source: str, problem: str, tmp_path: Path) -> None:
    package = tmp_path / OWN
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sneaky.py").write_text(source)
    assert any(problem in finding.what for finding in findings(package))
