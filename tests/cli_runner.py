"""Run `plan-engine` as a user does (a subprocess) and check its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

from paths import REPO


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    # progress lines may come first; the error is one line, the last
    assert lines and lines[-1].startswith("plan-engine: error: "), result.stderr
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[-1], lines[-1]
