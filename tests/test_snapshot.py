"""Serving-state snapshots (server/snapshot.py): a start from one serves exactly what a whole
load from the store would, changes after it are replayed, and a snapshot that does not match
— truncated, damaged, foreign, of another model, keys or store, ahead of the store, or cut
short by a full disk — is refused with a log line and never served."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from clients.client import QianjiangClient
from conftest import ROOT, ServeProcess
from server import snapshot
from server.app import Runtime, ServerConfig
from server.state import ServingState
from server.store import RecordIn, open_store

N = 400


def start(data, **config) -> Runtime:
    runtime = Runtime.prepare(ServerConfig(data_dir=data, seed_citizens=N, metrics_port=0, port=0, **config))
    runtime.load()
    return runtime


def served_arrays(state: ServingState, store_url: str) -> dict:
    """What a reader of the state sees, row by row (every column, both indexes)."""
    n = state.n_citizens
    out = {name: getattr(state, name)[:n].copy() for name in
           ("features", "adult", "consent", "birth_day", "defaults", "subject", "gate")}
    for name in state.columns.DTYPES:
        out[f"col_{name}"] = getattr(state.columns, name)[:n].copy()
    with open_store(store_url) as store:
        cards = store.cards()
        citizens = store.citizens()
    out["token_rows"] = np.array([state.tokens.get(bytes(t)) for t in cards.tokens])
    from server.state import citizen_key

    out["citizen_rows"] = np.array([state.citizens.get(citizen_key(c)) for c in citizens.ids])
    out["n"], out["as_of_day"] = n, state.as_of_day
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def fresh_load(data, store_url) -> dict:
    """The state a whole load from the store gives (no snapshot)."""
    snapshot.snapshot_path(data).rename(snapshot.snapshot_path(data).with_suffix(".aside"))
    try:
        return served_arrays(start(data).state, store_url)
    finally:
        snapshot.snapshot_path(data).with_suffix(".aside").rename(snapshot.snapshot_path(data))


@pytest.fixture
def city(tmp_path):
    """A data directory with a store of N citizens and an exact snapshot of its state."""
    data = tmp_path / "data"
    runtime = start(data)
    runtime.write_snapshot(exact=True)
    return data, f"sqlite:///{data / 'qianjiang.db'}", runtime


def test_a_start_from_the_snapshot_serves_what_the_store_says(city, caplog):
    data, url, before = city
    caplog.set_level(logging.INFO)
    runtime = start(data)
    assert "started from the snapshot of 400 citizens" in caplog.text
    assert_same(served_arrays(runtime.state, url), served_arrays(before.state, url))


def test_changes_after_the_snapshot_are_replayed(city, caplog):
    """A record, a correction, a withdrawal, a consent revoked, a new citizen with a card:
    written to the store after the snapshot, all served after the restart."""
    data, url, _ = city
    with open_store(url) as store:
        store.add_records([RecordIn("after-1", "c00000003", "court_listed_dishonest_debtor", 20000, 1.0, "court")], "court")
        store.add_records([RecordIn("after-2", "c00000004", "tax_arrears", 20000, 1.0, "tax_bureau")], "tax_bureau")
        store.correct_record("tax_bureau", "after-2", 20001, 2.0, "tax_bureau")
        store.add_records([RecordIn("after-3", "c00000005", "utility_arrears_serious", 20000, 1.0, "utilities")], "utilities")
        store.set_record_status("utilities", "after-3", "withdrawn", "utilities")
        store.set_consent("c00000006", False)
        row, _ = store.upsert_citizen("newcomer", 7000)
        store.register_card(b"\x42" * 16, "newcomer")
        store.set_consent("newcomer", True)
    caplog.set_level(logging.INFO)
    runtime = start(data)
    assert "started from the snapshot" in caplog.text and "5 citizens changed since were re-derived" in caplog.text
    state = runtime.state
    assert state.n_citizens == N + 1 and state.tokens.get(b"\x42" * 16) == row == N
    assert state.columns.score[3] <= 549 and state.consent[6] == 0
    assert_same(served_arrays(state, url), fresh_load(data, url))


def _refused(data, url, caplog, reason: str) -> None:
    """The start refuses the snapshot, says why, and serves the whole load's state."""
    caplog.clear()
    caplog.set_level(logging.INFO)
    runtime = start(data)
    assert "snapshot not used" in caplog.text and reason in caplog.text, caplog.text
    assert "started from the snapshot" not in caplog.text
    assert_same(served_arrays(runtime.state, url), fresh_load(data, url))


