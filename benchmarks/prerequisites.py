"""What the benchmark needs: nginx, wrk and hey from Debian, matplotlib in the virtualenv."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

# command -> Debian package
TOOLS = {"nginx": "nginx", "wrk": "wrk", "hey": "hey"}
# import name of each module the `bench` extra provides
MODULES = ("matplotlib",)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Missing(Exception):
    """Something is missing and cannot be installed from here; the message says how."""


def ensure_tools() -> None:
    """Install missing tools with apt-get as root; otherwise say the command to run."""
    packages = [package for command, package in TOOLS.items() if shutil.which(command) is None]
    if not packages:
        return
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if os.geteuid() != 0:
        raise Missing(f"missing {', '.join(packages)}; install with:\n  sudo {shlex.join(install)}")
    print(f"installing {', '.join(packages)}: {shlex.join(install)}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, env=env, check=False).returncode != 0:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, check=True)
        subprocess.run(install, env=env, check=True)
    still = [command for command in TOOLS if shutil.which(command) is None]
    if still:
        raise Missing(f"{', '.join(still)} still missing after {shlex.join(install)}")


def ensure_modules() -> None:
    """Install the ``bench`` extra into this virtualenv if a module of it is missing."""
    if all(importlib.util.find_spec(module) is not None for module in MODULES):
        return
    install = [sys.executable, "-m", "pip", "install", "--quiet", *_bench_requirements()]
    if sys.prefix == sys.base_prefix:
        raise Missing(f"missing Python packages; install with:\n  {shlex.join(install)}")
    print(f"installing the bench extra: {shlex.join(install[3:])}", flush=True)
    subprocess.run(install, check=True)
    importlib.invalidate_caches()


def _bench_requirements() -> list[str]:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)["project"]
    requirements: list[str] = project["optional-dependencies"]["bench"]
    return requirements
