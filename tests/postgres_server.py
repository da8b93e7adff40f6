"""A throwaway PostgreSQL server for the tests, and helpers for server replicas sharing it.

The server is Debian's PostgreSQL (`.ci/postgres.sh` installs it): `start_postgres()` runs
initdb in a temporary directory and pg_ctl on a free loopback port, as the `postgres` user
when the tests run as root (PostgreSQL refuses to run as root); `remove()` deletes it all.
Without the binaries the test asking for it is skipped, saying so. The `pg` (one server a
session) and `dsn` (a fresh database a test) fixtures are in tests/conftest.py.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest


def postgres_bindir() -> Path | None:
    """Debian's newest /usr/lib/postgresql/N/bin, else the directory of `pg_ctl` on PATH."""
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if debian:
        return Path(debian[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl in a temporary directory, on 127.0.0.1 only (no Unix socket), trust auth."""

    USER = "planengine"

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.as_user: list[str] = []
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        # under /tmp itself: pytest's tmp dirs sit in a root-only (0700) parent
        self.root = Path(tempfile.mkdtemp(prefix="plan-engine-pg-"))
        if owner is not None:
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self.data = self.root / "data"
        self.port = 0
        self._run("initdb", "-D", str(self.data), "-U", self.USER, "--auth=trust", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.as_user, str(self.bindir / tool), *args]
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}{tail}")

    def start(self) -> None:
        self.port = self.port or free_port()  # a restart keeps its port: DSNs handed out stay valid
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o",
                  f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories='' "
                  "-c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        import psycopg
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def remove(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> PostgresServer:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (bash .ci/postgres.sh installs Debian's package)")
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        server.remove()
        raise
    return server




def served_hash(client) -> str:
    """The plan hash in Generate's final message."""
    *_, last = client.generate(text="Hi", max_tokens=1, ignore_eos=True)
    return last.final.plan.hash


def wait_served(client, plan_hash_: str) -> float:
    """Seconds from now until `client`'s server stamped a Generate with `plan_hash_`, taken at
    the start of that call. How fast a replica follows depends on the machine's load (a
    Generate on a busy 2-core machine takes seconds), so the delays are printed for the record,
    never asserted; a replica that never follows is a hang, which the test's timeout ends."""
    t0 = time.monotonic()
    while True:
        sent = time.monotonic()
        if served_hash(client) == plan_hash_:
            return sent - t0
        time.sleep(0.005)
