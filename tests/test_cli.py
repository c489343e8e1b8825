"""The command line as an operator uses it: real processes, real signals."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.cli import main
from tests.fakes import CLIENT_ID, CLIENT_SECRET, IBM_CLIENT_ID, PosServer, held_until
from tests.helpers.configs import proxy_config, write_config
from tests.helpers.exposure import SECRET_VALUES, Exposure
from tests.helpers.ports import refuses_connections
from tests.helpers.processes import PROXY, Processes
from tests.helpers.waiting import eventually

CONFIG_ERROR = "mobilepay-proxy: configuration error: "
UNREACHABLE = "https://127.0.0.1:1"


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], exposure: Exposure) -> Callable[..., Ran]:
    """``mobilepay-proxy ARGS`` through its entry point in this process: for the answers
    given before anything starts, where a new interpreter per case would only cost time."""

    def run(*args: str | Path) -> Ran:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        exposure.texts += [out, err]
        return Ran(code, out, err)

    return run


def _config(tmp_path: Path, ca_file: Path, **sections: Any) -> Path:
    """One merchant, the client secret in a file beside the configuration."""
    (tmp_path / "client_secret.txt").write_text(CLIENT_SECRET + "\n")
    sections.setdefault("mobilepay", {})
    sections["mobilepay"] = {
        "client_secret": None,
        "client_secret_file": "client_secret.txt",
        **sections["mobilepay"],
    }
    sections.setdefault("routing", {"merchants": {"store-001": "DK10000001"}})
    data = proxy_config(f"{UNREACHABLE}/t", UNREACHABLE, ca_file, **sections)
    return write_config(tmp_path / "proxy.toml", data)


def _assert_no_secret(text: str) -> None:
    for secret in (*SECRET_VALUES, CLIENT_ID):
        assert secret not in text


def test_check_config_prints_a_summary_without_secrets(
    tmp_path: Path, ca_file: Path, processes: Processes
) -> None:
    config = _config(tmp_path, ca_file)
    result = processes.run_proxy("check-config", "--config", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{config}: OK\n")
    assert "merchants:        1 keys, 1 VATs, 0 restricted to source networks" in result.stdout
    assert result.stderr == ""
    _assert_no_secret(result.stdout)


@pytest.mark.parametrize("command", ["sandbox", "demo"])
def test_the_simulator_commands_answer_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: mobilepay-proxy {command}")


def test_check_config_names_a_shared_store_without_its_password(
    tmp_path: Path, ca_file: Path, cli: Callable[..., Ran]
) -> None:
    store = "redis://:hunter2-redis@127.0.0.1:6390/0"
    config = _config(tmp_path, ca_file, tokens={"store": store, "redis_prefix": "shop-7"})
    result = cli("check-config", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "token store:      redis://127.0.0.1:6390/0 (prefix shop-7)" in result.stdout
    assert "hunter2" not in result.stdout


async def test_a_taken_port_is_one_line_and_exit_1(
    tmp_path: Path, ca_file: Path, processes: Processes
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _config(tmp_path, ca_file, server={"port": taken.getsockname()[1]})
        running = await processes.start(*PROXY, "--config", config)
        assert await running.wait() == 1
    (line,) = running.lines
    assert " ERROR proxy: cannot start: " in line
    assert line.lower().rstrip().endswith("address already in use")


@pytest.mark.parametrize(
    ("merchants", "sections", "expected"),
    [
        ({"store-002": "DK123"}, {}, "VAT 'DK123' must look like DK12345678"),
        ({"store 3": "DK12345678"}, {}, "the key must be 1-64 letters"),
        ({}, {"tuning": {"fast": True}}, "unknown key 'tuning'"),
        (
            {"store-004": {"vat": "DK12345678", "networks": ["10.0.0.0/33"]}},
            {},
            "'10.0.0.0/33' is not a network",
        ),
        ({"store-5": {"vat": "DK12345678", "nets": []}}, {}, "unknown key 'nets'"),
        (
            {"store-6": {"vat": "DK12345678", "networks": "10.0.0.0/8"}},
            {},
            "networks must be a list",
        ),
        ({}, {"server": {"metrics_port": 9180, "port": 9180}}, "port and metrics_port must differ"),
        (
            {},
            {"server": {"drain_timeout_seconds": "long"}},
            "drain_timeout_seconds must be a number",
        ),
        (
            {},
            {"server": {"drain_timeout_seconds": -1}},
            "drain_timeout_seconds must be a number from 0 to 3600, not -1",
        ),
        ({}, {"routing": {"header": " "}}, "[routing] header must be a non-empty string"),
        ({}, {"routing": {"header": "X Merchant"}}, "is not a valid header name"),
        ({}, {"routing": {"header": "Authorization"}}, "is reserved; choose another name"),
        ({}, {"routing": {"allowed_prefixes": []}}, "allowed_prefixes must be a non-empty list"),
        ({}, {"routing": {"allowed_prefixes": ["/pos/../"]}}, 'must look like "/pos/v10/"'),
        (
            {},
            {"mobilepay": {"api_base_url": "https://user:pw@mobilepay.example"}},
            "api_base_url must not carry credentials, a query or a fragment",
        ),
        (
            {},
            {"mobilepay": {"api_base_url": "https://mobilepay.example/pos"}},
            "api_base_url must be a bare origin",
        ),
        ({}, {"mobilepay": {"ca_file": "absent.pem"}}, "[mobilepay] ca_file: "),
        (
            {},
            {"mobilepay": {"client_secret_file": "absent.txt"}},
            "absent.txt: No such file or directory",
        ),
        (
            {},
            {"mobilepay": {"client_secret_file": "latin1.txt"}},
            "client_secret_file: cannot read",
        ),
        ({}, {"mobilepay": {"client_secret_file": "."}}, ": Is a directory"),
        (
            {},
            {"tokens": {"backoff_initial_seconds": 5, "backoff_max_seconds": 1}},
            "backoff_max_seconds must not be below backoff_initial_seconds",
        ),
        ({}, {"tokens": {"store": "memcached://x"}}, "[tokens] store must be"),
        (
            {},
            {"tokens": {"store": "redis://127.0.0.1:1/0", "redis_prefix": "a b"}},
            "redis_prefix must be 1-64 letters",
        ),
        (
            {},
            {"tokens": {"store": "redis://127.0.0.1:1/0", "redis_password_file": "absent"}},
            "[tokens] redis_password_file: cannot read",
        ),
        ({}, {"routing": {"merchants_file": "latin1.txt"}}, "merchants_file: cannot read"),
        ({}, {"server": 1}, "[server] must be a table"),
    ],
)
def test_bad_config_is_one_clear_line_and_exit_2(
    tmp_path: Path,
    ca_file: Path,
    cli: Callable[..., Ran],
    merchants: dict[str, Any],
    sections: dict[str, Any],
    expected: str,
) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    # Not UTF-8: the message says so and quotes none of it.
    (tmp_path / "latin1.txt").write_bytes("s\xe6cret-p\xe5ssword\n".encode("latin-1"))
    routing = {"merchants": {"store-001": "DK10000001", **merchants}, **sections.pop("routing", {})}
    config = _config(tmp_path, ca_file, routing=routing, **sections)
    for command in (["check-config"], []):
        result = cli(*command, "--config", config)
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith(CONFIG_ERROR)
        if "latin1.txt" in line:
            assert line.endswith(": not UTF-8 text"), line
            assert "0xe6" not in line
            assert "cret" not in line.rpartition("latin1.txt")[2]
        assert expected in line
        assert result.stdout == ""
        _assert_no_secret(result.stderr)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server\nport = 1", "is not valid TOML"),
        ("[server]\nport = 'eighty'", "[server] port must be a whole number"),
        ("[server]\nport = 70000", "[server] port must be from 0 to 65535"),
        ('[mobilepay]\nenvironment = "staging"', "environment must be one of sandbox, production"),
        ('[mobilepay]\napi_base_url = "http://insecure"', "api_base_url must be an https:// URL"),
        ('[mobilepay]\nclient_id = "x"\nibm_client_id = "y"', "client_secret is missing"),
        (
            '[mobilepay]\nclient_id = "x"\nclient_secret = "y"\nibm_client_id = "z"',
            "[routing] no merchants: add [routing.merchants] or merchants_file",
        ),
        ('[server]\nhost = "caf\xe9"'.encode("latin-1"), "is not UTF-8 text"),
    ],
)
def test_malformed_files(
    tmp_path: Path, cli: Callable[..., Ran], text: str | bytes, expected: str
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = cli("check-config", "--config", config)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(CONFIG_ERROR)
    assert expected in line


def test_missing_file_and_secrets_from_environment(
    tmp_path: Path,
    ca_file: Path,
    cli: Callable[..., Ran],
    exposure: Exposure,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    absent = tmp_path / "absent.toml"
    result = cli("check-config", "--config", absent)
    assert result.returncode == 2
    assert result.stderr == f"{CONFIG_ERROR}cannot read {absent}: No such file or directory\n"

    config = tmp_path / "proxy.toml"
    config.write_text(
        f'[mobilepay]\nca_file = "{ca_file}"\n[routing.merchants]\n"s1" = "FI12345678"\n'
    )
    result = cli("check-config", "--config", config)
    assert result.returncode == 2
    assert result.stderr == (
        f"{CONFIG_ERROR}[mobilepay] client_id is missing: "
        "set client_id, client_id_file or $MOBILEPAY_CLIENT_ID\n"
    )

    env = {
        "MOBILEPAY_CLIENT_ID": "a",
        "MOBILEPAY_CLIENT_SECRET": "b-secret-value",
        "MOBILEPAY_IBM_CLIENT_ID": "c-ibm-value",
    }
    exposure.secrets.update(list(env.values())[1:])
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = cli("check-config", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "credentials:      client id, client secret and x-ibm-client-id set" in result.stdout
    # Each one is needed: without it, the same file is refused for want of it.
    for name, value in env.items():
        monkeypatch.delenv(name)
        result = cli("check-config", "--config", config)
        assert result.returncode == 2
        assert f"is missing: set {name.removeprefix('MOBILEPAY_').lower()}" in result.stderr
        monkeypatch.setenv(name, value)


@pytest.mark.slow
async def test_sigterm_drains_in_flight_requests_and_exits_0(
    tmp_path: Path, ca_file: Path, pos_server: PosServer, processes: Processes
) -> None:
    release = asyncio.Event()

    pos_server.handler = held_until(release)
    data = proxy_config(pos_server.tokens.url, pos_server.url, ca_file)
    config = write_config(tmp_path / "proxy.toml", data)
    proxy = await processes.start_proxy(config)
    in_flight = 50
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(i: int) -> int:
            async with session.get(
                f"{proxy.url}/pos/v10/payments/{i}", headers={"X-Merchant-Id": "store-001"}
            ) as response:
                await response.read()
                return response.status

        calls = [asyncio.create_task(call(i)) for i in range(in_flight)]
        await eventually(lambda: len(pos_server.requests) == in_flight, "every request upstream")
        proxy.running.signal(signal.SIGTERM)

        # Stops taking connections at once, while every request in flight is still held.
        await eventually(lambda: refuses_connections(proxy.url), "new connections refused")
        assert not any(call.done() for call in calls)
        release.set()
        statuses = await asyncio.gather(*calls)
    assert statuses == [200] * in_flight
    assert await proxy.running.wait() == 0
    assert "Traceback" not in proxy.running.output
    assert "stopped" in proxy.running.lines[-1]
    for secret in (*SECRET_VALUES, IBM_CLIENT_ID, *pos_server.tokens.issued):
        assert secret not in proxy.running.output


# Run in a fresh interpreter: the modules a proxy loads to start, and a check of its file.
_LOADED_FOR = """
import sys
import proxy.server, proxy.workers
from proxy.cli import main
code = main(["check-config", "--config", sys.argv[1]])
print(code, *sorted({name.partition(".")[0] for name in sys.modules} & {"redis", "cryptography"}))
"""


@pytest.mark.parametrize(
    ("store", "expected"),
    [(None, "0"), ("redis://127.0.0.1:6390/0", "0 cryptography redis")],
)
def test_the_redis_client_is_loaded_only_for_a_shared_store(
    tmp_path: Path, ca_file: Path, processes: Processes, store: str | None, expected: str
) -> None:
    # Importing redis-py and cryptography costs about 15 MB of memory a process.
    config = _config(tmp_path, ca_file, tokens={"store": store})
    result = processes.run(sys.executable, "-c", _LOADED_FOR, config)
    assert result.stdout.splitlines()[-1] == expected, result.stderr
