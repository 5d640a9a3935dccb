"""Shared fixtures: the v1 spec, a small calibrated synthetic city."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, settings

from kernel.calibrate import calibrate
from kernel.spec import load_spec
from kernel.synthetic import generate_features

# Kernel batches are deliberately large inputs (a block is 64 citizens x 25 variables), and
# shared CI machines are slow: neither is a defect of the tests.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("default")


@pytest.fixture(scope="session")
def spec():
    return load_spec()


@pytest.fixture(scope="session")
def city(spec):
    """(people, features float32) of a 20,000-person synthetic city."""
    return generate_features(spec, 20_000, seed=11)


@pytest.fixture(scope="session")
def calibration(spec, city):
    people, features = city
    return calibrate(spec, features, people.adult)


# --- the real server, in-process on port 0 ------------------------------------------------


class Served:
    """A running server and what tests need to reach it."""

    def __init__(self, tmp_path_factory, n_citizens: int = 3000, seed: int = 2018):
        from prometheus_client import CollectorRegistry

        from clients.client import QianjiangClient
        from server.app import Node, Runtime, ServerConfig
        from server.metrics import Metrics

        self.data_dir = tmp_path_factory.mktemp("qj-data")
        self.config = ServerConfig(data_dir=self.data_dir, seed_citizens=n_citizens, seed=seed, metrics_port=0, port=0)
        self.registry = CollectorRegistry()
        self.runtime = Runtime.prepare(self.config)
        self.node = Node(self.runtime, port=0, metrics=Metrics(self.registry)).start()
        self.runtime.load()
        self.service = self.node.attach()
        self.target = f"127.0.0.1:{self.node.port}"
        self.client = QianjiangClient(self.target, timeout=5.0)
        self.seed = seed

    def token(self, row: int) -> bytes:
        return self.runtime.synthetic_card_token(row)

    def citizen(self, row: int) -> str:
        from server.app import citizen_id

        return citizen_id(row)

    def metric(self, name: str, **labels) -> float:
        self.node.metrics.flush()  # per-call figures are buffered (server/metrics.py)
        return self.registry.get_sample_value(name, labels) or 0.0

    def stop(self):
        self.client.close()
        self.node.drain(0)


def dev_token(identity: str) -> str:
    """The bearer token of ``identity`` on a :class:`SecureServer`."""
    return f"dev-token-{identity}-0123456789"


#: Authenticated, but unknown to the policy.
STRANGER = "stranger"


class SecureServer:
    """A real server in token mode with a client for every caller identity of
    config/policy.toml and one the policy does not name (``STRANGER``)."""

    def __init__(self, data_dir, n_citizens: int = 1500, extra_policy: str = "", **config):
        """``extra_policy``: TOML appended to config/policy.toml for this server (e.g. an
        operator role a test needs); ``config``: other ServerConfig fields."""
        import numpy as np
        from prometheus_client import CollectorRegistry

        from clients.client import QianjiangClient
        from server.app import Node, Runtime, ServerConfig
        from server.auth import DEFAULT_POLICY_PATH, load_policy
        from server.metrics import Metrics

        policy = data_dir / "policy.toml"
        policy.write_text(DEFAULT_POLICY_PATH.read_text() + extra_policy)
        self.identities = sorted(load_policy(policy).callers) + [STRANGER]
        tokens = data_dir / "tokens.toml"
        tokens.write_text("".join(f'"{dev_token(i)}" = "{i}"\n' for i in self.identities))
        self.config = ServerConfig(
            data_dir=data_dir, seed_citizens=n_citizens, metrics_port=0, port=0, security="token", tokens_path=tokens,
            policy_path=policy, **config,
        )
        self.runtime = Runtime.prepare(self.config)
        self.node = Node(self.runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
        self.runtime.load()
        self.service = self.node.attach()
        self.target = f"127.0.0.1:{self.node.port}"
        from server.end_user import key_dir

        apps = {i for i, c in load_policy(policy).callers.items() if c.role == "citizen_app"}
        self.clients = {i: QianjiangClient(self.target, timeout=5, token=dev_token(i),
                                           end_user_key=key_dir(data_dir) / f"{i}.key" if i in apps else None,
                                           end_user_issuer=i)
                        for i in self.identities}
        s = self.runtime.state
        n = s.n_citizens
        ok = np.flatnonzero((s.consent[:n] == 1) & (s.adult[:n] == 1) & (s.columns.flags[:n] == 0))
        self.rows = iter(ok.tolist())
        self.disclosed: list[str] = []  # every disclosure id a caller received

    def fresh_row(self) -> int:
        """A consenting adult with no hard rule that no other test has used."""
        return next(self.rows)

    def token(self, row: int) -> bytes:
        return self.runtime.synthetic_card_token(row)

    def close(self):
        for c in self.clients.values():
            c.close()
        self.node.drain(0)


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """One real server for the session (3,000 synthetic citizens). Tests that change a
    citizen pick their own rows so they do not disturb each other."""
    s = Served(tmp_path_factory)
    yield s
    s.stop()


# --- stores: every store test runs on SQLite and on PostgreSQL ------------------------------

PG_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pg_test_server.sh"


@pytest.fixture(scope="session")
def pg_server():
    """The DSN of a PostgreSQL server for the session.

    ``QJ_TEST_PG_DSN=postgresql://…`` (as .ci/run sets it from scripts/pg_test_server.sh; its
    role must be allowed to CREATE DATABASE): that one; set but not working is an error. Unset:
    a throwaway server started with that script if PostgreSQL is installed (never installs it
    from here), else the postgres tests are skipped. ``QJ_TEST_PG_DSN=off``: skipped.
    """
    dsn = os.environ.get("QJ_TEST_PG_DSN", "").strip()
    if dsn.lower() == "off":
        pytest.skip("QJ_TEST_PG_DSN=off: PostgreSQL store tests turned off")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        if dsn:
            pytest.fail("QJ_TEST_PG_DSN is set but psycopg is not installed (pip install -r requirements-pg.txt)")
        pytest.skip("psycopg is not installed (pip install -r requirements-pg.txt)")
    if dsn:
        if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
            pytest.fail(f"QJ_TEST_PG_DSN must be a postgresql:// URI, not {dsn.split('@')[-1]!r}")
        yield dsn
        return
    # Not under pytest's basetemp: that is private to root, and the server may run as postgres.
    where = tempfile.mkdtemp(prefix="qj-pg-test-")
    started = subprocess.run(["bash", str(PG_SCRIPT), "start", where], capture_output=True, text=True,
                             check=False, timeout=120, env={**os.environ, "QJ_PG_NO_INSTALL": "1"})
    if started.returncode != 0:
        subprocess.run(["bash", str(PG_SCRIPT), "stop", where], capture_output=True, check=False, timeout=60)
        why = (started.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"QJ_TEST_PG_DSN is unset and no PostgreSQL server could be started here ({why}); "
                    "set it, e.g. from scripts/pg_test_server.sh start DIR")
    try:
        yield started.stdout.strip()
    finally:
        subprocess.run(["bash", str(PG_SCRIPT), "stop", where], capture_output=True, check=False, timeout=60)


@pytest.fixture
def own_pg():
    """A PostgreSQL server of this test alone, which it may stop, pause or freeze: (its
    directory for scripts/pg_test_server.sh, its DSN, a list of pids the test froze with
    loadtest.attack.store_hang.freeze — resumed at the end even if the test failed)."""
    from loadtest.attack.store_hang import pg, thaw

    if os.environ.get("QJ_TEST_PG_DSN", "").lower() == "off":
        pytest.skip("QJ_TEST_PG_DSN=off")
    where = tempfile.mkdtemp(prefix="qj-pg-own-")
    started = pg("start", where)
    if started.returncode != 0:
        pg("stop", where)
        if os.environ.get("QJ_TEST_PG_DSN"):  # CI: PostgreSQL is there, so this must work
            pytest.fail(f"could not start a PostgreSQL server: {started.stderr[-500:]}")
        pytest.skip("no PostgreSQL server can be started here")
    frozen: list[int] = []
    try:
        yield where, started.stdout.strip(), frozen
    finally:
        thaw(frozen)  # never leave it stopped
        pg("stop", where)


@pytest.fixture
def pg_url(pg_server):
    """A URL to a new, empty database on the session's server; dropped after the test."""
    import psycopg
    from psycopg import sql

    name = f"qj_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield urlsplit(pg_server)._replace(path=f"/{name}").geturl()
    with psycopg.connect(pg_server, autocommit=True) as admin:
        # FORCE: a connection a failed test left open must not keep the database alive.
        admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    """A new, empty store's URL: [sqlite] a file (its directory does not exist yet), [postgres]
    a database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/nested/qj.db"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url):
    from server.store import open_store

    s = open_store(store_url)
    yield s
    s.close()


def rec(record_id, citizen_id="c-0", variable="traffic_violations", day=19_000, value=1.0,
        source="police", scenario=None):
    """A RecordIn for the store tests, with defaults for what a test does not care about."""
    from server.store import RecordIn

    return RecordIn(record_id, citizen_id, variable, day, value, source, scenario)


def with_citizens(store, n=3):
    """``store`` with citizens c-0 .. c-<n-1> (rows 0 .. n-1)."""
    for i in range(n):
        store.upsert_citizen(f"c-{i}", 7_000 + i)
    return store


def run_sql(url: str, query: str, params: tuple = ()) -> list[tuple]:
    """One statement on a store's database behind the store's back (``%s`` placeholders)."""
    if url.startswith("sqlite:///"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            with db:
                return db.execute(query.replace("%s", "?"), params).fetchall()
        finally:
            db.close()
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        cur = db.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def sql(store_url):
    """``sql(query, params=())``: :func:`run_sql` on the test's store."""
    return lambda query, params=(): run_sql(store_url, query, params)


