"""The audit log's compact batches (formats 2 and 3, server/audit.py): one header entry per
batch in ``.bin`` plus 9-byte items in ``.items``. Real files in tmp_path, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from conftest import kill_after_flushes
from server.audit import ENTRY, ENTRY_V2, FORMAT, ITEM, UNARY, VERSION, AuditLog

KEY = b"k" * 32
MAIN = Path(__file__).resolve().parents[1]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _ns(when: datetime) -> int:
    return int((when - _EPOCH).total_seconds() * 1e6) * 1000


def _segment(directory: Path) -> tuple[Path, Path]:
    (bin_path,) = directory.glob("audit-*.bin")
    return bin_path, bin_path.with_suffix(".items")


def _ids(entries) -> list[str]:
    return [e.decision_id for e in entries]


def _batch(log: AuditLog, seq: int, subjects, results=None, caller="gate-07", scenario="metro_pay_later"):
    subjects = np.asarray(subjects, dtype=np.uint64)
    results = (np.arange(len(subjects)) % 7).astype(np.uint8) if results is None else np.asarray(results, np.uint8)
    log.record_batch(seq, caller, "EligibilityService/BatchCheck", scenario, subjects, results, "1+abc")


def test_a_batch_is_one_header_and_nine_bytes_per_item(tmp_path):
    log = AuditLog(tmp_path, KEY)
    _batch(log, 1, np.arange(1, 1001))
    log.record(2, "app", "GetScore", "self_view", 5, 100, "1+abc")
    _batch(log, 3, [7, 8, 9])
    log.flush()
    bin_path, items_path = _segment(tmp_path)
    assert bin_path.stat().st_size == 3 * ENTRY.itemsize and ITEM.itemsize == 9
    assert items_path.stat().st_size == 1003 * ITEM.itemsize
    header = json.loads(bin_path.with_suffix(".dict").read_text().splitlines()[0])
    assert (header["format"], header["version"], header["itemsize"], header["items"]["itemsize"]) == (FORMAT, 4, 56, 9)
    assert VERSION == 4 and header["writer"] == log.writer
    # The headers: batch_index = item count, subject = first item's position in the file.
    raw = np.fromfile(bin_path, ENTRY)
    assert raw["batch_index"].tolist() == [1000, UNARY, 3]
    assert raw["subject"].tolist() == [0, 5, 1000]
    items = np.fromfile(items_path, ITEM)
    assert items["subject"][1000:].tolist() == [7, 8, 9] and items["result"][:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    # A later commit in the same segment continues the item positions.
    _batch(log, 4, [10, 11])
    log.close()
    assert np.fromfile(bin_path, ENTRY)["subject"][-1] == 1003
    assert [e.subject for e in log.entries()][-2:] == [10, 11]


def test_round_trip_of_mixed_unary_and_batch_entries(tmp_path):
    log = AuditLog(tmp_path, KEY, flush_interval=0.01).start()
    alice, bob = log.subject_of("c00000001"), log.subject_of("c00000002")
    expected = []  # (decision id, subject, result, method)
    seq = 0
    for round_ in range(40):
        seq += 1
        log.record(seq, "app", "GetScore", "self_view", alice if round_ % 2 else bob, round_ % 256, "1+abc")
        expected.append((log.decision_id(seq), alice if round_ % 2 else bob, round_ % 256, "GetScore"))
        seq += 1
        n = 1 + round_ * 13 % 50
        subjects = np.arange(n, dtype=np.uint64) + 1000 * round_
        subjects[n // 2] = alice
        results = ((np.arange(n) + round_) % 256).astype(np.uint8)
        _batch(log, seq, subjects, results)
        expected += [(log.decision_id(seq, i), int(subjects[i]), int(results[i]), "EligibilityService/BatchCheck") for i in range(n)]
        time.sleep(0.0005 if round_ % 5 else 0.02)  # some commits hold many, some few
    log.close()
    got = log.entries()
    assert [(e.decision_id, e.subject, e.result, e.method) for e in got] == expected  # same order, nothing else
    assert all(e.caller in ("app", "gate-07") and e.model_version == "1+abc" for e in got)
    times = [e.time for e in got]
    assert times == sorted(times)
    # Every item of a batch shares its header's time, caller and scenario.
    by_batch = defaultdict(set)
    for e in got:
        if e.method.endswith("BatchCheck"):
            by_batch[e.decision_id.rsplit("-", 1)[0]].add((e.time, e.caller, e.scenario))
    assert len(by_batch) == 40 and all(len(v) == 1 for v in by_batch.values())
    # Filters: subject (unary and items alike) and time.
    assert _ids(log.entries(subject=alice)) == [i for i, s, _, _ in expected if s == alice]
    cut = _ns(got[len(got) // 2].time)
    assert _ids(log.entries(since_ns=cut)) == [e.decision_id for e in got if _ns(e.time) >= cut]
    assert _ids(log.entries(subject=alice, since_ns=cut)) == [e.decision_id for e in got if _ns(e.time) >= cut and e.subject == alice]


def test_checks_of_finds_every_batch_item_with_its_exact_decision_id(tmp_path):
    log = AuditLog(tmp_path, KEY)
    alice, bob = log.subject_of("c00000001"), log.subject_of("c00000002")
    log.record(1, "app", "GetScore", "self_view", alice, 100, "1+abc")
    _batch(log, 2, [bob, alice, 0, alice], [1, 2, 3, 4])  # alice twice in one batch
    log.flush()
    _batch(log, 3, np.append(np.arange(1, 500, dtype=np.uint64), np.uint64(alice)), caller="station-3", scenario="library_deposit_free")
    log.record(4, "gate", "Check", "metro_pay_later", bob, 1, "1+abc")
    log.close()
    mine = log.checks_of("c00000001")
    assert _ids(mine) == [log.decision_id(3, 499), log.decision_id(2, 3), log.decision_id(2, 1), log.decision_id(1)]
    assert [e.result for e in mine] == [499 % 7, 4, 2, 100]
    assert (mine[0].caller, mine[0].scenario, mine[0].method) == ("station-3", "library_deposit_free", "EligibilityService/BatchCheck")
    assert all(e.subject == alice for e in mine)
    assert _ids(log.checks_of("c00000001", limit=2)) == [log.decision_id(3, 499), log.decision_id(2, 3)]
    assert _ids(log.checks_of("c00000002")) == [log.decision_id(4), log.decision_id(2, 0)]
    assert log.checks_of("c99999999") == []
    assert _ids(log.entries(subject=0)) == []  # unknown cards belong to nobody: counted in the header only
    assert log.find(log.decision_id(2, 2)) is None and log.find(log.decision_id(2, 3)).subject == alice
    # Another process (a reader of the same directory) sees the same.
    assert _ids(AuditLog(tmp_path, KEY).checks_of("c00000001")) == _ids(mine)


def test_record_batch_copies_the_callers_arrays(tmp_path):
    log = AuditLog(tmp_path, KEY)
    subjects, results = np.array([1, 2, 3], np.uint64), np.array([4, 5, 6], np.uint8)
    log.record_batch(1, "gate", "CheckBatch", "metro", subjects, results, "m")
    subjects[:] = 99
    results[:] = 0
    log.record_batch(2, "gate", "CheckBatch", "metro", [7, 8], [1, 1], "m")  # lists convert
    with pytest.raises(ValueError):
        log.record_batch(3, "gate", "CheckBatch", "metro", np.array([1.5]), np.array([0]), "m")
    log.close()
    assert [(e.subject, e.result) for e in log.entries()] == [(1, 4), (2, 5), (3, 6), (7, 1), (8, 1)]


def _three_batches(tmp_path):
    log = AuditLog(tmp_path, KEY)
    alice = log.subject_of("c00000001")
    _batch(log, 1, [alice, 2, 3])
    log.flush()
    log.record(2, "app", "GetScore", "self_view", alice, 100, "1+abc")
    _batch(log, 3, [4, alice])
    log.flush()
    _batch(log, 4, [alice, 6, 7, 8])
    log.close()
    return log, alice


def test_torn_items_file_drops_only_the_incomplete_batch(tmp_path):
    log, _ = _three_batches(tmp_path)
    before = _ids(log.entries())
    assert len(before) == 3 + 1 + 2 + 4
    _, items_path = _segment(tmp_path)
    size = items_path.stat().st_size
    # A partial item appended (garbage): ignored.
    with open(items_path, "ab") as f:
        f.write(b"\x07" * (ITEM.itemsize - 2))
    assert _ids(log.entries()) == before
    # Cut mid-item inside the last batch: that batch has no durable items, so it is not
    # shown at all (all or nothing; a crash cannot produce this, the items are synced first).
    os.truncate(items_path, size - ITEM.itemsize - 4)
    assert _ids(log.entries()) == before[:6]
    assert _ids(log.checks_of("c00000001")) == [log.decision_id(3, 1), log.decision_id(2), log.decision_id(1, 0)]


def test_torn_entry_and_items_without_a_header_are_ignored(tmp_path):
    log, alice = _three_batches(tmp_path)
    before = _ids(log.entries())
    bin_path, items_path = _segment(tmp_path)
    # A crash between the items' fsync and the headers' write: items no header references,
    # even ones about alice, are not disclosures.
    orphans = np.zeros(5, ITEM)
    orphans["subject"] = alice
    with open(items_path, "ab") as f:
        f.write(orphans.tobytes())
    assert _ids(log.entries()) == before
    assert len(log.checks_of("c00000001")) == 4
    # A torn last header (cut mid-entry): the header is gone, so are its items.
    os.truncate(bin_path, bin_path.stat().st_size - 5)
    assert _ids(log.entries()) == before[:6]
    assert _ids(log.checks_of("c00000001")) == [log.decision_id(3, 1), log.decision_id(2), log.decision_id(1, 0)]
    # Still torn with more garbage after it (short of a whole entry): still ignored.
    with open(bin_path, "ab") as f:
        f.write(b"\x01" * 3)
    assert _ids(log.entries()) == before[:6]


def test_segments_roll_over_counting_both_files(tmp_path):
    limit = 4096
    log = AuditLog(tmp_path, KEY, segment_bytes=limit)
    alice = log.subject_of("c00000001")
    expected = []
    for seq in range(1, 31):
        n = 10 + seq * 7 % 90
        subjects = np.arange(n, dtype=np.uint64) + 1000 * seq
        subjects[seq % n] = alice
        _batch(log, seq, subjects)
        expected += [(log.decision_id(seq, i), int(subjects[i])) for i in range(n)]
        log.flush()  # one commit per batch, so rollover happens between them
    big = np.arange(1, 1001, dtype=np.uint64)  # alone larger than a segment: gets one of its own
    _batch(log, 31, big)
    expected += [(log.decision_id(31, i), int(big[i])) for i in range(1000)]
    log.close()
    segments = sorted(tmp_path.glob("audit-*.bin"))
    assert len(segments) >= 4
    for bin_path in segments:
        items_path = bin_path.with_suffix(".items")
        total = bin_path.stat().st_size + items_path.stat().st_size
        heads = np.fromfile(bin_path, ENTRY)
        assert total <= limit or len(heads) == 1, (bin_path.name, total)
        # Every header points into its own segment's items file.
        assert (heads["subject"] + heads["batch_index"]).max() * ITEM.itemsize == items_path.stat().st_size
    assert [(e.decision_id, e.subject) for e in log.entries()] == expected
    assert _ids(log.checks_of("c00000001", limit=1000)) == [log.decision_id(s, s % (10 + s * 7 % 90)) for s in range(30, 0, -1)]


def _write_format1_segment(directory: Path, ns: int, pid: int, alice: int, bob: int) -> Path:
    """A segment exactly as format 1 wrote it: every batch item its own 48-byte entry."""
    stem = directory / f"audit-{ns}-{pid}"
    header = {"format": FORMAT, "version": 1, "itemsize": 48, "pid": pid,
              "fields": [[n, ENTRY_V2.fields[n][0].str, ENTRY_V2.fields[n][1]] for n in ENTRY_V2.names]}
    codes = [("writer", 0, "0ld0ld01"), ("caller", 0, "gate-old"), ("method", 0, "Check"),
             ("method", 1, "CheckBatch"), ("scenario", 0, "metro"), ("model", 0, "0+old")]
    lines = [json.dumps(header)] + [json.dumps({"kind": k, "code": c, "value": v}) for k, c, v in codes]
    stem.with_suffix(".dict").write_text("".join(line + "\n" for line in lines))
    rows = np.zeros(4, ENTRY_V2)
    t = ns + 1000
    rows[0] = (t, 0x10, alice, 0, UNARY, 0, 0, 0, 0, 3)
    for i, (subject, result) in enumerate([(bob, 1), (alice, 2), (0, 5)]):
        rows[1 + i] = (t + 1000, 0x11, subject, 0, i, 0, 1, 0, 0, result)
    stem.with_suffix(".bin").write_bytes(rows.tobytes() + b"\x02" * 30)  # and a torn tail
    return stem.with_suffix(".bin")


def test_format_1_segments_are_still_read(tmp_path):
    log = AuditLog(tmp_path, KEY)
    alice, bob = log.subject_of("c00000001"), log.subject_of("c00000002")
    _write_format1_segment(tmp_path, time.time_ns() - 10**9, 4242, alice, bob)
    log.record(1, "app", "GetScore", "self_view", alice, 100, "1+abc")
    _batch(log, 2, [alice, bob])
    log.close()
    got = log.entries()
    old = ["d-0ld0ld01-10", "d-0ld0ld01-11-0", "d-0ld0ld01-11-1", "d-0ld0ld01-11-2"]
    assert _ids(got) == old + [log.decision_id(1), log.decision_id(2, 0), log.decision_id(2, 1)]
    assert [(e.caller, e.method, e.scenario, e.model_version, e.subject, e.result) for e in got[:4]] == [
        ("gate-old", "Check", "metro", "0+old", alice, 3),
        ("gate-old", "CheckBatch", "metro", "0+old", bob, 1),
        ("gate-old", "CheckBatch", "metro", "0+old", alice, 2),
        ("gate-old", "CheckBatch", "metro", "0+old", 0, 5),
    ]
    assert _ids(log.checks_of("c00000001")) == [log.decision_id(2, 0), log.decision_id(1), "d-0ld0ld01-11-1", "d-0ld0ld01-10"]
    assert _ids(log.entries(subject=0)) == ["d-0ld0ld01-11-2"]


def test_an_unknown_format_version_is_refused(tmp_path):
    log = AuditLog(tmp_path, KEY)
    log.record(1, "app", "GetScore", "self_view", 5, 100, "1+abc")
    log.close()
    dict_path = next(tmp_path.glob("audit-*.dict"))
    lines = dict_path.read_text().splitlines()
    header = json.loads(lines[0])
    dict_path.write_text("\n".join([json.dumps({**header, "version": 5})] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="unsupported audit format"):
        AuditLog(tmp_path, KEY).entries()


FAILING_DISK = textwrap.dedent(
    """
    # A real write failure: RLIMIT_FSIZE makes writes past the limit fail with EFBIG (after
    # a partial write), in this process only.
    import resource, signal, sys
    import numpy as np
    from server.audit import ENTRY, ITEM, AuditLog
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    log = AuditLog(sys.argv[1], b"k" * 32, max_pending=10**9)
    def batch(seq, n):
        log.record_batch(seq, "gate", "CheckBatch", "metro", np.arange(seq * 1000, seq * 1000 + n, dtype=np.uint64),
                         np.zeros(n, np.uint8), "m1")
    batch(1, 100)
    log.flush()
    (bin_path,) = __import__("pathlib").Path(sys.argv[1]).glob("audit-*.bin")
    items_path = bin_path.with_suffix(".items")
    sizes = lambda: (bin_path.stat().st_size, items_path.stat().st_size)
    assert sizes() == (ENTRY.itemsize, 900), sizes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def flush_must_fail():
        try:
            log.flush()
        except OSError:
            return
        raise SystemExit("the commit should have failed")

    # 1. The items fit, the entries do not: the items (written and synced) are cut back too.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    for i in range(100):
        log.record(10 + i, "gate", "Check", "metro", 5, 0, "m1")
    batch(2, 10)
    flush_must_fail()
    assert sizes() == (ENTRY.itemsize, 900), sizes()
    assert len(AuditLog(sys.argv[1], b"k" * 32).entries()) == 100

    # 2. The items do not fit (and the first failure is carried along): no header is written.
    batch(3, 1000)
    flush_must_fail()
    assert sizes() == (ENTRY.itemsize, 900), sizes()

    # 3. The disk has room again: everything is written once, in order.
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    log.close()
    assert sizes() == (ENTRY.itemsize * (2 + 100 + 1), 9 * (100 + 10 + 1000)), sizes()
    entries = AuditLog(sys.argv[1], b"k" * 32).entries()
    got = [e.decision_id for e in entries]
    assert len(got) == len(set(got)) == 100 + 100 + 10 + 1000, len(got)
    # the retried items are the ones recorded (a commit's buffers are reused by the next)
    subjects = sorted(e.subject for e in entries if e.method == "CheckBatch")
    assert subjects == [*range(1000, 1100), *range(2000, 2010), *range(3000, 4000)], subjects[:5]
    print("ok")
    """
)


def test_a_failed_commit_cuts_both_files_back_and_is_retried(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(MAIN))
    out = subprocess.run([sys.executable, "-c", FAILING_DISK, str(tmp_path)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from server.audit import AuditLog
    log = AuditLog(sys.argv[1], b"k" * 32, flush_interval=float(sys.argv[2])).start()
    base = int(sys.argv[3])
    i = 0
    next_flush = time.monotonic() + 0.15
    while True:
        n = 1 + i % 60  # batch i: items (base + i) * 1000 + 1 .. + n, results j % 7
        subjects = np.arange(n, dtype=np.uint64) + (base + i) * 1000 + 1
        log.record_batch(base + i, "gate", "CheckBatch", "metro", subjects, (np.arange(n) % 7).astype(np.uint8), "m1")
        i += 1
        time.sleep(0.0003)
        if time.monotonic() >= next_flush:
            log.flush()
            print(i, flush=True)  # acknowledged: batches 0 .. i-1 are durable
            next_flush = time.monotonic() + 0.15
    """
)


