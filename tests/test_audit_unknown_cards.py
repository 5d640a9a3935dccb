"""Format 4 of the audit log (server/audit.py): a batch's unknown cards (subject 0) are
counted in its header, not written as items; known cards keep their exact decision ids
through run markers. Real files in tmp_path, no mocks."""

from __future__ import annotations

import json
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from conftest import kill_after_flushes
from server import audit
from server.audit import ENTRY, FORMAT, ITEM, UNARY, AuditLog, build_index

KEY = b"k" * 32
METHOD = "EligibilityService/BatchCheck"


def _ids(entries) -> list[str]:
    return [e.decision_id for e in entries]


def _segment(directory: Path) -> Path:
    (bin_path,) = directory.glob("audit-*.bin")
    return bin_path


def _mixed(rng, n: int, people: np.ndarray, known_share: float) -> np.ndarray:
    subjects = np.where(rng.random(n) < known_share, rng.choice(people, n), 0).astype(np.uint64)
    return subjects


def _expected(log: AuditLog, seq: int, subjects: np.ndarray, results: np.ndarray) -> list[tuple[str, int, int]]:
    return [(log.decision_id(seq, i), int(s), int(r)) for i, (s, r) in enumerate(zip(subjects, results)) if s]


def test_a_mixed_batch_keeps_every_known_cards_id_and_counts_the_unknown_ones(tmp_path):
    log = AuditLog(tmp_path, KEY)
    alice, bob = log.subject_of("c00000001"), log.subject_of("c00000002")
    # runs of unknown cards of every awkward length: leading, 1, 255, 256, 257, 600, trailing
    parts = [[0] * 3, [alice], [0], [bob], [0] * 255, [alice], [0] * 256, [bob], [0] * 257, [alice, bob],
             [0] * 600, [alice], [0] * 40]
    subjects = np.array([s for p in parts for s in p], np.uint64)
    results = (np.arange(len(subjects)) % 251).astype(np.uint8)
    n, known = len(subjects), int(np.count_nonzero(subjects))
    log.record_batch(7, "gate-07", METHOD, "metro_pay_later", subjects, results, "1+abc c1 r1", 9, 20_500)
    log.flush()
    bin_path = _segment(tmp_path)
    items_path = bin_path.with_suffix(".items")
    # one header; items: the known cards plus one marker per started 256 unknown cards before one
    markers = 1 + 1 + 1 + 1 + 2 + 3  # before: alice(3), bob(1), alice(255), bob(256), alice(257), alice(600)
    assert bin_path.stat().st_size == ENTRY.itemsize
    assert items_path.stat().st_size == (known + markers) * ITEM.itemsize
    head = np.fromfile(bin_path, ENTRY)[0]
    assert (int(head["batch_index"]), int(head["unknown"]), int(head["subject"])) == (known + markers, n - known, 0)
    items = np.fromfile(items_path, ITEM)
    assert (items["subject"] != 0).sum() == known

    expected = _expected(log, 7, subjects, results)
    got = log.entries()
    assert [(e.decision_id, e.subject, e.result) for e in got] == expected  # nothing for the unknown cards
    assert {(e.caller, e.scenario, e.position, e.as_of_day, e.rules_version) for e in got} == {
        ("gate-07", "metro_pay_later", 9, 20_500, "r1")}
    # find: every known card exactly; an unknown card's position concerns nobody: None
    by_id = {e.decision_id: e for e in got}
    for i in range(n + 2):
        found = log.find(log.decision_id(7, i))
        assert found == by_id.get(log.decision_id(7, i)), i
    # checks_of, scanned (the segment is being written) and then indexed (closed)
    scanned = {c: _ids(log.checks_of(c, 1000)) for c in ("c00000001", "c00000002")}
    assert scanned["c00000001"] == [d for d, s, _ in expected if s == alice][::-1]
    assert scanned["c00000002"] == [d for d, s, _ in expected if s == bob][::-1]
    assert log.entries(subject=0) == []
    log.close()
    assert audit._index_of(bin_path)[0] is not None
    reader = AuditLog(tmp_path, KEY)
    assert {c: _ids(reader.checks_of(c, 1000)) for c in scanned} == scanned
    assert reader.find(log.decision_id(7, 3)) == by_id[log.decision_id(7, 3)]
    # the auditor's view of the batch
    (batch,) = reader.batches()
    assert (batch.batch_id, batch.known, batch.unknown, batch.method) == (log.decision_id(7), known, n - known, METHOD)


