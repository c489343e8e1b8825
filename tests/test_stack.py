"""The compose stack as shipped, run without a Docker engine.

The image is built as the ``Dockerfile`` builds it: the build stage's ``RUN`` commands make
the wheels, and the runtime stage's install them into a fresh virtualenv standing in for the
image. Then every service of ``docker-compose.yml`` (``--profile demo``, Grafana aside) runs
natively on loopback with its own command line, environment and configuration files, in the
order its ``depends_on`` gives, each waited for as its condition says (health checks are the
services' own commands). The only changes are the ones a container supplies:

- a service's name, or a wildcard address it listens on, becomes 127.0.0.1;
- each (service, container port) becomes a free local port;
- each path inside a container becomes a file under a temporary directory: bind mounts and
  secrets are copies, named volumes directories shared by the services that mount them.

All of it is read from ``docker-compose.yml``, the ``Dockerfile`` and the mounted
configuration files, so a change to them is what runs here. Configuration copies are
rewritten only where a mapped value stands; the test checks that nothing else differs.

It passes when the demo's payment completes through the first replica, the second replica
serves the same merchant with the token the first one fetched (the simulator counts one
token request for the VAT across both, so it came through Redis), and Prometheus scrapes
both replicas and has loaded the alert rules.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import itertools
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import Exposure
from tests.deployment_files import ROOT, Compose, Stage, exec_form, run_flags, stages
from tests.helpers.ports import unused_port
from tests.helpers.processes import MACHINE_ENVIRON

# Installs the image's packages and starts the whole stack: 80-100 s, more on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LOOPBACK = "127.0.0.1"
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
# Inside a container these name the container itself.
OWN_HOSTS = frozenset({"127.0.0.1", "localhost"})
# As in the README: docker compose --profile demo up.
PROFILES = frozenset({"demo"})
# Not run here: Grafana needs its own server; test_deployment.py checks its provisioning.
NOT_RUN = frozenset({"grafana"})
# What the Dockerfile's RUN commands may call: run with paths mapped, or skipped because
# they set up users and ownership, which only a Docker engine can show.
RUNNABLE = frozenset({"pip", "python", "cp", "mkdir"})
ENGINE_ONLY = frozenset({"groupadd", "useradd", "chown"})
# The host environment a build step may keep: how this machine reaches the package index.
NETWORK_ENVIRONMENT = (
    "PIP_CERT",
    "PIP_DEFAULT_TIMEOUT",
    "SSL_CERT_FILE",
    "HTTPS_PROXY",
    "https_proxy",
    "NO_PROXY",
    "no_proxy",
)
BUILD_SECONDS = 600
START_SECONDS = 60.0
DEMO_SECONDS = 120.0
# Prometheus scrapes every 15 s, as shipped; the first scrape may take that long to come.
SCRAPE_SECONDS = 60.0
URL_PATTERN = r"(?P<scheme>[a-z][a-z0-9+]*)://(?P<host>[A-Za-z0-9.-]+)(?::(?P<port>\d+))?"
PATH_PATTERN = r"(?<![\w.:/-])(?P<path>/[\w.-]+(?:/[\w.*-]+)*/?)"


@dataclass(frozen=True)
class Image:
    """Another project's image, natively: its binary's default command and listening port."""

    command: tuple[str, ...]
    port: int
    listen: Callable[[int], list[str]]


IMAGES: Mapping[str, Image] = {
    # docker-entrypoint.sh execs the service's command.
    "redis": Image(("redis-server",), 6379, lambda port: ["--bind", LOOPBACK, "--port", str(port)]),
    # The image's ENTRYPOINT and CMD.
    "prom/prometheus": Image(
        (
            "prometheus",
            "--config.file=/etc/prometheus/prometheus.yml",
            "--storage.tsdb.path=/prometheus",
        ),
        9090,
        lambda port: [f"--web.listen-address={LOOPBACK}:{port}"],
    ),
}


def _image(service: Mapping[str, Any]) -> Image:
    repository = str(service["image"]).rsplit(":", 1)[0]
    assert repository in IMAGES, f"no native stand-in for the image {service['image']!r}"
    return IMAGES[repository]


# -- The image ---------------------------------------------------------------------


@dataclass
class Build:
    """The Dockerfile's stages run natively: one directory per stage's file system."""

    root: Path

    def filesystem(self, stage: Stage, index: int) -> Path:
        return self.root / (stage.name or f"stage-{index}") / "fs"

    def python(self, stage: Stage, index: int) -> Path:
        """A fresh virtualenv standing in for the stage's base image's Python."""
        venv = self.root / (stage.name or f"stage-{index}") / "python"
        if not venv.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        return venv / "bin"

    def run(self, found: list[Stage]) -> Path:
        """Every stage; returns the bin directory of the final stage's Python."""
        by_name = {stage.name: index for index, stage in enumerate(found) if stage.name}
        for index, stage in enumerate(found):
            fs = self.filesystem(stage, index)
            fs.mkdir(parents=True)
            bin_dir = self.python(stage, index)
            workdir = PurePosixPath("/")
            environment = {
                "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                # The image has no pip configuration; this machine's must not change the build.
                "PIP_CONFIG_FILE": os.devnull,
                **{
                    name: MACHINE_ENVIRON[name]
                    for name in NETWORK_ENVIRONMENT
                    if name in MACHINE_ENVIRON
                },
                **stage.environment(),
            }
            for keyword, args in stage.instructions:
                if keyword == "WORKDIR":
                    workdir = workdir / args
                    (fs / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)
                elif keyword == "COPY":
                    self._copy(args, fs / workdir.relative_to("/"))
                elif keyword == "RUN":
                    mounts, command = run_flags(args)
                    sources = {
                        PurePosixPath(target): self.filesystem(
                            found[by_name[options["from"]]], by_name[options["from"]]
                        )
                        / PurePosixPath(options.get("source", "/")).relative_to("/")
                        for target, options in mounts.items()
                        if options.get("type") == "bind" and "from" in options
                    }
                    self._run(command, fs, sources, fs / workdir.relative_to("/"), environment)
        return self.python(found[-1], len(found) - 1)

    def _copy(self, args: str, destination: Path) -> None:
        words = args.split()
        assert not any(word.startswith("--") for word in words), f"COPY {args}: not supported"
        *sources, target = words
        into = destination / target
        for source in sources:
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, into if len(sources) == 1 else into / path.name)
            else:
                into.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into / path.name)

    def _run(
        self,
        command: str,
        fs: Path,
        sources: Mapping[PurePosixPath, Path],
        cwd: Path,
        environment: Mapping[str, str],
    ) -> None:
        def local(match: re.Match[str]) -> str:
            path = PurePosixPath(match.group("path"))
            for target, source in sources.items():
                if path.is_relative_to(target):
                    return str(source / path.relative_to(target))
            return str(fs / path.relative_to("/"))

        for step in command.split("&&"):
            program = step.split()[0]
            if program in ENGINE_ONLY:
                continue
            assert program in RUNNABLE, f"the Dockerfile runs {program!r}: teach this test it"
            native = re.sub(PATH_PATTERN, local, step)
            result = subprocess.run(
                ["sh", "-c", native],
                cwd=cwd,
                env=dict(environment),
                capture_output=True,
                text=True,
                timeout=BUILD_SECONDS,
                check=False,
            )
            assert result.returncode == 0, (
                f"RUN {step.strip()} failed ({result.returncode}):\n{result.stderr[-3000:]}"
            )


