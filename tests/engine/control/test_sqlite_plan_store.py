"""The SQLite plan store: what only it has, beyond the contract every store keeps
(test_store_contract.py): its file (WAL, shared by the audit log), writers in several
processes, and durability under SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.control.plan_store import SqliteDatabase, SqlitePlanStore
from engine.control.plans import plan_hash
from engine.errors import FailedPrecondition
from test_store_contract import make_plan

REPO = Path(__file__).resolve().parents[3]


def versions(db_path: Path, plan_id: str) -> list[int]:
    with sqlite3.connect(db_path) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM plans WHERE id = ? ORDER BY version", (plan_id,))]


# --------------------------------------------------------------------------- the file


def test_schema_is_versioned_and_the_database_can_be_shared(tmp_path):
    db = SqliteDatabase(tmp_path / "shared.db")
    store = SqlitePlanStore(db)
    db.ensure_schema("suggestions", [["CREATE TABLE suggestions (id INTEGER PRIMARY KEY, body TEXT)"]])
    db.ensure_schema("suggestions", [["CREATE TABLE suggestions (id INTEGER PRIMARY KEY, body TEXT)"]])  # no-op
    with db.transaction() as conn:
        conn.execute("INSERT INTO suggestions (body) VALUES ('x')")
    store.submit(make_plan(seed=1))
    rows = dict(db.connection().execute("SELECT component, version FROM schema_version"))
    assert rows == {"plans": 2, "suggestions": 1}  # plans 2: activation_failed events
    assert db.connection().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.connection().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with pytest.raises(FailedPrecondition, match="schema version 1, newer than this server's 0"):
        db.ensure_schema("suggestions", [])
    store.close()  # a shared database is closed by its owner
    assert store.get("p").version == 1
    db.close()


# --------------------------------------------------------------------------- concurrency


WORKER = textwrap.dedent("""
    import sys
    import time
    from engine.control.plan_store import SqlitePlanStore
    from protos.planengine.v1 import plan_pb2

    path, plan_id, first_seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = SqlitePlanStore(path)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    print("start", time.time(), flush=True)
    seed = first_seed
    while count < 0 or seed < first_seed + count:
        plan = plan_pb2.ExecutionPlan(id=plan_id, model="smol")
        plan.determinism.default_seed = seed
        stored = store.submit(plan)
        print(stored.version, stored.hash, seed, time.time(), flush=True)  # acknowledged: durable from here
        seed += 1
""")


def start_worker(db: Path, plan_id: str, first_seed: int, count: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(db), plan_id, str(first_seed), str(count)],
                            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def go(proc: subprocess.Popen) -> float:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    word, started = proc.stdout.readline().split()
    assert word == "start"
    return float(started)


def test_processes_submitting_to_one_id_get_contiguous_versions(tmp_path):
    db = tmp_path / "plans.db"
    SqlitePlanStore(db).close()
    per_process = 60
    procs = [start_worker(db, "p", k * 10_000, per_process) for k in range(2)]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=60)[0].splitlines() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    acks = [[line.split() for line in out[1:]] for out in outputs]
    acknowledged = sorted(int(ack[0]) for worker in acks for ack in worker)
    expected = list(range(1, 2 * per_process + 1))
    assert acknowledged == expected
    assert versions(db, "p") == expected
    # both were writing at the same time: each started before the other's last commit.
    # (Which one wins the lock is up to SQLite's busy handler; it need not alternate.)
    spans = [(float(out[0].split()[1]), float(worker[-1][3])) for out, worker in zip(outputs, acks)]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans


def test_sigkill_mid_burst_loses_no_acknowledged_version(tmp_path):
    db = tmp_path / "plans.db"
    acknowledged: dict[int, tuple[str, int]] = {}
    for round_ in range(3):
        proc = start_worker(db, "burst", round_ * 1_000_000, -1)  # submits until killed
        go(proc)
        for _ in range(40 + 17 * round_):  # vary where in the burst the kill lands
            version, digest, seed, _at = proc.stdout.readline().split()
            acknowledged[int(version)] = (digest, int(seed))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        for line in rest.splitlines():
            parts = line.split()
            if len(parts) == 4 and len(parts[1]) == 64:  # a line cut by the kill is not an acknowledgement
                acknowledged[int(parts[0])] = (parts[1], int(parts[2]))

        with SqlitePlanStore(db) as store:
            conn = store.db.connection()
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            stored = versions(db, "burst")
            assert stored == list(range(1, len(stored) + 1))  # contiguous, nothing half-written
            for version, (digest, seed) in acknowledged.items():
                plan = store.get("burst", version)  # verifies the body against its hash
                assert plan.hash == digest == plan_hash(plan)
                assert plan.determinism.default_seed == seed
            n_events = conn.execute("SELECT COUNT(*) FROM plan_events WHERE plan_id = 'burst'").fetchone()[0]
            assert n_events == len(stored)  # each version with its audit event, in one transaction
    assert len(acknowledged) >= 40 + 57 + 74