def test_random_batches_read_back_like_format_3(tmp_path):
    """Many random mixes, every reader path: entries, entries(subject), checks_of (scan and
    index), find, batches."""
    rng = np.random.default_rng(5)
    log = AuditLog(tmp_path, KEY, segment_bytes=64 << 10)
    people = np.array([log.subject_of(f"c{i:08d}") for i in range(20)], np.uint64)
    expected, counts = [], []
    for seq in range(1, 120):
        n = int(rng.integers(1, 900))
        subjects = _mixed(rng, n, people, [0.0, 0.003, 0.05, 0.5, 0.95, 1.0][seq % 6])
        results = rng.integers(0, 256, n).astype(np.uint8)
        log.record_batch(seq, f"gate-{seq % 3}", METHOD, "metro", subjects, results, "1+abc")
        expected += _expected(log, seq, subjects, results)
        counts.append((log.decision_id(seq), int(np.count_nonzero(subjects)), int(n - np.count_nonzero(subjects))))
        if seq % 7 == 0:
            log.flush()
    log.close()
    assert len(list(tmp_path.glob("audit-*.bin"))) > 2  # rolled over: several indexed segments
    reader = AuditLog(tmp_path, KEY)
    assert [(e.decision_id, e.subject, e.result) for e in reader.entries()] == expected
    assert [(b.batch_id, b.known, b.unknown) for b in reader.batches()] == counts
    for k in (0, 7, 19):
        mine = [d for d, s, _ in expected if s == people[k]]
        assert _ids(reader.entries(subject=int(people[k]))) == mine
        assert _ids(reader.checks_of(f"c{k:08d}", 100_000)) == mine[::-1]
    by_id = {d: (s, r) for d, s, r in expected}
    for seq in rng.choice(np.arange(1, 120), 12, replace=False).tolist():
        for i in range(0, 900, 37):
            found = reader.find(log.decision_id(seq, i))
            want = by_id.get(log.decision_id(seq, i))
            assert (found.subject, found.result) == want if want else found is None, (seq, i)


def test_a_flood_of_unknown_cards_writes_one_header_per_batch(tmp_path):
    log = AuditLog(tmp_path, KEY, max_pending=1000)
    rng = np.random.default_rng(1)
    for seq in range(1, 11):
        # 100,000 random tokens: cards nobody holds (subject 0, UNKNOWN_CARD)
        log.record_batch(seq, "bus_gateway", METHOD, "bus_pay_later", np.zeros(100_000, np.uint64),
                         np.full(100_000, 5, np.uint8), "1+abc")
    log.close()
    bin_path = _segment(tmp_path)
    assert bin_path.stat().st_size == 10 * ENTRY.itemsize  # was 10 * (56 + 900,000)
    assert bin_path.with_suffix(".items").stat().st_size == 0
    assert log.entries() == [] and log.find(log.decision_id(3, 5)) is None
    assert [(b.known, b.unknown) for b in log.batches()] == [(0, 100_000)] * 10
    # back-pressure counts written records, a header alone as one: 10 such batches fit in 1000
    assert log.max_pending == 1000


