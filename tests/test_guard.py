"""The secret guard itself: a test that lets a secret out must fail, and say so."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.fakes import CLIENT_SECRET
from tests.helpers import ROOT
from tests.helpers.exposure import LEAK_MESSAGE
from tests.helpers.processes import Processes

LEAKY_TESTS = """
import logging
import sys

from tests.fakes import CLIENT_SECRET, IBM_CLIENT_ID
from tests.helpers.processes import Processes


def test_logs_a_secret() -> None:
    logging.getLogger("proxy").warning("token request with %s", CLIENT_SECRET)


def test_logs_a_secret_as_a_json_field() -> None:
    logging.getLogger("proxy").info("token request", extra={"credential": IBM_CLIENT_ID})


async def test_a_process_prints_a_secret(processes: Processes) -> None:
    code = "import sys; sys.stderr.write(sys.argv[1])"
    running = await processes.start(sys.executable, "-c", code, CLIENT_SECRET)
    assert await running.wait() == 0


def test_says_nothing() -> None:
    logging.getLogger("proxy").info("nothing to see")
"""


LEAKY = {
    "test_logs_a_secret",
    "test_logs_a_secret_as_a_json_field",
    "test_a_process_prints_a_secret",
}


def test_a_leak_fails_the_test_that_caused_it(tmp_path: Path, processes: Processes) -> None:
    tests = tmp_path / "test_leaky.py"
    tests.write_text(LEAKY_TESTS)
    result = processes.run(
        sys.executable,
        "-m",
        "pytest",
        *("-c", ROOT / "pyproject.toml", "--rootdir", ROOT, "-p", "tests.conftest"),
        *("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--show-capture=no"),
        *("-q", "-rA", tests),
    )
    # The guard checks as each test ends: a leak is an error at the leaky test's teardown.
    failed = {
        line.split("::")[-1].split()[0]
        for line in result.stdout.splitlines()
        if line.startswith(("ERROR ", "FAILED "))
    }
    assert failed == LEAKY, result.stdout
    assert "4 passed, 3 errors in" in result.stdout, result.stdout
    assert result.returncode == 1
    for test in LEAKY:
        assert f"ERROR ::{test} - Failed: {LEAK_MESSAGE}: [" in result.stdout
    # The guard names each leak without repeating it.
    assert CLIENT_SECRET not in result.stdout + result.stderr