# -- Mapping the stack onto loopback ------------------------------------------------


@dataclass
class Stack:
    """Where each service's names, ports and paths land on this machine."""

    compose: Compose
    root: Path
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    def port(self, service: str, container_port: int) -> int:
        key = (service, container_port)
        if key not in self.ports:
            self.ports[key] = unused_port()
        return self.ports[key]

    def container_ports(self, service: str, image: Stage) -> set[int]:
        ports = set(self.compose.published(service))
        definition = self.compose.service(service)
        if "build" in definition:
            ports |= {int(p.split("/")[0]) for args in image.all("EXPOSE") for p in args.split()}
        else:
            ports.add(_image(definition).port)
        return ports

    def filesystem(self, service: str) -> Path:
        return self.root / "services" / service

    def mounted(self, service: str, path: PurePosixPath) -> bool:
        definition = self.compose.service(service)
        targets = [mount.target for mount in self.compose.mounts(service)]
        targets += [PurePosixPath(tmpfs) for tmpfs in definition.get("tmpfs", [])]
        return any(path.is_relative_to(target) for target in targets)

    def host(self, service: str, host: str) -> str | None:
        """The service a host name means inside ``service``'s container, if any."""
        if host in OWN_HOSTS or host in WILDCARD_HOSTS:
            return service
        return host if host in self.compose.services else None

    def text(self, service: str, text: str) -> str:
        """``text`` as ``service`` would mean it here: URLs, ``host:port`` and paths mapped."""
        names = "|".join(re.escape(name) for name in sorted(self.compose.services, key=len)[::-1])
        pattern = (
            rf"(?P<url>{URL_PATTERN})"
            rf"|(?<![\w/.-])(?P<near>{names}|localhost|127\.0\.0\.1):(?P<near_port>\d+)\b"
            rf"|{PATH_PATTERN}"
        )

        def mapped(match: re.Match[str]) -> str:
            if match.group("url"):
                target = self.host(service, match.group("host"))
                if target is None:
                    return match.group(0)
                assert match.group("port"), f"{text!r}: name the port of {target}"
                port = self.port(target, int(match.group("port")))
                return f"{match.group('scheme')}://{LOOPBACK}:{port}"
            if match.group("near"):
                target = self.host(service, match.group("near"))
                assert target is not None
                return f"{LOOPBACK}:{self.port(target, int(match.group('near_port')))}"
            path = PurePosixPath(match.group("path"))
            if not self.mounted(service, path):
                return match.group(0)
            return str(self.filesystem(service) / path.relative_to("/"))

        return re.sub(pattern, mapped, text)

    def word(self, service: str, word: str, ports: set[int], *, bare: bool = True) -> str:
        """An argument or a value; ``bare``: one that may be a lone host name or port."""
        if word.startswith("--") and "=" in word:
            flag, _, option = word.partition("=")
            return f"{flag}={self.word(service, option, ports)}"
        if not bare:
            return self.text(service, word)
        if word in WILDCARD_HOSTS or word in self.compose.services:
            return LOOPBACK
        if word.isdigit() and int(word) in ports:
            return str(self.port(service, int(word)))
        return self.text(service, word)

    def value(self, service: str, key: str, value: Any, ports: set[int]) -> Any:
        """A configuration file's value: hosts and ports are under keys named so."""
        if isinstance(value, dict):
            return {name: self.value(service, name, item, ports) for name, item in value.items()}
        if isinstance(value, list):
            return [self.value(service, key, item, ports) for item in value]
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and key.endswith("port") and value in ports:
            return self.port(service, value)
        if isinstance(value, str):
            return self.word(service, value, ports, bare=key.endswith("host"))
        return value

    def materialise(self, service: str, ports: set[int]) -> None:
        """The service's mounts under its directory; configuration files mapped."""
        fs = self.filesystem(service)
        fs.mkdir(parents=True)
        definition = self.compose.service(service)
        for tmpfs in definition.get("tmpfs", []):
            (fs / PurePosixPath(tmpfs).relative_to("/")).mkdir(parents=True, exist_ok=True)
        for mount in self.compose.mounts(service):
            local = fs / mount.target.relative_to("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            source = self.compose.host_path(service, mount.target)
            assert source is not None
            if mount.kind == "volume":
                local.symlink_to(source, target_is_directory=True)
            elif source.is_dir():
                shutil.copytree(source, local)
            else:
                shutil.copy2(source, local)
                self._rewrite(service, local, ports)

    def _rewrite(self, service: str, path: Path, ports: set[int]) -> None:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            original: Any = tomllib.loads(text)
            rewritten = _rewrite_toml(text, lambda k, v: self.value(service, k, v, ports))
            new: Any = tomllib.loads(rewritten)
        elif path.suffix in (".yml", ".yaml"):
            original = yaml.safe_load(text)
            new = self.value(service, "", original, ports)
            rewritten = yaml.safe_dump(new, sort_keys=False) if new != original else text
        else:
            return
        assert new == self.value(service, "", original, ports), f"{path.name}: rewrite differs"
        path.write_text(rewritten, encoding="utf-8")

    def command(self, service: str, image: Stage, venv: Path) -> list[str]:
        definition = self.compose.service(service)
        ports = self.container_ports(service, image)
        if "build" in definition:
            entrypoint = exec_form(image.last("ENTRYPOINT"))
            words = definition.get("command") or exec_form(image.last("CMD"))
            argv = [str(venv / entrypoint[0]), *entrypoint[1:], *map(str, words)]
            listen: list[str] = []
        else:
            native = _image(definition)
            argv = list(map(str, definition.get("command") or native.command))
            binary = shutil.which(argv[0])
            assert binary is not None, f"{argv[0]} is not installed: make test-tools installs it"
            argv[0] = binary
            listen = native.listen(self.port(service, native.port))
        return [*self.arguments(service, argv, ports), *listen]

    def arguments(self, service: str, argv: list[str], ports: set[int]) -> list[str]:
        """A command line: the program kept, each argument mapped."""
        words = [
            self.word(service, word, ports, bare=before.startswith("-"))
            for before, word in itertools.pairwise(argv)
        ]
        return [argv[0], *words]

    def environment(self, service: str, image: Stage, venv: Path) -> dict[str, str]:
        definition = self.compose.service(service)
        environment = {"PATH": f"{venv}{os.pathsep}{os.environ['PATH']}"}
        if "build" in definition:
            environment.update(image.environment())
        ports = self.container_ports(service, image)
        for name, value in self.compose.environment(service).items():
            environment[name] = self.word(service, value, ports)
        if "/tmp" in definition.get("tmpfs", []):
            environment["TMPDIR"] = str(self.filesystem(service) / "tmp")
        return environment


_TOML_ASSIGNMENT = re.compile(r"^(?P<key>\s*[A-Za-z0-9_\"'.-]+\s*=\s*)")


def _rewrite_toml(text: str, mapped: Callable[[str, Any], Any]) -> str:
    """Each one-line ``key = value`` whose value the mapping changes, rewritten in place."""
    lines = []
    for line in text.splitlines():
        match = _TOML_ASSIGNMENT.match(line)
        if match is not None and not line.lstrip().startswith("["):
            try:
                ((key, value),) = tomllib.loads(line).items()
            except (tomllib.TOMLDecodeError, ValueError):
                pass
            else:
                new = mapped(key, value)
                if new != value and isinstance(new, str | int):
                    line = match.group("key") + json.dumps(new)
        lines.append(line)
    return "\n".join(lines) + "\n"


# -- Running it --------------------------------------------------------------------


@dataclass
class Running:
    """The stack: where it is mapped, the image it runs, and its processes."""

    stack: Stack
    image: Stage
    venv: Path
    processes: list[Process] = field(default_factory=list)


@dataclass
class Process:
    name: str
    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


def _start_order(compose: Compose) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle through {name}"
        if name in order:
            return
        depends = compose.service(name).get("depends_on", {})
        for dependency in depends if isinstance(depends, list) else list(depends):
            if dependency in compose.services:
                visit(dependency, (*path, name))
        order.append(name)

    for name, service in compose.services.items():
        profiles = set(service.get("profiles", []))
        if name not in NOT_RUN and (not profiles or profiles & PROFILES):
            visit(name, ())
    return order


def _conditions(compose: Compose, name: str) -> dict[str, str]:
    depends = compose.service(name).get("depends_on", {})
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {
        dependency: spec.get("condition", "service_started") for dependency, spec in depends.items()
    }


@pytest.fixture
async def running(tmp_path: Path, exposure: Exposure) -> AsyncIterator[Running]:
    found = stages()
    venv = Build(tmp_path / "image").run(found)
    assert (venv / "mobilepay-proxy").exists(), "the image has no mobilepay-proxy command"
    running = Running(Stack(Compose.load(tmp_path / "volumes"), tmp_path), found[-1], venv)
    try:
        yield running
    finally:
        for started in reversed(running.processes):
            if started.process.returncode is None:
                started.process.terminate()
                try:
                    await asyncio.wait_for(started.process.wait(), 15)
                except TimeoutError:
                    started.process.kill()
                    await started.process.wait()
            exposure.texts.append(started.output())


async def _start(running: Running, name: str) -> Process:
    stack = running.stack
    stack.materialise(name, stack.container_ports(name, running.image))
    argv = stack.command(name, running.image, running.venv)
    log = stack.root / "logs" / f"{name}.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("wb") as handle:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=stack.filesystem(name),
            env=stack.environment(name, running.image, running.venv),
        )
    started = Process(name, process, log)
    running.processes.append(started)
    return started