def _edit_header(path, **changes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(len(snapshot.MAGIC))
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        header.update(changes)
        text = json.dumps(header).encode()
        fh.seek(len(snapshot.MAGIC))
        fh.write(struct.pack("<Q", len(text)) + text)


@pytest.mark.parametrize("damage, reason", [
    ("truncate", "truncated or grown"),
    ("flip", "does not match its checksum"),
    ("foreign", "not a snapshot of this service"),
    ("format", "snapshot format 99"),
    ("model", "snapshot of another model"),
    ("calibration", "snapshot of another calibration"),
    ("layout", "the serving state's schema"),
    ("ahead", "but the store is at"),
])
def test_a_snapshot_that_does_not_match_is_refused_and_never_served(city, caplog, damage, reason):
    data, url, _ = city
    path = snapshot.snapshot_path(data)
    size = path.stat().st_size
    if damage == "truncate":
        os.truncate(path, size - 1000)
    elif damage == "flip":
        with open(path, "r+b") as fh:
            fh.seek(snapshot.HEADER_BYTES + (size - snapshot.HEADER_BYTES) // 2)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "foreign":
        path.write_bytes(os.urandom(4096))
    elif damage == "format":
        _edit_header(path, format=99)
    elif damage == "model":
        _edit_header(path, model_version="1+000000000000")
    elif damage == "calibration":
        _edit_header(path, calibration_version="cal-000000000000")
    elif damage == "layout":
        header = snapshot.read_header(path)
        header["layout"][1][1] = "<f8"  # features as float64
        _edit_header(path, layout=header["layout"])
    elif damage == "ahead":  # the store restored from a backup older than the snapshot
        _edit_header(path, position=snapshot.read_header(path)["position"] + 10)
    _refused(data, url, caplog, reason)


def test_a_snapshot_of_another_store_or_other_keys_is_refused(city, tmp_path, caplog):
    data, url, _ = city
    other = tmp_path / "other"
    shutil.copytree(data / "keys", other / "keys")  # the same keys, a store of its own (same people, another first change)
    start(other)
    shutil.copy(snapshot.snapshot_path(data), tmp_path / "mine.qjsnap")
    snapshot.snapshot_path(other).parent.mkdir(exist_ok=True)
    shutil.copy(tmp_path / "mine.qjsnap", snapshot.snapshot_path(other))
    _refused(other, f"sqlite:///{other / 'qianjiang.db'}", caplog, "snapshot of another store")
    (data / "keys" / "audit.key").write_text("ab" * 32)
    _refused(data, url, caplog, "snapshot of other keys")


def test_a_disk_that_fills_while_writing_leaves_the_previous_snapshot(city):
    """A real limit, not a mock: the writer runs with RLIMIT_FSIZE below the snapshot's size."""
    data, _, _ = city
    path = snapshot.snapshot_path(data)
    before = path.read_bytes()
    code = f"""
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from server.app import Runtime, ServerConfig
runtime = Runtime.prepare(ServerConfig(data_dir=Path({str(data)!r}), metrics_port=0, port=0))
runtime.load()
resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, resource.RLIM_INFINITY))
try:
    runtime.write_snapshot(exact=True)
except OSError as exc:
    print("refused:", exc.strerror)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "refused: File too large" in out.stdout, out.stdout + out.stderr
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == [path.name]


def test_the_real_server_restarts_from_its_snapshot_after_a_clean_stop_and_after_sigkill(tmp_path):
    data = tmp_path / "data"
    args = ("--data-dir", str(data), "--seed-citizens", "300", "--snapshot-interval", "1")

    server = ServeProcess(tmp_path, *args)
    with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
        server.wait_serving(qj)
        qj.ingest([_record("kept-1", "c00000007")])
    assert server.stop() == 0
    assert "snapshot of 300 citizens" in server.output

    server = ServeProcess(tmp_path, *args)
    with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
        server.wait_serving(qj)
        assert qj.get_score("c00000007").hard_rule_applied
        deadline = time.monotonic() + 30
        while "written in" not in server.output:  # a periodic snapshot, then more writes
            assert time.monotonic() < deadline, server.output
            time.sleep(0.2)
        qj.ingest([_record("kept-2", "c00000008")])
        qj.revoke_consent("c00000009")
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    assert "started from the snapshot of 300 citizens" in server.output

    server = ServeProcess(tmp_path, *args)
    with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
        server.wait_serving(qj)
        assert qj.get_score("c00000007").hard_rule_applied and qj.get_score("c00000008").hard_rule_applied
        with pytest.raises(Exception) as err:
            qj.get_score("c00000009")
        assert getattr(err.value, "reason", None) == "NOT_AUTHORISED"
    assert server.stop() == 0
    assert "started from the snapshot of 300 citizens" in server.output and "re-derived from the store" in server.output


def _record(record_id: str, citizen: str):
    from clients.client import Record

    return Record(record_id=record_id, citizen_id=citizen, variable="court_listed_dishonest_debtor",
                  date="2026-11-20", value=1.0, source="")


def test_a_city_that_outgrew_the_snapshots_room_is_loaded_into_a_bigger_state(city, caplog):
    data, url, before = city
    with open_store(url) as store:
        store.upsert_citizens_bulk([f"grown-{i}" for i in range(600)], np.full(600, 7000, np.int32))
    caplog.set_level(logging.INFO)
    runtime = start(data)
    assert "the city outgrew the snapshot's capacity" in caplog.text
    assert runtime.state.n_citizens == N + 600 and runtime.state.capacity > before.state.capacity


def test_a_sigterm_as_soon_as_it_serves_still_drains_and_writes_the_snapshot(tmp_path):
    """The signal handlers are in place before the server loads: a stop that comes the moment
    health turns SERVING (a supervisor, a test) is a graceful one, never the default action."""
    for workers in ("1", "2"):
        data = tmp_path / f"data-{workers}"
        server = ServeProcess(tmp_path, "--data-dir", str(data), "--seed-citizens", "300", "--workers", workers)
        with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
            server.wait_serving(qj)
        assert server.stop() == 0, server.output
        assert snapshot.snapshot_path(data).exists() and "written in" in server.output


def test_a_snapshot_is_read_in_not_ready(city):
    """Workers map the state before the start reads a snapshot into it, and serve once it is
    READY: the bytes must not say so before every part is in and the changes are replayed."""
    data, _, before = city
    path = snapshot.snapshot_path(data)
    header = snapshot.read_header(path)
    assert before.state.ready
    state = ServingState.allocate(before.spec, header["capacity"], header["token_capacity"], audit_key=before.keys.audit)
    snapshot.load_into(path, header, state)
    assert state.n_citizens == N and not state.ready


def test_a_row_caught_mid_write_by_a_snapshot_is_readable_after_the_start(city):
    """A periodic snapshot copies the rows while writers work: a row whose sequence lock was
    odd then must not leave readers spinning after a start from it."""
    data, url, before = city
    with before.state.lock, before.state.writing(7):  # a writer in row 7 while the snapshot is taken
        before.write_snapshot(exact=True)
    runtime = start(data)
    assert runtime.state.row_seq[7] % 2 == 0
    assert runtime.state.read_row(7, lambda: int(runtime.state.columns.score[7])) == int(before.state.columns.score[7])


def _loaded_on(runtime: Runtime, store_url: str, day: int) -> ServingState:
    from kernel.score import Scorer

    state = ServingState.allocate(runtime.spec, runtime.state.capacity, runtime.state.token_capacity,
                                  audit_key=runtime.keys.audit)
    with open_store(store_url) as store:
        state.load(store, Scorer(runtime.spec, runtime.calibration()), runtime.scenarios, day)
    return state


def test_the_rollovers_index_comes_back_with_the_snapshot(city, caplog):
    """The index of ageing records (server/ageing.py) is written beside the state and read
    once the start serves; a rollover after a snapshot start is a whole load's, reading no
    record from the store."""
    from kernel.score import Scorer
    from server.rollover import roll_over

    data, url, before = city
    caplog.set_level(logging.INFO)
    runtime = start(data)
    assert runtime._ageing_ready.wait(30) and "index of" in caplog.text
    assert len(before.state.ageing) > 0
    for name, array in before.state.ageing.arrays().items():
        np.testing.assert_array_equal(runtime.state.ageing.arrays()[name], array, err_msg=name)
    day = runtime.state.as_of_day + 3
    with open_store(url) as store:
        figures = roll_over(runtime.state, store, Scorer(runtime.spec, runtime.calibration()), runtime.scenarios, day)
    assert figures["read_rows"] == 0 and figures["from_index"] > 0
    want = _loaded_on(runtime, url, day)
    for name in ("features", "adult", "defaults", "gate", "until"):
        np.testing.assert_array_equal(getattr(runtime.state, name)[:N], getattr(want, name)[:N], err_msg=name)


def test_a_damaged_index_is_not_used_and_the_next_rollover_reads_the_store(city, caplog):
    from kernel.score import Scorer
    from server.rollover import roll_over

    data, url, _ = city
    path = snapshot.snapshot_path(data)
    with open(path, "r+b") as fh:  # the last byte: in the index, after the state's parts
        fh.seek(-1, os.SEEK_END)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([byte[0] ^ 0xFF]))
    caplog.set_level(logging.INFO)
    runtime = start(data)
    assert "started from the snapshot" in caplog.text  # the state itself is fine
    assert runtime._ageing_ready.wait(30) and runtime.state.ageing is None
    assert "index of ageing records not used" in caplog.text
    day = runtime.state.as_of_day + 1
    with open_store(url) as store:
        figures = roll_over(runtime.state, store, Scorer(runtime.spec, runtime.calibration()), runtime.scenarios, day)
    assert figures["read_rows"] == N and len(runtime.state.ageing) > 0
    want = _loaded_on(runtime, url, day)
    for name in ("features", "defaults", "gate", "until"):
        np.testing.assert_array_equal(getattr(runtime.state, name)[:N], getattr(want, name)[:N], err_msg=name)