def test_back_pressure_counts_the_written_records(tmp_path):
    log = AuditLog(tmp_path, KEY, max_pending=10)
    log.record(1, "gate", "Check", "metro", 5, 0, "1+abc")  # 1
    log.record_batch(2, "gate", METHOD, "metro", np.zeros(50_000, np.uint64), np.zeros(50_000, np.uint8), "1+abc")  # 1
    log.record_batch(3, "gate", METHOD, "metro", np.array([0, 0, 7, 0, 8, 0], np.uint64), np.ones(6, np.uint8), "1+abc")  # 4
    assert log._pending == 6
    try:
        log.record_batch(4, "gate", METHOD, "metro", np.arange(1, 6, dtype=np.uint64), np.ones(5, np.uint8), "1+abc")
    except audit.AuditUnavailable:
        pass
    else:
        raise AssertionError("11 records would exceed max_pending=10")
    log.record_batch(5, "gate", METHOD, "metro", np.arange(1, 5, dtype=np.uint64), np.ones(4, np.uint8), "1+abc")
    log.close()
    assert len(log.entries()) == 1 + 2 + 4


def _write_format3_segment(directory: Path, ns: int, pid: int, writer: int, seq: int, subjects, results) -> Path:
    """A segment exactly as format 3 wrote it: every token an item, unknown cards included,
    bytes 49..55 of each entry zero, and a format-3 dictionary header."""
    stem = directory / f"audit-{ns}-{pid}"
    entry3 = np.dtype({"names": [n for n in ENTRY.names if n != "unknown"],
                       "formats": [ENTRY.fields[n][0] for n in ENTRY.names if n != "unknown"],
                       "offsets": [ENTRY.fields[n][1] for n in ENTRY.names if n != "unknown"], "itemsize": 56})
    item_layout = [[n, ITEM.fields[n][0].str, ITEM.fields[n][1]] for n in ITEM.names]
    header = {"format": FORMAT, "version": 3, "itemsize": 56, "pid": pid, "writer": writer, "day": 0,
              "fields": [[n, entry3.fields[n][0].str, entry3.fields[n][1]] for n in entry3.names],
              "items": {"itemsize": 9, "fields": item_layout}}
    codes = [("caller", 0, "gate-old"), ("method", 0, METHOD), ("scenario", 0, "metro"), ("release", 0, "0+old c0 r0")]
    lines = [json.dumps(header)] + [json.dumps({"kind": k, "code": c, "value": v}) for k, c, v in codes]
    stem.with_suffix(".dict").write_text("".join(line + "\n" for line in lines))
    entries = np.zeros(1, entry3)
    entries[0] = (ns + 1000, seq, 0, 3, 4, len(subjects), 0, 0, 0, 0, 0)
    items = np.zeros(len(subjects), ITEM)
    items["subject"], items["result"] = subjects, results
    stem.with_suffix(".items").write_bytes(items.tobytes())
    stem.with_suffix(".bin").write_bytes(entries.tobytes())
    return stem.with_suffix(".bin")