async def _healthy(running: Running, name: str) -> bool:
    """The service's own health check, as Compose runs it, succeeds."""
    stack, image = running.stack, running.image
    definition = stack.compose.service(name)
    test = definition.get("healthcheck", {}).get("test")
    if test is None and "build" in definition:
        test = ["CMD", *exec_form(image.last("HEALTHCHECK").split(" CMD ", 1)[1])]
    assert test, f"{name} has no health check"
    assert test[0] == "CMD", f"{name}: a health check in exec form is expected"
    ports = stack.container_ports(name, image)
    argv = stack.arguments(name, [str(word) for word in test[1:]], ports)
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=stack.environment(name, image, running.venv),
    )
    return await process.wait() == 0


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(LOOPBACK, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def _wait_until(running: Running, what: str, check: Callable[[], Awaitable[bool]]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_SECONDS
    while loop.time() < deadline:
        for started in running.processes:
            if started.process.returncode is not None:
                pytest.fail(
                    f"{started.name} exited with {started.process.returncode} while waiting "
                    f"for {what}:\n{started.output()[-3000:]}",
                    pytrace=False,
                )
        if await check():
            return
        await asyncio.sleep(0.25)
    pytest.fail(f"{what}: not within {START_SECONDS:.0f} s", pytrace=False)


async def _start_all(running: Running) -> dict[str, Process]:
    """Every service in depends_on order, each dependency waited for as its condition says."""
    compose = running.stack.compose
    started: dict[str, Process] = {}
    for name in _start_order(compose):
        for dependency, condition in _conditions(compose, name).items():
            if dependency not in started:
                continue
            if condition == "service_healthy":
                healthy = functools.partial(_healthy, running, dependency)
                await _wait_until(running, f"{dependency} healthy", healthy)
            elif "build" not in compose.service(dependency):
                # Started, and listening: a proxy that starts before Redis listens fetches
                # its own tokens until it notices Redis, which is not the case tested here.
                port = running.stack.port(dependency, _image(compose.service(dependency)).port)
                listening = functools.partial(_listening, port)
                await _wait_until(running, f"{dependency} listening", listening)
        started[name] = await _start(running, name)
    return started


def _config_files(running: Running, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The proxy's configuration as shipped, and as mapped here."""
    stack = running.stack
    argv = stack.compose.service(name).get("command") or exec_form(running.image.last("CMD"))
    target = PurePosixPath(argv[argv.index("--config") + 1])
    shipped = stack.compose.host_path(name, target)
    assert shipped is not None
    mapped = stack.filesystem(name) / target.relative_to("/")
    return (
        tomllib.loads(shipped.read_text(encoding="utf-8")),
        tomllib.loads(mapped.read_text(encoding="utf-8")),
    )


def _secrets(config: Mapping[str, Any]) -> Iterator[str]:
    mobilepay = config["mobilepay"]
    secret = Path(mobilepay["client_secret_file"]).read_text(encoding="utf-8").strip()
    yield secret
    yield base64.b64encode(f"{mobilepay['client_id']}:{secret}".encode()).decode()


async def _get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with session.get(url, **kwargs) as response:
        return response.status, await response.text()


async def test_the_compose_stack_runs_as_shipped(running: Running, exposure: Exposure) -> None:
    stack = running.stack
    started = await _start_all(running)

    demo = started["demo"]
    try:
        await asyncio.wait_for(demo.process.wait(), DEMO_SECONDS)
    except TimeoutError:
        pytest.fail(f"the demo did not finish within {DEMO_SECONDS:.0f} s:\n{demo.output()}")
    logs = "\n".join(f"--- {p.name}\n{p.output()[-2000:]}" for p in running.processes)
    assert demo.process.returncode == 0, f"the demo failed:\n{demo.output()}\n{logs}"
    assert "demo finished" in demo.output()

    shipped, config = _config_files(running, "proxy")
    exposure.tokens.update(_secrets(config))
    demo_command = stack.compose.command("demo")
    merchant = demo_command[demo_command.index("--merchant") + 1]
    vat = config["routing"]["merchants"][merchant]
    header = config["routing"].get("header", "X-Merchant-Id")
    sandbox = config["mobilepay"]["api_base_url"]
    tls = ssl.create_default_context(cafile=config["mobilepay"]["ca_file"])
    replicas = ("proxy", "proxy-2")
    metrics = {
        replica: f"http://{LOOPBACK}:{stack.port(replica, shipped['server']['metrics_port'])}"
        for replica in replicas
    }
    second = f"http://{LOOPBACK}:{stack.port('proxy-2', shipped['server']['port'])}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        status, body = await _get(
            session,
            f"{second}/pos/v10/stores/detailed",
            headers={header: merchant, "X-MobilePay-Client-System-Version": "1.0.0"},
        )
        exposure.texts.append(body)
        assert status == 200, f"the second replica answered {status} {body}"

        _, seen = await _get(session, f"{sandbox}/_sandbox/requests", ssl=tls)
        for request in json.loads(seen):
            for name, value in request["headers"]:
                if name.lower() == "authorization" and value.startswith("Bearer "):
                    exposure.tokens.add(value.removeprefix("Bearer "))
        _, stats = await _get(session, f"{sandbox}/_sandbox/stats", ssl=tls)
        assert json.loads(stats)["token_requests"]["by_merchant_vat"] == {vat: 1}, (
            "the replicas must share one token for the merchant through Redis"
        )
        for url in metrics.values():
            for path in ("/metrics", "/readyz"):
                exposure.texts.append((await _get(session, url + path))[1])

        prometheus = f"http://{LOOPBACK}:{stack.port('prometheus', IMAGES['prom/prometheus'].port)}"
        instances = {url.removeprefix("http://") for url in metrics.values()}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SCRAPE_SECONDS
        while True:
            _, answer = await _get(session, f"{prometheus}/api/v1/targets")
            targets = json.loads(answer)["data"]["activeTargets"]
            up = {target["labels"]["instance"] for target in targets if target["health"] == "up"}
            if instances <= up:
                break
            assert loop.time() < deadline, f"Prometheus reports {up} up, not {instances}"
            await asyncio.sleep(1)

        _, answer = await _get(session, f"{prometheus}/api/v1/rules")
        groups = json.loads(answer)["data"]["groups"]
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    alerts = yaml.safe_load((ROOT / "config" / "alerts.yml").read_text(encoding="utf-8"))
    shipped_alerts = {rule["alert"] for group in alerts["groups"] for rule in group["rules"]}
    assert shipped_alerts, "config/alerts.yml has no alerts"
    assert shipped_alerts <= loaded, f"rules not loaded: {sorted(shipped_alerts - loaded)}"