def kill_after_flushes(child_code: str, *args: str) -> tuple[int, int]:
    """Run ``child_code`` (python -c) with ``args``; after it has printed three lines (its
    acknowledged counts, one per explicit flush), SIGKILL it mid-way between two flushes.
    Returns (the last count it printed completely, the kill time in ns). For the audit log's
    crash bound (tests/test_audit.py, tests/test_audit_batch.py)."""
    import signal
    import sys
    import time

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", child_code, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        printed = []
        for _ in range(3):  # let it run through a few explicit flushes
            printed.append(proc.stdout.readline())
            assert printed[-1], "the child died"
        time.sleep(0.07)  # mid-way between explicit flushes: only the background flusher is at work
        killed_ns = time.time_ns()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    printed += proc.stdout.read().splitlines()
    proc.stdout.close()
    # A line cut by the kill has no newline only if the kill hit inside print: then the
    # line before it counts.
    acked = int(printed[-1]) if printed[-1].strip().isdigit() else int(printed[-2])
    return acked, killed_ns


# --- the real command: `qjscore serve` as a subprocess ----------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m clients.cli serve ARGS`` in its own session, its output in ``log``;
    :meth:`wait_serving` until health answers SERVING through ``client``."""

    def __init__(self, tmp_path: Path, *args: str, port: int | None = None):
        import sys

        self.port = port or free_port()
        self.log = tmp_path / f"serve-{self.port}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "clients.cli", "serve", "--port", str(self.port), "--metrics-port", "0", *args],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                start_new_session=True,
            )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_serving(self, client, timeout: float = 120.0) -> None:
        import time

        import grpc

        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass
            assert self.proc.poll() is None, f"the server exited ({self.proc.returncode}):\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, self.output[-3000:]
            time.sleep(0.2)

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
