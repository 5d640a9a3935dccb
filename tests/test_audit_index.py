"""Format 3 of the audit log (server/audit.py): reproducibility fields, ``find`` by decision
id, the per-segment subject index behind ``checks_of``, day rollover and retention. Real
files in tmp_path, real child processes; no mocks."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from conftest import kill_after_flushes
from loadtest import audit_bench
from server import audit
from server.audit import DAY_NS, ENTRY, AuditLog, build_index, city_day

KEY = b"k" * 32
RELEASE = "1+f2ffda0723ab c3a1 r12"


def _ids(entries) -> list[str]:
    return [e.decision_id for e in entries]


def _scan_checks(log: AuditLog, citizen_id: str, limit: int = 100) -> list[str]:
    """checks_of by a full scan of every segment: what the index must reproduce."""
    return _ids(log.entries(subject=log.subject_of(citizen_id))[::-1][:limit])


def test_every_entry_records_what_reproduces_it_and_find_returns_it(tmp_path):
    log = AuditLog(tmp_path, KEY)
    alice, bob = log.subject_of("c00000001"), log.subject_of("c00000002")
    seq, unary_id = log.ids.next()
    log.record(seq, "gate-07", "EligibilityService/Check", "metro_pay_later", alice, 2, RELEASE, 123_456, 20_500)
    batch_seq, batch_id = log.ids.next()
    log.record_batch(batch_seq, "gate-07", "EligibilityService/BatchCheck", "metro_pay_later",
                     np.array([bob, alice], np.uint64), np.array([1, 6], np.uint8), "2+abc c4 r13", 2**64 - 1, -3)
    log.flush()
    first, *items = log.entries()
    assert first.decision_id == unary_id
    assert (first.model_version, first.calibration_version, first.rules_version) == ("1+f2ffda0723ab", "c3a1", "r12")
    assert (first.position, first.as_of_day, first.result, first.subject) == (123_456, 20_500, 2, alice)
    assert _ids(items) == [f"{batch_id}-0", f"{batch_id}-1"]
    assert {(e.model_version, e.calibration_version, e.rules_version, e.position, e.as_of_day) for e in items} == {
        ("2+abc", "c4", "r13", 2**64 - 1, -3)}
    # find: by id, from this writer or any reader with the key, batch items included
    assert log.find(unary_id) == first
    reader = AuditLog(tmp_path, KEY)
    assert reader.find(f"{batch_id}-1") == items[1] and reader.find(f"{batch_id}-0").subject == bob
    assert reader.find(f"{batch_id}-2") is None  # the batch has two items
    assert reader.find(batch_id) is None  # a batch's id is not a disclosure of its own
    assert reader.find(log.ids.id_of(seq + 100)) is None  # not (yet) recorded
    with pytest.raises(ValueError, match="not a decision id"):
        reader.find("d-12")
    with pytest.raises(ValueError, match="not made with this key"):
        AuditLog(tmp_path / "other", b"q" * 32).find(unary_id)
    # Bad reproducibility fields are refused where they are passed.
    with pytest.raises(ValueError, match="position"):
        log.record(5, "g", "m", "s", alice, 1, RELEASE, -1, 0)
    with pytest.raises(ValueError, match="as_of_day"):
        log.record(5, "g", "m", "s", alice, 1, RELEASE, 1, 1 << 31)
    with pytest.raises(ValueError, match="release"):
        log.record(5, "g", "m", "s", alice, 1, "1+abc  r12", 1, 1)
    with pytest.raises(ValueError, match="2\\*\\*48"):
        log.record(1 << 48, "g", "m", "s", alice, 1, RELEASE, 1, 1)
    log.close()


def _busy_log(directory: Path, people: list[str], rounds: int, **kwargs) -> AuditLog:
    """Rounds of unary checks and batches about ``people`` (and unknown cards), flushed
    often, so small segments roll over many times; closed (so every segment is indexed)."""
    log = AuditLog(directory, KEY, **kwargs)
    subjects = log.subjects_of(people)
    rng = np.random.default_rng(5)
    for r in range(rounds):
        seq, _ = log.ids.next()
        log.record(seq, f"gate-{r % 3}", "EligibilityService/Check", "metro_pay_later",
                   int(subjects[r % len(subjects)]), r % 7 + 1, RELEASE, r, 20_000 + r // 50)
        n = 1 + r % 23
        batch = np.where(rng.random(n) < 0.1, 0, subjects[rng.integers(0, len(subjects), n)]).astype(np.uint64)
        seq, _ = log.ids.next()
        log.record_batch(seq, "station-3", "EligibilityService/BatchCheck", "library_deposit_free", batch,
                         rng.integers(1, 8, n).astype(np.uint8), RELEASE, r, 20_000)
        if r % 5 == 4:
            log.flush()
    log.close()
    return log


def test_indexed_checks_of_equals_a_full_scan(tmp_path):
    people = [f"c{i:08d}" for i in range(40)]
    _busy_log(tmp_path, people, 300, segment_bytes=8 << 10)
    segments = sorted(tmp_path.glob("audit-*.bin"))
    assert len(segments) > 5
    assert all(p.with_suffix(".idx").exists() for p in segments)  # rolled over, and the last at close
    reader = AuditLog(tmp_path, KEY)
    for cid in people[:12] + ["c99999999"]:
        for limit in (1, 7, 100, 1000):
            assert _ids(reader.checks_of(cid, limit)) == _scan_checks(reader, cid, limit), (cid, limit)
    full = reader.checks_of(people[3], 1000)
    assert full and all(e.subject == reader.subject_of(people[3]) for e in full)
    assert reader.checks_of(people[3], 0) == []
    # The index is what is read: with the subject of a segment's unary entries erased on
    # disk, a scan no longer finds them there, the index still points at them.
    subject = reader.subject_of(people[3])
    raw = np.fromfile(segments[0], ENTRY)
    mine = (raw["subject"] == subject) & (raw["batch_index"] == audit.UNARY)
    assert mine.any()
    raw["subject"][mine] = 12345
    raw.tofile(segments[0])
    assert len(reader.checks_of(people[3], 1000)) == len(full) > len(_scan_checks(reader, people[3], 1000))


def test_a_torn_or_missing_index_is_never_used_and_is_rebuilt(tmp_path):
    people = [f"c{i:08d}" for i in range(10)]
    _busy_log(tmp_path, people, 200, segment_bytes=8 << 10)
    segments = sorted(tmp_path.glob("audit-*.bin"))
    reader = AuditLog(tmp_path, KEY)
    expected = {cid: _scan_checks(reader, cid) for cid in people}
    torn = segments[1].with_suffix(".idx")
    size = torn.stat().st_size
    os.truncate(torn, size - 8)  # torn: its size no longer matches its header
    segments[2].with_suffix(".idx").unlink()  # missing
    with open(segments[3].with_suffix(".idx"), "r+b") as f:
        f.write(b"NOTINDEX")  # foreign
    fresh = AuditLog(tmp_path, KEY)
    for cid in people:
        assert _ids(fresh.checks_of(cid)) == expected[cid]
    assert audit._index_of(segments[1]) == (None, None) and audit._index_of(segments[3]) == (None, None)
    # Rebuilt whole (as a writer's recovery does for a dead writer's segments: see below).
    for p in segments[1:4]:
        build_index(p)
    assert all(audit._index_of(p)[0] is not None for p in segments[1:4])
    assert torn.stat().st_size == size


def test_a_crashed_writers_segment_is_indexed_by_the_next_writer(tmp_path):
    child = """
