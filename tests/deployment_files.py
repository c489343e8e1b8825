"""Reading the deployment files as Docker and Compose read them, for the tests that check them.

``docker-compose.yml`` is read with its variables at their defaults, and the ``Dockerfile``
as a list of stages and instructions.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# -- Compose -----------------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|[A-Za-z_]\w*)"
)


def interpolate(value: Any) -> Any:
    """What Compose reads when no variable is set: ``${NAME:-default}`` becomes ``default``.

    A variable without a default would make ``docker compose up`` depend on the caller's
    environment, so it fails the test.
    """
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    if not isinstance(value, str):
        return value

    def default(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        if match.group("op") is None:
            pytest.fail(f"docker-compose.yml: {match.group(0)} in {value!r} has no default")
        return match.group("default")

    return _VARIABLE.sub(default, value)


@dataclass(frozen=True)
class Mount:
    kind: str  # "bind", "volume" or "secret"
    source: str
    target: PurePosixPath
    read_only: bool


@dataclass
class Compose:
    data: dict[str, Any]
    # Named volume -> a directory standing in for it.
    volume_dirs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def load(cls, volumes: Path) -> Compose:
        """The compose file, each named volume standing as a fresh directory under ``volumes``."""
        compose = cls(interpolate(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))))
        for volume in compose.data.get("volumes") or {}:
            compose.volume_dirs[volume] = volumes / volume
            compose.volume_dirs[volume].mkdir(parents=True)
        return compose

    @property
    def services(self) -> dict[str, Any]:
        services: dict[str, Any] = self.data["services"]
        return services

    def service(self, name: str) -> dict[str, Any]:
        assert name in self.services, f"docker-compose.yml has no {name!r} service"
        service: dict[str, Any] = self.services[name]
        return service

    def command(self, name: str) -> list[str]:
        return [str(word) for word in self.service(name)["command"]]

    def mounts(self, name: str) -> list[Mount]:
        service = self.service(name)
        mounts = []
        for entry in service.get("volumes", []):
            if isinstance(entry, str):
                source, target, *options = entry.split(":")
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
                read_only = "ro" in ",".join(options).split(",")
                mounts.append(Mount(kind, source, PurePosixPath(target), read_only))
            else:
                mounts.append(
                    Mount(
                        entry["type"],
                        entry["source"],
                        PurePosixPath(entry["target"]),
                        bool(entry.get("read_only", False)),
                    )
                )
        for entry in service.get("secrets", []):
            source = entry if isinstance(entry, str) else entry["source"]
            target = source if isinstance(entry, str) else entry.get("target", source)
            mounts.append(Mount("secret", source, PurePosixPath("/run/secrets") / target, True))
        return mounts

    def mount_at(self, name: str, target: PurePosixPath) -> Mount:
        for mount in self.mounts(name):
            if mount.target == target:
                return mount
        raise AssertionError(f"the {name} service mounts nothing at {target}")

    def host_path(self, name: str, container_path: PurePosixPath) -> Path | None:
        """Where a path inside the service's container comes from, or None if not mounted."""
        # The innermost mount wins, as in the container.
        for mount in sorted(self.mounts(name), key=lambda m: len(m.target.parts), reverse=True):
            if not container_path.is_relative_to(mount.target):
                continue
            rest = container_path.relative_to(mount.target)
            if mount.kind == "bind":
                return ROOT / mount.source / rest
            if mount.kind == "volume":
                return self.volume_dirs[mount.source] / rest
            if rest == PurePosixPath("."):
                return ROOT / str(self.data["secrets"][mount.source]["file"])
        return None

    def published(self, name: str) -> dict[int, list[str]]:
        """Container port -> the host addresses it is published on ("" for all)."""
        ports: dict[int, list[str]] = {}
        for entry in self.service(name).get("ports", []):
            if isinstance(entry, dict):
                container, host_ip = int(entry["target"]), entry.get("host_ip", "")
            else:
                parts = str(entry).split("/")[0].split(":")
                container = int(parts[-1])
                host_ip = parts[0] if len(parts) == 3 else ""
            ports.setdefault(container, []).append(host_ip)
        return ports

    def environment(self, name: str) -> dict[str, str]:
        environment = self.service(name).get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        return {key: str(value) for key, value in environment.items()}


# -- Dockerfile --------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for word, args in self.instructions if word == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"the stage from {self.base} has no {keyword}"
        return found[-1]

    def environment(self) -> dict[str, str]:
        """Every ``ENV key=value`` of the stage."""
        environment = {}
        for args in self.all("ENV"):
            for word in shlex.split(args):
                key, equals, value = word.partition("=")
                assert equals, f"ENV {args!r}: write key=value"
                environment[key] = value
        return environment


def stages() -> list[Stage]:
    lines: list[str] = []
    current = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    found: list[Stage] = []
    for line in lines:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            found.append(Stage(words[0], name))
        elif found:
            found[-1].instructions.append((keyword, args))
    return found


def exec_form(args: str) -> list[str]:
    words = json.loads(args)
    assert isinstance(words, list), f"{args!r} must be in exec form, so signals reach the proxy"
    return [str(word) for word in words]


def run_flags(args: str) -> tuple[dict[str, dict[str, str]], str]:
    """A RUN instruction's ``--mount=...`` flags (by target) and its shell command."""
    mounts: dict[str, dict[str, str]] = {}
    command = args
    while command.startswith("--"):
        flag, _, command = command.partition(" ")
        command = command.lstrip()
        name, _, value = flag[2:].partition("=")
        assert name == "mount", f"RUN {flag}: only --mount is understood here"
        options = dict(option.partition("=")[::2] for option in value.split(","))
        mounts[options["target"]] = options
    return mounts, command