def test_format_3_segments_are_still_read(tmp_path):
    log = AuditLog(tmp_path, KEY)
    alice = log.subject_of("c00000001")
    subjects = np.array([alice, 0, 0, alice, 0], np.uint64)
    results = np.array([1, 5, 5, 2, 5], np.uint8)
    old_writer = log.ids.writer ^ 0xABCDEF  # another writer, same key
    old = _write_format3_segment(tmp_path, time.time_ns() - 10**9, 4243, old_writer, 0x77, subjects, results)
    batch_id = log.ids.encode_many(np.array([old_writer], np.uint64), np.array([0x77], np.uint64))[0]
    log.record_batch(1, "gate", METHOD, "metro", subjects, results, "1+abc")
    log.close()
    got = log.entries()
    # format 3 kept its unknown cards as items (about nobody); format 4 only counts them
    assert [(e.decision_id, e.subject, e.result) for e in got] == [
        *((f"{batch_id}-{i}", int(s), int(r)) for i, (s, r) in enumerate(zip(subjects, results))),
        *((log.decision_id(1, i), int(alice), int(results[i])) for i in (0, 3)),
    ]
    assert got[0].caller == "gate-old" and got[0].rules_version == "r0" and got[0].position == 3
    assert _ids(log.entries(subject=0)) == [f"{batch_id}-{i}" for i in (1, 2, 4)]
    assert [(b.known, b.unknown) for b in log.batches()] == [(2, 3), (2, 3)]
    assert log.find(f"{batch_id}-3").subject == alice and log.find(f"{batch_id}-1").subject == 0
    want = [log.decision_id(1, 3), log.decision_id(1, 0), f"{batch_id}-3", f"{batch_id}-0"]
    assert _ids(log.checks_of("c00000001")) == want  # scanned
    build_index(old)  # indexed now (format 4's index layout)
    assert audit._index_of(old)[0][0] == audit.IDX_MAGIC
    assert _ids(AuditLog(tmp_path, KEY).checks_of("c00000001")) == want
    # an index written by the format-3 code (no offsets array) is still used
    idx = old.with_suffix(".idx")
    raw = idx.read_bytes()
    count = audit._IDX_HEADER.unpack(raw[: audit._IDX_HEADER.size])[1]
    idx.write_bytes(b"QJAIDX03" + raw[8 : len(raw) - 4 * count])
    assert audit._index_of(old)[0][0] == b"QJAIDX03"
    assert _ids(AuditLog(tmp_path, KEY).checks_of("c00000001")) == want


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
        n = 1 + i % 700  # batch i: position j is (base + i) * 1000 + 1 + j, or an unknown card if j % 5 in (1, 2) or j >= 600
        j = np.arange(n, dtype=np.uint64)
        subjects = np.where((j % 5 == 1) | (j % 5 == 2) | (j >= 600), 0, j + (base + i) * 1000 + 1).astype(np.uint64)
        log.record_batch(base + i, "gate", "CheckBatch", "metro", subjects, (j % 7).astype(np.uint8), "m1")
        i += 1
        time.sleep(0.0003)
        if time.monotonic() >= next_flush:
            log.flush()
            print(i, flush=True)  # acknowledged: batches 0 .. i-1 are durable
            next_flush = time.monotonic() + 0.15
    """
)


def test_sigkill_keeps_whole_batches_with_their_exact_ids_and_counts(tmp_path):
    interval = 0.05
    runs = [(*kill_after_flushes(CHILD, str(tmp_path), str(interval), str(base)), base) for base in (0, 1_000_000)]
    reader = AuditLog(tmp_path, KEY)
    by_seq = defaultdict(list)
    for e in reader.entries():
        _, seq, item = reader.ids.parse(e.decision_id)
        by_seq[seq].append((int(e.decision_id.rsplit("-", 1)[1]), e.subject, e.result))
    batches = {reader.ids.parse(b.batch_id)[1]: (b.known, b.unknown) for b in reader.batches()}
    for acked, _, base in runs:
        seqs = sorted(s - base for s in batches if base <= s < base + 1_000_000)
        assert seqs == list(range(len(seqs)))  # a prefix of the batches, nothing twice
        assert len(seqs) >= acked and len(seqs) > 50  # nothing acknowledged is lost
        for i in seqs:  # every batch whole, each known card at its own position
            n = 1 + i % 700
            want = [(j, (base + i) * 1000 + 1 + j, j % 7) for j in range(n) if j % 5 not in (1, 2) and j < 600]
            assert by_seq.get(base + i, []) == want, i
            assert batches[base + i] == (len(want), n - len(want))
    for bin_path in tmp_path.glob("audit-*.bin"):  # every durable header's items are in its segment
        heads = np.fromfile(bin_path, ENTRY, count=bin_path.stat().st_size // ENTRY.itemsize)
        items = bin_path.with_suffix(".items").stat().st_size // ITEM.itemsize
        assert (heads["batch_index"] != UNARY).all() and (heads["subject"] + heads["batch_index"] <= items).all()