import sys, time
from server.audit import AuditLog
log = AuditLog(sys.argv[1], b"k" * 32, flush_interval=0.02).start()
i = 0
next_flush = time.monotonic() + 0.15
while True:
    log.record(i + 1, "gate", "Check", "metro", i % 50 + 1, 1, "1+m c1 r1", i, 1)
    i += 1
    time.sleep(0.0003)
    if time.monotonic() >= next_flush:
        log.flush()
        print(i, flush=True)
        next_flush = time.monotonic() + 0.15
"""
    kill_after_flushes(child, str(tmp_path))
    (segment,) = tmp_path.glob("audit-*.bin")
    assert not segment.with_suffix(".idx").exists()  # SIGKILL: never finished
    scan = {s: _ids(AuditLog(tmp_path, KEY).entries(subject=s)[::-1][:100]) for s in (1, 7, 50)}
    writer = AuditLog(tmp_path, KEY).start()  # its indexer thread recovers the dead writer's segment
    try:
        deadline = time.monotonic() + 10
        while audit._index_of(segment)[0] is None:
            assert time.monotonic() < deadline, "the crashed writer's segment was not indexed"
            time.sleep(0.02)
    finally:
        writer.close()
    header, _ = audit._index_of(segment)
    assert header[2] == segment.stat().st_size // ENTRY.itemsize  # every whole entry
    reader = AuditLog(tmp_path, KEY)
    for s, want in scan.items():
        ix = reader._index(segment)
        got, _ = reader._search_segment(segment, np.array([s, s + 1], np.uint64), ix)
        assert sorted(got["seq"].tolist()) == sorted(reader.ids.parse(d)[1] for d in want)


def test_segments_roll_over_at_city_midnight(tmp_path, monkeypatch):
    day = [20_000]
    monkeypatch.setattr(audit, "city_day", lambda ns: day[0])  # the writer's clock for day boundaries
    log = AuditLog(tmp_path, KEY)
    alice = log.subject_of("c00000001")
    for d in range(3):
        day[0] = 20_000 + d
        for i in range(3):
            log.record(10 * d + i + 1, "gate", "Check", "metro", alice, 1, RELEASE, 1, day[0] - 1)
        log.flush()
        log.flush()  # nothing new: no empty segment
    log.close()
    segments = sorted(tmp_path.glob("audit-*.bin"))
    assert len(segments) == 3
    assert [json.loads(p.with_suffix(".dict").read_text().splitlines()[0])["day"] for p in segments] == [20_000, 20_001, 20_002]
    assert all(p.with_suffix(".idx").exists() for p in segments)
    assert len(log.checks_of("c00000001")) == 9
    # The city day is UTC+8: 16:00 UTC is midnight in Hangzhou.
    before = int(datetime(2026, 3, 1, 15, 59, 59, tzinfo=timezone.utc).timestamp()) * 10**9
    monkeypatch.undo()
    assert city_day(before + 10**9) == city_day(before) + 1
    assert city_day(before - 15 * 3600 * 10**9) == city_day(before)  # 00:59:59 UTC is the same city day


def test_retention_deletes_only_segments_older_than_it(tmp_path):
    rng = np.random.default_rng(3)
    reader = AuditLog(tmp_path, KEY, retention_days=None)
    alice = reader.subject_of("c00000001")
    today = city_day(time.time_ns())
    for age in (40, 30, 3, 1):  # days ago
        start = (today - age) * DAY_NS - audit.CITY_UTC_OFFSET_S * 10**9
        times = np.sort(rng.integers(start, start + DAY_NS, 500, dtype=np.int64))
        subjects = np.full(500, alice, np.uint64)
        bin_path, _ = audit_bench.write_segment(tmp_path, 99, today - age, 1, times, subjects, 0.2, rng)
        build_index(bin_path)
    assert len(reader.checks_of("c00000001", 5000)) == 2000
    log = AuditLog(tmp_path, KEY, retention_days=10).start()  # the writer expires at start and at rollover
    try:
        deadline = time.monotonic() + 10
        while len(list(tmp_path.glob("audit-*.bin"))) > 2:
            assert time.monotonic() < deadline, "old segments were not deleted"
            time.sleep(0.02)
    finally:
        log.close()
    left = sorted(tmp_path.glob("audit-*"))
    assert {p.suffix for p in left} == {".bin", ".items", ".dict", ".idx"} and len(left) == 8
    got = reader.checks_of("c00000001", 5000)
    assert len(got) == 1000 and min(e.time for e in got).timestamp() > time.time() - 5 * 86400
    with pytest.raises(ValueError, match="retention_days"):
        AuditLog(tmp_path, KEY, retention_days=0)


def test_the_year_benchmark_runs_at_a_small_size(capsys):
    out = audit_bench.main(["--days", "4", "--per-day", "20000", "--subjects", "3000", "--queries", "20"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == out
    for key in ("days", "entries", "subjects", "bytes_on_disk", "index_bytes", "build_s", "checks_of_p50_ms", "p99_ms", "max_ms"):
        assert key in line
    assert (line["days"], line["entries"], line["subjects"]) == (4, 80_000, 3000)
    assert line["queries_with_entries"] == 10  # half of the queries were people with entries
    assert 0 < line["index_bytes"] < line["bytes_on_disk"]
    assert line["checks_of_p50_ms"] <= line["p99_ms"] <= line["max_ms"] < 1000


def test_a_segment_of_another_host_is_never_indexed_under_its_writer(tmp_path):
    """Replicas on several hosts may share one directory: a process id from another host
    says nothing here, so recovery leaves that segment alone (readers scan it) while it
    still recovers its own host's dead writers."""
    for name in ("mine", "theirs"):
        log = AuditLog(tmp_path / name, KEY)
        for i in range(50):
            log.record(i + 1, "gate", "Check", "metro", i % 5 + 1, 1, "1+m c1 r1", i, 1)
        log.flush()  # no close: as if its writer were killed
        (seg,) = (tmp_path / name).glob("audit-*.bin")
        dead = 2**22 + 12345  # above pid_max's default: no live process has it
        for suffix in (".bin", ".items", ".dict"):
            seg.with_suffix(suffix).rename(tmp_path / seg.with_suffix(suffix).name.replace(
                f"-{os.getpid()}.", f"-{dead + (name == 'theirs')}."))
        log._fd = log._items_fd = log._dict_fd = None  # (its files were moved away)
    theirs = next(p for p in tmp_path.glob("audit-*.bin") if p.name.endswith(f"-{dead + 1}.bin"))
    mine = next(p for p in tmp_path.glob("audit-*.bin") if p.name.endswith(f"-{dead}.bin"))
    lines = theirs.with_suffix(".dict").read_bytes().split(b"\n")
    header = json.loads(lines[0])
    assert header["host"] == audit.HOST and audit.segment_host(mine) == audit.HOST
    header["host"] = "another-host"
    theirs.with_suffix(".dict").write_bytes(b"\n".join([json.dumps(header).encode(), *lines[1:]]))
    AuditLog(tmp_path, KEY)._recover()
    assert audit._index_of(mine)[0] is not None  # this host's dead writer: recovered
    assert audit._index_of(theirs)[0] is None  # another host's: left to it
    reader = AuditLog(tmp_path, KEY)
    assert len(reader.entries(subject=1)) == 20  # both segments read: 10 entries of subject 1 each