def _run_and_kill(directory: Path, interval: float, base: int) -> tuple[int, int]:
    return kill_after_flushes(CHILD, str(directory), str(interval), str(base))


def test_sigkill_loses_at_most_the_last_flush_interval_of_batches(tmp_path):
    interval = 0.05
    runs = [(*_run_and_kill(tmp_path, interval, base), base) for base in (0, 1_000_000)]  # a restart: a second segment
    reader = AuditLog(tmp_path, KEY)
    got = reader.entries()
    assert len(list(tmp_path.glob("audit-*.bin"))) == 2
    by_seq = defaultdict(list)
    for e in got:
        _, seq, item = reader.ids.parse(e.decision_id)  # the child's writer, the same key
        assert item is not None, e.decision_id
        by_seq[seq].append(e)
    for acked, killed_ns, base in runs:
        seqs = sorted(s - base for s in by_seq if base <= s < base + 1_000_000)
        assert seqs == list(range(len(seqs)))  # a prefix of the batches, nothing twice
        assert len(seqs) >= acked and len(seqs) > 100  # nothing acknowledged is lost
        for i in seqs:  # and every batch whole: header durable => its items durable
            items = by_seq[base + i]
            n = 1 + i % 60
            assert [e.subject for e in items] == [(base + i) * 1000 + 1 + j for j in range(n)]
            assert [e.result for e in items] == [j % 7 for j in range(n)]
            assert [e.decision_id.rsplit("-", 1)[1] for e in items] == [str(j) for j in range(n)]
        newest_ns = max(_ns(e.time) for e in by_seq[base + seqs[-1]])
        assert killed_ns - newest_ns <= (interval + 0.2) * 1e9, ((killed_ns - newest_ns) / 1e6, "ms")
    # On disk: every durable header's items lie inside its segment's items file.
    for bin_path in tmp_path.glob("audit-*.bin"):
        heads = np.fromfile(bin_path, ENTRY, count=bin_path.stat().st_size // ENTRY.itemsize)
        items = np.fromfile(bin_path.with_suffix(".items"), ITEM)
        assert (heads["subject"] + heads["batch_index"] <= len(items)).all()
        assert (items["subject"][heads["subject"].astype(np.int64)] % 1000 == 1).all()  # each starts its batch
