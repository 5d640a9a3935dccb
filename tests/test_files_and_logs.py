"""What the server leaves on disk and in its log: no citizen id or card token in the start
banner unless stdout is a terminal, a private data directory and store files, a metrics
endpoint on loopback unless told otherwise, and one server per data directory."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clients.cli import parser, serve_config
from conftest import free_port
from server.app import Runtime, ServerConfig, citizen_id, start_banner
from server.store import open_store

ROOT = Path(__file__).resolve().parent.parent
CITIZEN_ID = re.compile(r"\bc\d{8}\b")
CARD_TOKEN = re.compile(r"\b[0-9a-f]{32}\b")


def listening(port: int) -> set[str]:
    """The local addresses listening on ``port`` (Linux /proc/net/tcp), e.g. {"127.0.0.1"}."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, _, state = line.split()[1:4]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_serve_logs_no_citizen_or_card_when_stdout_is_a_file_and_metrics_stay_on_loopback(tmp_path):
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "server.log"
    data = tmp_path / "data"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data), "--port", str(port),
             "--metrics-port", str(metrics_port), "--seed-citizens", "300"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "Qianjiang Score serving" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "Qianjiang Score serving" in log.read_text(), log.read_text()
        assert listening(metrics_port) == {"127.0.0.1"}
        # one server per data directory: a second one says so and touches nothing
        pid_file = (data / "qjscore.pid").read_text()
        second = subprocess.run(
            [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data), "--port", str(free_port()),
             "--metrics-port", "0", "--seed-citizens", "300"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert second.returncode == 1, second.stderr
        assert f"a server is already running on {data} (pid {proc.pid})" in second.stderr
        assert "Traceback" not in second.stderr
        assert (data / "qjscore.pid").read_text() == pid_file and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    assert "not a terminal" in text
    assert not CITIZEN_ID.search(text), CITIZEN_ID.search(text)
    assert not CARD_TOKEN.search(text), CARD_TOKEN.search(text)
    assert mode(data) == 0o700 and mode(data / "qianjiang.db") == 0o600


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    data = tmp_path_factory.mktemp("banner")
    tokens = data / "tokens.toml"
    tokens.write_text('"0123456789abcdef0123" = "campus_fitness_app"\n')
    rt = Runtime.prepare(ServerConfig(data_dir=data, seed_citizens=200, metrics_port=0, security="token", tokens_path=tokens))
    rt.load()
    return rt


def test_the_banner_on_a_terminal_names_a_citizen_and_the_flags_of_the_mode(runtime):
    token_mode = start_banner(runtime, 50051, examples=True)
    assert CITIZEN_ID.search(token_mode) and CARD_TOKEN.search(token_mode)
    check = next(line for line in token_mode.splitlines() if "qjscore check" in line)
    assert "--token TOKEN_OF_CAMPUS_FITNESS_APP" in check and "--target" not in check
    assert str(runtime.config.tokens_path) in token_mode
    score = next(line for line in token_mode.splitlines() if "qjscore score" in line)
    assert "--token TOKEN_OF_CITIZEN_APP" in score

    runtime.config.security, runtime.config.cert_dir = "mtls", Path("/etc/qj/certs")
    try:
        mtls = start_banner(runtime, 50052, examples=True)
    finally:
        runtime.config.security, runtime.config.cert_dir = "token", None
    check = next(line for line in mtls.splitlines() if "qjscore check" in line)
    assert "--target 127.0.0.1:50052 --certs /etc/qj/certs --caller campus_fitness_app" in check

    quiet = start_banner(runtime, 50051, examples=False)
    assert not CITIZEN_ID.search(quiet) and not CARD_TOKEN.search(quiet)
    assert citizen_id(0) not in quiet


def test_a_fresh_data_directory_and_store_are_private(tmp_path):
    data = tmp_path / "fresh"
    Runtime.prepare(ServerConfig(data_dir=data, seed_citizens=50, metrics_port=0))
    assert mode(data) == 0o700
    store = open_store(f"sqlite:///{data}/qianjiang.db")
    try:
        store.upsert_citizen("c-extra", 7000)  # -wal and -shm exist while it is open
        for name in ("qianjiang.db", "qianjiang.db-wal", "qianjiang.db-shm"):
            assert mode(data / name) == 0o600, name
    finally:
        store.close()
    keys = [p for p in (data / "keys").iterdir()] if (data / "keys").exists() else []
    assert all(mode(k) == 0o600 for k in keys)


def test_an_older_data_directory_is_made_private_on_start(tmp_path):
    data = tmp_path / "old"
    Runtime.prepare(ServerConfig(data_dir=data, seed_citizens=50, metrics_port=0))
    db = data / "qianjiang.db"
    # what an older version left: a 0755 directory, a 0644 store, and its -wal/-shm (held
    # open by another connection, so that they exist)
    other = sqlite3.connect(db)
    try:
        other.execute("PRAGMA journal_mode = WAL")
        other.execute("CREATE TABLE IF NOT EXISTS scratch (x)")
        other.execute("INSERT INTO scratch VALUES (1)")
        other.commit()
        files = [db, data / "qianjiang.db-wal", data / "qianjiang.db-shm"]
        for f in files:
            f.chmod(0o644)
        data.chmod(0o755)
        assert {mode(f) for f in files} == {0o644}

        Runtime.prepare(ServerConfig(data_dir=data, seed_citizens=50, metrics_port=0))
        assert mode(data) == 0o700
        assert [mode(f) for f in files] == [0o600] * 3
    finally:
        other.close()


def test_metrics_host_defaults_to_loopback_and_has_its_own_flag():
    assert ServerConfig().metrics_host == "127.0.0.1"
    assert serve_config(parser().parse_args(["serve", "--host", "0.0.0.0"])).metrics_host == "127.0.0.1"
    assert serve_config(parser().parse_args(["serve", "--metrics-host", "10.0.0.5"])).metrics_host == "10.0.0.5"


def test_serve_flags_set_the_slot_limits():
    cfg = serve_config(parser().parse_args([
        "serve", "--max-calls-per-caller", "5", "--max-streams-per-caller", "3", "--call-timeout", "2.5",
        "--stream-idle-timeout", "30", "--max-open-service-streams", "7", "--max-streams-per-connection", "50",
    ]))
    limits = cfg.limits
    assert (limits.caller_calls, limits.caller_streams, limits.call_seconds, limits.stream_idle_seconds,
            limits.open_streams, cfg.max_streams_per_connection) == (5, 3, 2.5, 30, 7, 50)
    defaults = serve_config(parser().parse_args(["serve"])).limits
    assert (defaults.calls, defaults.streams, defaults.caller_calls, defaults.caller_streams) == (128, 64, 32, 16)
    for bad in (["--max-calls-per-caller", "-1"], ["--call-timeout", "soon"], ["--max-streams-per-connection", "0"]):
        with pytest.raises(SystemExit):
            parser().parse_args(["serve", *bad])
