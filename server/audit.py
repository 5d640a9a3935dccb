"""The audit log of disclosures (docs/product.md §5): who saw what about whom, when, and what
reproduces it.

Every disclosure — a score view, an explanation, an eligibility decision, and each token of
a gateway's batch check — is recorded: time, decision id (writer + sequence number + index in
a batch), caller, method, scenario or purpose, pseudonymous subject, result code, and what
an appeal needs to replay it: the release (model, calibration and rules versions), the
store position the served state reflected and the day the features were derived for. A
citizen can list who checked them, each batch item included; ``find`` fetches the entry of
one decision id.

Usage (one ``AuditLog`` per worker process, created after any fork)::

    log = AuditLog("data/audit", key=config.audit_key).start()  # also: flush_interval, max_pending,
                                                                  # high_water, retention_days, sync
    seq, decision_id = log.ids.next()                         # "d-<32 hex>" (server/decision_ids.py)
    log.record(seq, "gate-07", "Check", "metro_pay_later", log.subject_of("c00000042"), 0,
               "1+f2ff 3a9c r7", position, as_of_day)        # release: "<model> <calibration> <rules>"
    log.record_batch(seq2, "gate-07", "CheckBatch", "metro_pay_later", subjects, outcomes, release, position, day)
    ...
    log.checks_of("c00000042")                                # who checked me, newest first
    log.find(decision_id)                                     # that decision's entry, for an appeal
    log.close()                                               # flush and stop (also at exit)

Durability bound. Appending never touches the disk: ``record``/``record_batch`` put the
entry in memory under a lock, and a background thread writes everything pending once per
``flush_interval`` (group commit: the batch items with one ``write`` + ``fdatasync``, then
the entries with one ``write`` + ``fdatasync``). Hence:

* when ``flush()`` returns, every entry appended before it was called is on disk;
* a crash (even SIGKILL) loses at most the entries appended after the last completed group
  commit took its batch, i.e. those appended during the last ``flush_interval`` plus the
  time of one group commit (two writes + fsyncs). Nothing older is ever lost, and nothing
  is written twice. A batch is all or nothing: its items appear together or not at all.
* ``close()`` (also registered with ``atexit``) flushes on an orderly shutdown.

Back-pressure: appending never waits for the disk. At most ``max_pending`` disclosures
(unary entries + written batch records: items and markers, a batch with none counting
one for its header) may be accepted but not yet durable — queued, or taken by a
group commit still writing, or kept from a failed one. When the queue passes ``high_water``
the flusher is woken at once (a burst is written right away, not an interval later). When
the bound is reached (the disk cannot keep up, or commits fail: disk full), ``record`` and
``record_batch`` raise ``AuditUnavailable`` at once, without queuing anything: the service
answers UNAVAILABLE and discloses nothing unaudited. Nothing accepted is ever dropped: a
failed commit cuts both files back to their durable ends and is retried first by the next
one; as soon as a commit completes, the bound frees up and appending is accepted again (no
restart, no operator action). Memory is bounded by ``max_pending`` disclosures (about
100 bytes each queued): ``record_batch`` compacts a batch itself, so its unknown cards are
never queued. A batch larger than ``max_pending`` is accepted only into an
empty queue.

Decision ids (server/decision_ids.py): ``ids`` (a ``DecisionIds`` under a key derived from
the audit key, with this writer's random 64-bit number) makes them: ``d-`` + 32 hex digits
that encrypt (writer, seq), and ``<batch id>-<i>`` for item i of a batch. A segment's
dictionary header holds its writer's number, the entries hold seq and batch_index, so
readers rebuild every id exactly, and ``find`` turns an id back into its entry.

Files (format 4). Each writer appends to its own segment (a new one per process start,
per city day — UTC+8 — and whenever the segment's two data files together would exceed
``segment_bytes``), so several worker processes share a directory without any locking:

* ``<dir>/audit-<start-unix-ns>-<pid>.bin``: fixed-width 56-byte entries (``ENTRY``). A
  unary disclosure is one entry with ``batch_index`` = ``UNARY``. A batch is ONE header
  entry: its time, seq (the batch's), codes, ``batch_index`` = L, its records in the
  ``.items`` file (< ``UNARY``), ``subject`` = the position of its first record there,
  ``result`` unused (0) and ``unknown`` (bytes 52..55, uint32) = its unknown cards.
* ``<dir>/audit-<start-unix-ns>-<pid>.items``: fixed-width 9-byte records (``ITEM``:
  subject uint64 LE, result uint8), a batch's contiguous and in order. Only tokens that
  found a person (subject != 0) are items: an unknown card concerns nobody and discloses
  nothing about a person, so it is only counted in the header. To keep every item's batch
  position (its decision id ``<batch id>-<i>``), the unknown cards just before an item are
  written as run markers before it: a record with subject 0 and result r stands for r + 1
  (1..256) skipped positions; an item's position is the number of positions the records
  before it in its batch stand for (markers r + 1, items 1); unknown cards after the last
  item are not written at all. Why this, not a uint32 position in every item (13 bytes):
  the common gateway batch is mostly known cards, which stay 9 bytes each, and a batch of
  only known cards is exactly format 3's layout; unknown cards cost at most one 9-byte
  marker per run of up to 256 before an item, never more than format 3 did, and a batch of
  only unknown cards (a flood of random tokens) costs its 56-byte header alone (format 3:
  900,056 bytes per 100,000 tokens). So a batch's bytes are bounded by
  9 x (2 x known + unknown / 256) + 56. The markers are never read as entries, and a
  known card's entry (decision id, batch_index, everything) is the one format 3 gave.
  ``find`` of an unknown card's position returns None (it concerns nobody), ``entries``
  and ``checks_of`` have no entries for them (``entries(subject=0)`` finds only unary
  ones); ``batches()`` lists every batch with its known and unknown counts for an auditor.
* ``<dir>/audit-<start-unix-ns>-<pid>.dict``: strings (callers, methods, scenarios,
  releases) coded as small integers, JSON lines: a header (format, version, writer, its
  host, both record layouts), then one line per code. The host (:data:`HOST`) lets writers
  on several machines share one directory: a writer recovers only the segments of dead
  writers of its own host.
* ``<dir>/audit-<start-unix-ns>-<pid>.idx``: the subject index of a finished segment (below).

Write order makes every durable entry decodable: the dictionary lines are fsynced before any
entry using a new code, and a commit fsyncs its items before it writes the headers that
reference them, so a durable header always has durable items. A crash can leave a torn last
entry, item or dictionary line, and items whose header never made it: readers ignore a
trailing partial entry or item (file size not a multiple of the record size), a partial
dictionary line, and any item not inside a durable header's range. A restarted process
opens a new segment and never appends after a torn tail. Segments of formats 1 (48-byte
entries, one per batch item, no ``.items``), 2 (48-byte entries + items) and 3 (format 4's
layout with bytes 49..55 zero, every token an item, unknown cards included as subject-0
items) are still read; entries of formats 1 and 2 have no calibration or rules version,
position or day ("" and 0). A segment whose dictionary was lost is read as format 4.

Who checked me at a year's volume. When a segment is finished — rolled over, at ``close``,
or found unindexed by a later writer after its process died — a background thread (never
the appending one) writes its subject index: every (subject, entry or item) pair of the
segment sorted by subject (format ``QJAIDX04``: with each item's record offset in its
batch next to its batch position; ``QJAIDX03`` indexes of format-3 segments are still used), with a sparse fence of every ``FENCE``-th subject and the
segment's time range in a 64-byte header (``build_index``). It is written to a temporary
name, fsynced and renamed, and size-checked against its header when read, so a torn index
is never used (the segment is scanned instead, and the next writer rebuilds it).
``checks_of`` visits segments newest first: an indexed one costs a search in its cached
fence plus one read of a fence block (the whole segment is not read); only unindexed
segments (the current ones) are scanned; it stops once ``limit`` entries newer than every
segment left are found.

Retention: a writer deletes, at each rollover, the segments of every writer whose newest
entry is older than ``retention_days`` (default 1,096 days = 3 years: the longest a serious
negative record counts towards a score, so any decision a record could have caused can
still be appealed and replayed while that record can matter).

Privacy. The subject is a keyed pseudonym: the first 8 bytes of HMAC-SHA256(key,
citizen_id) as a little-endian uint64 (0 is reserved for "no person", e.g. an unknown
card). The key comes from configuration, never from the repository; without it the files
cannot be linked back to a citizen id, and no citizen id is ever written to them.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import queue
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from server.decision_ids import SEQ_LIMIT, DecisionIds, ids_key
from server.files import fsync_dir

log = logging.getLogger(__name__)

FORMAT = "qianjiang-audit"
VERSION = 4  # 1: one entry per batch item, no .items file; 2: 48-byte entries; 3: every token an item (all still read)
READABLE = (1, 2, 3, 4)
_COMPACT = (3, 4)  # 56-byte entries, a writer number in the dictionary, decision ids rebuilt exactly
UNARY = 0xFFFFFFFF  # batch_index of an entry that is not part of a batch
SEGMENT_BYTES = 256 << 20
RETENTION_DAYS = 3 * 365 + 1  # see the module docstring
CITY_UTC_OFFSET_S = 8 * 3600  # Asia/Shanghai, no daylight saving: segments roll over at city midnight
DAY_NS = 86_400 * 10**9

# Little-endian explicitly so segments are portable; 56 bytes so every entry (and its
# int64/uint64 fields) is 8-byte aligned. Format 3 is the same layout with bytes 49..55 all
# padding (zeros): read as format 4, its headers have ``unknown`` = 0.
ENTRY = np.dtype(
    {
        "names": ["time_ns", "seq", "subject", "position", "as_of_day", "batch_index",
                  "caller", "method", "scenario", "release", "result", "unknown"],
        "formats": ["<i8", "<u8", "<u8", "<u8", "<i4", "<u4", "<u2", "<u2", "<u2", "<u2", "u1", "<u4"],
        "offsets": [0, 8, 16, 24, 32, 36, 40, 42, 44, 46, 48, 52],
        "itemsize": 56,
    }
)
_PACK_ENTRY = struct.Struct("<qQQQiIHHHHB3xI").pack  # ENTRY's layout, for the group commit
assert struct.calcsize("<qQQQiIHHHHB3xI") == ENTRY.itemsize
# Formats 1 and 2: 48 bytes, a per-entry writer code, a model version instead of a release.
ENTRY_V2 = np.dtype(
    {
        "names": ["time_ns", "seq", "subject", "writer", "batch_index", "caller", "method", "scenario", "model", "result"],
        "formats": ["<i8", "<u8", "<u8", "<u4", "<u4", "<u2", "<u2", "<u2", "<u2", "u1"],
        "offsets": [0, 8, 16, 24, 28, 32, 34, 36, 38, 40],
        "itemsize": 48,
    }
)
# What readers work on: ENTRY plus, in its padding (zero on disk), a format-1/2 writer code
# (dictionary codes are below 2**16).
_ROW = np.dtype(
    {
        "names": [*ENTRY.names, "writer"],
        "formats": [ENTRY.fields[n][0] for n in ENTRY.names] + ["<u2"],
        "offsets": [ENTRY.fields[n][1] for n in ENTRY.names] + [50],
        "itemsize": ENTRY.itemsize,
    }
)
# One batch item: packed, no padding — the bulk of the log at high batch rates. In format 4
# an item with subject 0 is a run marker: ``result`` + 1 (1..256) unknown cards skipped.
ITEM = np.dtype({"names": ["subject", "result"], "formats": ["<u8", "u1"], "offsets": [0, 8], "itemsize": 9})
_KINDS = ("caller", "method", "scenario", "release")
_STRINGS_CACHED = 4096  # (caller, method, scenario, release) combinations whose codes are remembered
_LIMIT = 1 << 16  # codes of each kind
_SEGMENT_RE = re.compile(r"^audit-(\d+)-(\d+)\.bin$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_U64, _U8 = np.dtype("<u8"), np.dtype("u1")
_CHUNK = 1 << 16  # records per read: bounded memory, and no memmap to SIGBUS on a concurrent truncate

# The subject index (.idx): a header, the fence (every FENCE-th subject), the sorted
# subjects, and for each its reference: entry position << 32 | position in the batch
# (UNARY for a unary entry). Subject 0 (no person) is left out.
IDX_MAGIC = b"QJAIDX04"
_IDX_MAGIC_03 = b"QJAIDX03"  # still read: no offsets, an item's record is its batch position
_IDX_HEADER = struct.Struct("<8sQQQqqQQ")  # magic, count, entries, items, min_ns, max_ns, fence_every, fences
assert _IDX_HEADER.size == 64
FENCE = 1024
_NO_INDEX = (None, None)
_NEVER = 1 << 63  # "newest entry" of an unindexed segment: visited first


class _Indexed:
    """A segment's valid index as readers keep it: header, fence, paths, and whether it
    covers every entry of the segment."""

    __slots__ = ("header", "fence", "idx", "bin", "items", "complete", "info")

    def __init__(self, header, fence, idx, bin_, items, complete):
        self.header, self.fence, self.idx, self.bin, self.items, self.complete = header, fence, idx, bin_, items, complete
        self.info = None  # the segment's dictionary, once needed


@dataclass(frozen=True, slots=True)
class AuditEntry:
    decision_id: str
    time: datetime  # UTC
    caller: str
    method: str
    scenario: str  # scenario or purpose
    result: int  # outcome code
    model_version: str
    subject: int  # pseudonym; 0 = no person
    calibration_version: str = ""  # formats 1 and 2: ""
    rules_version: str = ""
    position: int = 0  # the store's change sequence the served state reflected (formats 1, 2: 0)
    as_of_day: int = 0  # days since 1970-01-01 the features were derived for (formats 1, 2: 0)


@dataclass(frozen=True, slots=True)
class AuditBatch:
    """One batch as its header records it (``AuditLog.batches``)."""

    batch_id: str  # its items' decision ids are "<batch_id>-<i>"
    time: datetime  # UTC
    caller: str
    method: str
    scenario: str
    model_version: str
    calibration_version: str
    rules_version: str
    position: int
    as_of_day: int
    known: int  # tokens that found a person: one entry each
    unknown: int  # unknown cards (subject 0): counted, no entries (format 4; before: items about nobody)


class AuditUnavailable(RuntimeError):
    """The audit log cannot take the disclosure now (closed, or ``max_pending`` disclosures
    wait for a slow or failing disk): the disclosure is refused, never made unrecorded."""


class AuditFull(RuntimeError):
    """The audit dictionary has no code left for a new caller, method, purpose or release."""


def pseudonym(key: bytes, citizen_id: str) -> int:
    """The keyed pseudonym of a citizen: HMAC-SHA256(key, id)[:8] as little-endian uint64.
    The (2**-64) digest 0 maps to 1 because 0 means "no person"."""
    digest = hmac.new(key, citizen_id.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") or 1


def city_day(time_ns: int) -> int:
    """The city (UTC+8) day of a time, in days since 1970-01-01."""
    return (time_ns + CITY_UTC_OFFSET_S * 10**9) // DAY_NS


def _host_id() -> str:
    """Which machine (and PID namespace) a process runs in: process ids mean something only
    there. Replicas on several hosts may share one audit directory (a shared file system:
    docs/replicas.md); a writer recovers only its own host's dead writers' segments."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(Path(path).read_text().strip() if path.endswith("boot_id") else str(os.stat(path).st_ino))
        except OSError:
            parts.append("")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


HOST = _host_id()


def segment_header(writer: int, pid: int, day: int) -> dict:
    """The first line of a format-3 segment's dictionary (``host``: :data:`HOST`)."""
    return {"format": FORMAT, "version": VERSION, "itemsize": ENTRY.itemsize, "pid": pid, "writer": writer,
            "host": HOST, "day": day, "fields": _layout(ENTRY),
            "items": {"itemsize": ITEM.itemsize, "fields": _layout(ITEM)}}


def segment_host(bin_path: Path) -> str | None:
    """The host of the writer of a segment (None: written before hosts were recorded, or
    its dictionary is missing or torn)."""
    try:
        with open(bin_path.with_suffix(".dict"), "rb") as f:
            first = f.readline()
        return json.loads(first).get("host")
    except (OSError, ValueError, AttributeError):
        return None


class AuditLog:
    def __init__(
        self,
        directory,
        key: bytes,
        flush_interval: float = 0.05,
        max_pending: int = 1_000_000,
        *,
        segment_bytes: int = SEGMENT_BYTES,
        high_water: int | None = None,
        retention_days: int | None = RETENTION_DAYS,
        sync=os.fdatasync,
        writer: int | None = None,
    ):
        """``high_water``: queued disclosures that wake the flusher early (default
        min(16384, max_pending // 2)); ``retention_days`` None keeps every segment;
        ``sync(fd)`` makes a write durable (os.fdatasync; tests slow it down); ``writer``:
        this writer's 64-bit number in its decision ids (random by default)."""
        if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
            raise ValueError("the audit key must be at least 16 bytes (from configuration)")
        if flush_interval <= 0 or max_pending < 1 or segment_bytes < ENTRY.itemsize:
            raise ValueError("flush_interval, max_pending and segment_bytes must be positive")
        if high_water is not None and not 1 <= high_water <= max_pending:
            raise ValueError(f"high_water {high_water} must be in [1, max_pending={max_pending}]")
        if retention_days is not None and retention_days < 1:
            raise ValueError(f"retention_days {retention_days} must be at least 1 (or None: keep everything)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = bytes(key)
        self.flush_interval = float(flush_interval)
        self.max_pending = int(max_pending)
        self.high_water = int(high_water) if high_water is not None else max(1, min(16384, max_pending // 2))
        self.segment_bytes = int(segment_bytes)
        self.retention_days = retention_days
        self._sync = sync
        self.ids = DecisionIds(ids_key(self._key), writer)
        self.writer = self.ids.writer

        # Appending side, guarded by _lock (held only for list appends and the swap).
        self._lock = threading.Lock()
        # Entries as tuples, unary and batch headers in append order: converted by the
        # flusher, not the caller. Header k's items are _subjects[k] / _results[k].
        self._rows: list[tuple] = []
        self._subjects: list[np.ndarray] = []
        self._results: list[np.ndarray] = []
        self._new_lines: list[str] = []  # dictionary lines of codes assigned since the last swap
        self._pending = 0  # disclosures queued: unary entries + batch items
        self._backlog = 0  # and taken by a commit not yet durable (writing, or carried after a failure)
        self._woken = False  # the flusher was woken for the current queue
        self._codes: dict[str, dict[str, int]] = {k: {} for k in _KINDS}
        self._entry_codes: dict[tuple[str, str, str, str], tuple[int, int, int, int]] = {}  # _codes_of
        self._closed = False

        # Writing side, guarded by _io_lock (one group commit at a time, in swap order).
        self._io_lock = threading.Lock()
        self._fd: int | None = None
        self._items_fd: int | None = None
        self._dict_fd: int | None = None
        self._bin_path: Path | None = None
        self._segment_day: int | None = None
        self._size = 0  # durable bytes of the current segment's entries
        self._items_size = 0  # and of its items
        self._dict_size = 0
        self._lines_written: list[str] = []  # all code lines so far: a new segment repeats them
        # A failed commit, retried first: its entries (headers pointing into its own items),
        # items, dictionary lines and number of disclosures.
        self._carry: tuple[np.ndarray, np.ndarray, list[str], int] | None = None
        # buffers kept from one group commit to the next (_items_scratch)
        self._items_buf, self._subjects_buf, self._results_buf = np.empty(0, ITEM), np.empty(0, _U64), np.empty(0, _U8)

        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._indexer: threading.Thread | None = None
        self._finished: queue.SimpleQueue = queue.SimpleQueue()  # segments to index, None to stop
        self._dict_cache: dict[Path, tuple[int, tuple]] = {}
        self._fences: dict[str, _Indexed] = {}  # segment name -> its index (found valid)
        atexit.register(self.close)

    # --- pseudonyms and ids -----------------------------------------------------------

    def subject_of(self, citizen_id: str) -> int:
        return pseudonym(self._key, citizen_id)

    def subjects_of(self, citizen_ids) -> np.ndarray:
        """Pseudonyms of many citizens (e.g. a per-row column precomputed for batch checks)."""
        return np.fromiter((pseudonym(self._key, c) for c in citizen_ids), dtype=np.uint64)

    def decision_id(self, seq: int, batch_index: int | None = None) -> str:
        """This writer's id of decision ``seq`` (item ``batch_index`` of a batch)."""
        return self.ids.id_of(seq, batch_index)

    @property
    def writer_prefix(self) -> str:
        """Transitional, for callers that still build ``d-<prefix>-<seq>`` ids themselves:
        such ids do not match this log's entries; use ``ids``."""
        return f"{self.writer:016x}"

    # --- appending (any thread; never any I/O) -----------------------------------------

    def _code(self, kind: str, value: str) -> int:
        codes = self._codes[kind]
        code = codes.get(value)  # lock-free fast path: a dict read is atomic under the GIL
        if code is None:
            if not isinstance(value, str):
                raise TypeError(f"{kind} must be a str, not {type(value).__name__}")
            if kind == "release" and not (value and 1 <= len(value.split(" ")) <= 3 and all(value.split(" "))):
                raise ValueError(f"release {value[:80]!r} must be '<model_version> <calibration_version> <rules_version>'")
            with self._lock:
                code = codes.get(value)
                if code is None:
                    code = len(codes)
                    if code >= _LIMIT:
                        raise AuditFull(f"too many distinct {kind} values for the audit dictionary")
                    codes[value] = code
                    # Queued under the same lock as entries, so the swap that takes an entry
                    # using this code also takes (or already took) the code's line.
                    self._new_lines.append(json.dumps({"kind": kind, "code": code, "value": value}, ensure_ascii=False))
        return code

    def _codes_of(self, caller: str, method: str, scenario: str, release: str) -> tuple[int, int, int, int]:
        """The four codes of an entry's strings, remembered for the next entry with the same
        four (one lookup instead of four on the per-check path; a few hundred combinations
        at most: callers, methods, scenarios and releases are all configured)."""
        key = (caller, method, scenario, release)
        codes = self._entry_codes.get(key)
        if codes is None:
            codes = (self._code("caller", caller), self._code("method", method),
                     self._code("scenario", scenario), self._code("release", release))
            if len(self._entry_codes) < _STRINGS_CACHED:
                self._entry_codes[key] = codes
        return codes

    def record(
        self, decision_seq: int, caller: str, method: str, scenario: str, subject: int, result: int,
        release: str, position: int = 0, as_of_day: int = 0, at_ns: int | None = None,
    ) -> None:
        """One unary disclosure; its decision id is ``ids.id_of(decision_seq)``. ``release``
        is "<model_version> <calibration_version> <rules_version>", ``position`` the store's
        change sequence the served state reflects, ``as_of_day`` the feature day (days since
        1970-01-01), ``at_ns`` when it was made if not now (an offline gate's decision,
        uploaded later: readers sort by time, and an index records a segment's oldest and
        newest). Raises ``AuditUnavailable`` at once when ``max_pending`` wait."""
        # Validate here: a bad value found by the flusher would fail a whole group commit.
        if not (0 <= decision_seq < SEQ_LIMIT and 0 <= subject < 1 << 64 and 0 <= result < 256):
            raise ValueError("decision_seq must be below 2**48 (decision ids), subject fit uint64, result uint8")
        if not (0 <= position < 1 << 64 and -(1 << 31) <= as_of_day < 1 << 31):
            raise ValueError(f"position {position!r} must fit uint64 and as_of_day {as_of_day!r} int32")
        if at_ns is not None and not 0 < at_ns < 1 << 63:
            raise ValueError(f"at_ns {at_ns!r} must be a positive int64")
        codes = self._codes_of(caller, method, scenario, release)
        row = (time.time_ns() if at_ns is None else int(at_ns), decision_seq, subject, position, as_of_day, UNARY,
               *codes, result, 0)
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            if self._pending + self._backlog >= self.max_pending:
                raise AuditUnavailable(self._behind())
            self._rows.append(row)
            self._pending += 1
            wake = self._pending >= self.high_water and not self._woken
            if wake:
                self._woken = True
        if wake:
            self._wake.set()

    def record_batch(
        self, batch_seq: int, caller: str, method: str, scenario: str,
        subjects: np.ndarray, results: np.ndarray, release: str, position: int = 0, as_of_day: int = 0,
    ) -> None:
        """A whole batch: one header entry plus a 9-byte item per token that found a person
        (subject != 0) and a run marker per up to 256 unknown cards before one (format 4);
        the unknown cards are counted in the header. Item i's decision id is
        ``ids.id_of(batch_seq, i)``. The arrays are copied (the caller may reuse them)."""
        subjects = _as(subjects, _U64, "subjects")
        results = _as(results, _U8, "results")
        n = len(subjects)
        if len(results) != n:
            raise ValueError(f"{n} subjects but {len(results)} results")
        if not 0 <= batch_seq < SEQ_LIMIT:
            raise ValueError("batch_seq must be below 2**48 (decision ids)")
        if not (0 <= position < 1 << 64 and -(1 << 31) <= as_of_day < 1 << 31):
            raise ValueError(f"position {position!r} must fit uint64 and as_of_day {as_of_day!r} int32")
        if n == 0:
            return
        if n >= UNARY:
            raise ValueError(f"a batch of {n} items is too large for the audit log")
        # Compacted here, not by the flusher: what waits in memory is only what is written.
        subjects, results, unknown = _compact(subjects, results)
        records = len(subjects)  # <= n: each marker stands for at least one unknown card
        cost = max(records, 1)  # towards max_pending: written items, or the header alone
        # The header's subject (its first item's position) is set by the group commit.
        codes = self._codes_of(caller, method, scenario, release)
        row = (time.time_ns(), batch_seq, 0, position, as_of_day, records, *codes, 0, unknown)
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            waiting = self._pending + self._backlog
            if waiting and waiting + cost > self.max_pending:
                raise AuditUnavailable(self._behind())
            self._rows.append(row)
            self._subjects.append(subjects)
            self._results.append(results)
            self._pending += cost
            wake = self._pending >= self.high_water and not self._woken
            if wake:
                self._woken = True
        if wake:
            self._wake.set()

    def _behind(self) -> str:
        return (f"the audit log is behind: {self._pending + self._backlog} disclosures are waiting for its disk "
                f"(limit {self.max_pending})")

    # --- group commit -----------------------------------------------------------------

    def start(self) -> "AuditLog":
        """Launch the flusher thread (one group commit per ``flush_interval``, or sooner
        past ``high_water``) and the indexer thread (indexes of finished segments, retention)."""
        if self._thread is None:
            self._indexer = threading.Thread(target=self._index_loop, name="audit-indexer", daemon=True)
            self._indexer.start()
            self._thread = threading.Thread(target=self._run, name="audit-flusher", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            if self._stop.is_set():
                break  # close() commits what is left
            try:
                self._commit()
            except Exception:  # keep the entries (carried over) and retry next interval
                log.exception("audit group commit failed; retrying")

    def flush(self) -> None:
        """Write and fsync everything appended so far (blocking)."""
        self._commit()

    def close(self) -> None:
        """Flush, index the last segment and stop; appending afterwards raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._commit()
        finally:
            with self._io_lock:
                for fd in (self._fd, self._items_fd, self._dict_fd):
                    if fd is not None:
                        os.close(fd)
                self._fd = self._items_fd = self._dict_fd = None
                last, self._bin_path = self._bin_path, None
            if last is not None:
                self._segment_finished(last)
            if self._indexer is not None:
                self._finished.put(None)
                self._indexer.join()
            atexit.unregister(self.close)

    def _commit(self) -> None:
        with self._io_lock:
            with self._lock:
                rows, self._rows = self._rows, []
                subjects, self._subjects = self._subjects, []
                results, self._results = self._results, []
                lines, self._new_lines = self._new_lines, []
                count, self._pending = self._pending, 0
                self._backlog += count  # still counted against max_pending until durable
                self._woken = False
            # packed by struct, row by row (twice as fast as numpy converting the tuples);
            # the padding bytes are zeros
            entries = np.frombuffer(bytearray(b"".join([_PACK_ENTRY(*row) for row in rows])), ENTRY)
            items = self._items_scratch(sum(len(s) for s in subjects))
            if subjects:
                items["subject"] = np.concatenate(subjects, out=self._subjects_buf[: len(items)])
                items["result"] = np.concatenate(results, out=self._results_buf[: len(items)])
                # Headers point into this commit's items for now; _write makes it absolute.
                heads = entries["batch_index"] != UNARY
                counts = entries["batch_index"][heads].astype(np.uint64)
                entries["subject"][heads] = np.cumsum(counts) - counts
            if self._carry is not None:
                old_entries, old_items, old_lines, old_count = self._carry
                entries["subject"][entries["batch_index"] != UNARY] += np.uint64(len(old_items))
                # Join the bytes, not the arrays: np.concatenate would drop the padding (numpy
                # canonicalises the dtype to a packed one), changing the entry size.
                entries = np.frombuffer(old_entries.tobytes() + entries.tobytes(), ENTRY)
                items = np.frombuffer(old_items.tobytes() + items.tobytes(), ITEM)
                lines, count = old_lines + lines, old_count + count
            if not len(entries) and not lines:
                return
            try:
                self._write(lines, entries, items)
            except BaseException:
                # Keep them for the next commit; they stay in the backlog so back-pressure applies.
                self._carry = (entries, items.copy(), lines, count)  # the scratch is reused
                raise
            self._carry = None
            with self._lock:
                self._backlog -= count

    def _items_scratch(self, n: int) -> np.ndarray:
        """n items of a buffer kept from one group commit to the next: fresh arrays of this
        size would be new mappings, and faulting their pages in was most of a commit."""
        if len(self._items_buf) < n:
            size = max(n, 2 * len(self._items_buf), 4096)
            self._items_buf = np.empty(size, ITEM)
            self._subjects_buf = np.empty(size, _U64)
            self._results_buf = np.empty(size, _U8)
        return self._items_buf[:n]

    def _write(self, lines: list[str], entries: np.ndarray, items: np.ndarray) -> None:
        """Items first (write + fdatasync), then the entries whose headers reference them."""
        size = self._size + self._items_size
        day = city_day(time.time_ns())
        if (
            self._fd is None or (size and size + entries.nbytes + items.nbytes > self.segment_bytes)
            or (len(entries) and day != self._segment_day)
        ):
            self._open_segment(lines, day)  # repeats every code known so far: dictionaries are per segment
            self._lines_written.extend(lines)
        elif lines:
            self._append(self._dict_fd, "".join(line + "\n" for line in lines).encode(), "_dict_size")
            self._lines_written.extend(lines)
        if not len(entries):
            return
        items_start = self._items_size
        if len(items):
            entries = entries.copy()  # the relative positions stay in the carry if this fails
            entries["subject"][entries["batch_index"] != UNARY] += np.uint64(items_start // ITEM.itemsize)
            self._append(self._items_fd, items.view(np.uint8), "_items_size")
        try:
            self._append(self._fd, entries.tobytes(), "_size")
        except BaseException:
            # The items are durable but no header references them: cut them back too, so
            # the retry writes them again right after the durable ones.
            if self._items_size != items_start:
                self._items_size = items_start
                try:
                    os.ftruncate(self._items_fd, items_start)
                except OSError:
                    pass  # the retry overwrites them in place (pwrite at the durable end)
            raise

    def _append(self, fd: int, data: bytes, size_attr: str) -> None:
        """pwrite + sync at the durable end; on failure cut back to it, so a retry never
        writes after a torn tail."""
        start = getattr(self, size_attr)
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.pwrite(fd, view[done:], start + done)
            self._sync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
        setattr(self, size_attr, start + len(data))

    def _open_segment(self, lines: list[str], day: int) -> None:
        for fd in (self._fd, self._items_fd, self._dict_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._items_fd = self._dict_fd = None
        finished, self._bin_path = self._bin_path, None
        if finished is not None:
            self._segment_finished(finished)
        pid = os.getpid()
        ns = time.time_ns()
        while True:  # two writers of one process may start in the same nanosecond
            stem = self.directory / f"audit-{ns}-{pid}"
            try:
                # The dictionary first: a reader that sees a segment also sees its dictionary.
                dict_fd = os.open(f"{stem}.dict", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileExistsError:
                ns += 1
                continue
            break
        text = [json.dumps(segment_header(self.writer, pid, day))] + self._lines_written + lines
        self._dict_fd, self._dict_size = dict_fd, 0
        self._append(dict_fd, "".join(line + "\n" for line in text).encode(), "_dict_size")
        # Items before entries, so a reader that sees a segment's entries sees its items file.
        self._items_fd = os.open(f"{stem}.items", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._items_size = 0
        self._fd = os.open(f"{stem}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._size = 0
        self._bin_path, self._segment_day = Path(f"{stem}.bin"), day
        fsync_dir(self.directory)  # the new names themselves must survive a crash

    # --- indexing and retention (the indexer thread; inline without one) ----------------

    def _segment_finished(self, bin_path: Path) -> None:
        if self._indexer is not None and self._indexer.is_alive():
            self._finished.put(bin_path)
            return
        try:  # no indexer thread (a log used without start()): the caller flushing or closing does it
            build_index(bin_path)
            self._expire()
        except Exception:
            log.exception("audit index of %s failed; the segment is scanned instead", bin_path.name)

    def _index_loop(self) -> None:
        try:
            self._recover()
        except Exception:
            log.exception("audit index recovery failed; unindexed segments are scanned instead")
        while True:
            path = self._finished.get()
            if path is None:
                return
            try:
                build_index(path)
                self._expire()
            except Exception:
                log.exception("audit index of %s failed; the segment is scanned instead", path.name)

    def _recover(self) -> None:
        """Index the finished segments nobody indexed: their writer died (crash, SIGKILL)
        before closing them. A segment whose process is alive is left to it, and so is one
        another host wrote (its process id means nothing here: a live writer there must not
        have its segment indexed under it; readers scan an unindexed segment instead)."""
        me = os.getpid()
        for path in _segment_paths(self.directory):
            if self._stop.is_set():
                return
            pid = int(_SEGMENT_RE.match(path.name).group(2))
            if pid == me or _alive(pid) or _index_of(path)[0] is not None:
                continue
            if segment_host(path) not in (HOST, None):
                continue
            try:
                build_index(path)
            except FileNotFoundError:
                continue  # deleted meanwhile (retention by another writer)
        for tmp in self.directory.glob(f"audit-*.idx.tmp-{HOST}-*"):
            pid = tmp.name.rsplit("-", 2)[-2]
            if pid.isdigit() and not _alive(int(pid)):
                tmp.unlink(missing_ok=True)  # a dead writer's unfinished index (this host's)
        self._expire()

    def _expire(self) -> None:
        """Delete every writer's segments whose newest entry is older than retention_days."""
        if self.retention_days is None:
            return
        cutoff = time.time_ns() - self.retention_days * DAY_NS
        for path in _segment_paths(self.directory):
            if int(_SEGMENT_RE.match(path.name).group(1)) >= cutoff:
                break  # sorted by start: every later segment started after the cutoff
            if path == self._bin_path:
                continue  # being written (an idle writer's segment can span days)
            header, _ = _index_of(path)
            try:
                newest = header[5] if header is not None else path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if newest < cutoff:
                # The index first (it must never outlive its segment), the dictionary last.
                for suffix in (".idx", ".bin", ".items", ".dict"):
                    path.with_suffix(suffix).unlink(missing_ok=True)
                log.info("audit segment %s deleted: older than %d days", path.name, self.retention_days)

    # --- reading (all segments of all processes in the directory) ----------------------

    def entries(self, subject: int | None = None, since_ns: int | None = None) -> list[AuditEntry]:
        """Durable entries of every writer in the directory, oldest first, one per batch
        item (entries still pending in memory appear after the next group commit). A full
        scan: for one person use ``checks_of``."""
        rows, segs, infos = [], [], []
        for path in _segment_paths(self.directory):
            got = self._read_segment(path, subject, since_ns)
            if got is not None and len(got[0]):
                infos.append(got[1])
                rows.append(got[0])
                segs.append(np.full(len(got[0]), len(infos) - 1, dtype=np.uint32))
        return self._build(*_ordered(rows, segs), infos)

    def batches(self, since_ns: int | None = None) -> list[AuditBatch]:
        """Every durable batch of every writer in the directory (formats 2 to 4), oldest
        first: its header's fields and how many of its tokens found a person and how many
        were unknown cards. A full scan of the headers and the items."""
        out = []
        for path in _segment_paths(self.directory):
            try:
                size = path.stat().st_size
                m = path.with_suffix(".items").stat().st_size // ITEM.itemsize
            except FileNotFoundError:
                continue
            info = self._dictionary(path.with_suffix(".dict"))
            if info[0] not in (2, 3, 4):
                continue
            dtype = _ROW if info[0] in _COMPACT else ENTRY_V2
            heads = _join([c[c["batch_index"] != UNARY].copy() for _, c in _chunks(path, dtype, size // dtype.itemsize)], dtype)
            if since_ns is not None:
                heads = heads[heads["time_ns"] >= np.int64(since_ns)]
            starts, counts = heads["subject"].astype(np.int64), heads["batch_index"].astype(np.int64)
            heads = heads[starts + counts <= m]  # not durable
            if not len(heads):
                continue
            starts, ends = heads["subject"].astype(np.int64), (heads["subject"] + heads["batch_index"]).astype(np.int64)
            person = np.zeros(int(ends.max()) + 1, np.int64)  # items about a person before each record
            for at, chunk in _chunks(path.with_suffix(".items"), ITEM, int(ends.max())):
                person[at + 1 : at + 1 + len(chunk)] = chunk["subject"] != 0
            person = np.cumsum(person)
            known = person[ends] - person[starts]
            unknown = heads["unknown"].astype(np.int64) if info[0] == 4 else (ends - starts) - known
            rows = heads if dtype is _ROW else _to_rows(heads)
            rows["batch_index"] = UNARY  # the batch's own id
            for e, k, u in zip(self._build(rows, np.zeros(len(rows), np.uint32), [info]), known.tolist(), unknown.tolist()):
                out.append(AuditBatch(e.decision_id, e.time, e.caller, e.method, e.scenario, e.model_version,
                                      e.calibration_version, e.rules_version, e.position, e.as_of_day, k, u))
        out.sort(key=lambda b: b.time)
        return out

    def checks_of(self, citizen_id: str, limit: int = 100) -> list[AuditEntry]:
        """Who checked this citizen and when: newest first, at most ``limit`` entries.
        Indexed segments are searched, not read; segments are visited newest first and the
        search stops once ``limit`` entries newer than any segment left are found."""
        subject = self.subject_of(citizen_id)
        keep = max(limit, 0)
        if keep == 0:
            return []
        names = _segment_names(self.directory)
        plan = []  # (newest possible time, name order, name, _Indexed or None)
        fences = self._fences
        for k, name in enumerate(names):
            ix = fences.get(name) or self._index(self.directory / name)
            plan.append((ix.header[5] if ix is not None else _NEVER, k, name, ix))
        plan.sort(key=lambda p: (p[0], p[1]), reverse=True)
        rows, segs, infos, times = [], [], [], []
        wanted = np.array([subject, subject + 1], _U64) if subject < (1 << 64) - 1 else np.array([subject, subject], _U64)
        for i, (_, k, name, ix) in enumerate(plan):
            path = self.directory / name
            got = self._search_segment(path, wanted, ix) if ix is not None else None
            if got is None:  # unindexed (being written, or its writer died moments ago): scan it
                got = self._read_segment(path, subject, None)
            if got is not None and len(got[0]):
                infos.append(got[1])
                rows.append(got[0])
                segs.append(np.full(len(got[0]), k, dtype=np.uint32))
                times.append(got[0]["time_ns"])
                if sum(len(t) for t in times) >= keep and i + 1 < len(plan):
                    kth_newest = np.sort(np.concatenate(times))[-keep]
                    if kth_newest > plan[i + 1][0]:
                        break  # every segment left holds only older entries
        if len(self._fences) > len(names) + 64:  # forget segments deleted by retention
            alive = set(names)
            self._fences = {name: v for name, v in self._fences.items() if name in alive}
            self._dict_cache = {p: v for p, v in self._dict_cache.items() if p.with_suffix(".bin").name in alive}
        # The infos are per found segment; the segment keys are name order (for ties).
        order_keys = [int(s[0]) for s in segs]
        remap = {key: j for j, key in enumerate(order_keys)}
        records, keys = _ordered(rows, segs)
        seg_index = np.array([remap[int(x)] for x in keys], dtype=np.uint32) if len(keys) else keys
        return self._build(records[::-1][:keep], seg_index[::-1][:keep], infos)

    def find(self, decision_id: str) -> AuditEntry | None:
        """The entry of one decision (of a batch item: that item's), or None if it is not
        (or not yet, or no longer) in the log. Raises ValueError for an id that is
        malformed or was not made with this log's key. Scans only the segments of the
        id's writer, newest first among those that can hold its sequence number."""
        writer, seq, item = self.ids.parse(decision_id)
        candidates = []
        for path in _segment_paths(self.directory):
            version, _, seg_writer = self._dictionary(path.with_suffix(".dict"))
            if version in _COMPACT and seg_writer == writer:
                first = _pread_records(path, ENTRY, 0, 1)
                if len(first):
                    candidates.append((int(first["seq"][0]), path))
        # A writer's sequence numbers grow with time, nearly in file order (taken just before
        # the append lock), so the segment starting at or below seq is the likeliest.
        candidates.sort(reverse=True)
        start = next((i for i, (s, _) in enumerate(candidates) if s <= seq), 0)
        for _, path in candidates[start:] + candidates[:start]:
            got = self._find_in(path, seq, item)
            if got is not None:
                return got
        return None

    def _find_in(self, path: Path, seq: int, item: int | None) -> AuditEntry | None:
        try:
            n = path.stat().st_size // ENTRY.itemsize
            m = path.with_suffix(".items").stat().st_size // ITEM.itemsize
        except FileNotFoundError:
            return None
        info = self._dictionary(path.with_suffix(".dict"))
        items_path = path.with_suffix(".items")
        for start, chunk in _chunks(path, _ROW, n):
            hit = chunk["seq"] == np.uint64(seq)
            hit &= (chunk["batch_index"] == UNARY) if item is None else (chunk["batch_index"] != UNARY)
            for at in np.flatnonzero(hit):
                row = chunk[at : at + 1].copy()
                if item is not None:
                    count, first = int(row["batch_index"][0]), int(row["subject"][0])
                    if first + count > m:
                        continue  # its batch is not durable
                    offset = item  # of the item's record in its batch's
                    if info[0] == 4 and row["unknown"][0]:  # markers before it: find its record
                        region = _pread_records(items_path, ITEM, first, count)
                        if len(region) != count:
                            continue
                        at = np.flatnonzero((_positions(region, [count], 4) == item) & (region["subject"] != 0))
                        if not len(at):
                            continue  # an unknown card's position (or none): concerns nobody, not kept
                        offset = int(at[0])
                    if offset >= count:
                        continue  # no such item
                    found = _pread_records(items_path, ITEM, first + offset, 1)
                    if not len(found) or (info[0] == 4 and found["subject"][0] == 0):
                        continue
                    row["subject"], row["result"], row["batch_index"] = found["subject"], found["result"], item
                return self._build(row, np.zeros(1, np.uint32), [info])[0]
        return None

    def _read_segment(self, path: Path, subject, since_ns, first_entry: int = 0, first_item: int = 0):
        """(matching rows, dictionary info) of one segment, read in full from ``first_entry``
        (batch items expanded); None if it is gone."""
        items_path = path.with_suffix(".items")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        # After the entries (the writer syncs items and codes before entries using them).
        try:
            m = items_path.stat().st_size // ITEM.itemsize  # whole items only
        except FileNotFoundError:
            m = None
        info = self._dictionary(path.with_suffix(".dict"))
        version = info[0]
        if version is None:  # the dictionary was lost: only format 1 has no items file
            version = 1 if m is None else VERSION
            info = (version, {}, None)
        n = size // (ENTRY.itemsize if version in _COMPACT else ENTRY_V2.itemsize)  # a torn tail is ignored
        try:
            if version == 1:
                rows = _to_rows(_select_v1(path, n, subject, since_ns))
            elif version == 2:
                rows = _to_rows(_select_batched(path, n, items_path, m or 0, subject, since_ns, ENTRY_V2, version=2))
            else:
                rows = _select_batched(path, n, items_path, m or 0, subject, since_ns, _ROW, first_entry, first_item,
                                       version)
        except FileNotFoundError:
            return None  # deleted meanwhile (retention)
        return rows, info

    def _index(self, path: Path):
        """The cached ``_Indexed`` of a segment with a valid index, or None. A finished
        segment and its index never change (only retention deletes them, which the next
        read notices), so a found index is not looked at again; a missing one is, each time."""
        cached = self._fences.get(path.name)
        if cached is not None:
            return cached
        header, fence = _index_of(path)
        if header is None:
            return None
        try:
            n = path.stat().st_size // ENTRY.itemsize
        except FileNotFoundError:
            return None
        stem = str(path)[: -len(".bin")]
        cached = _Indexed(header, fence, stem + ".idx", str(path), stem + ".items", header[2] == n)
        self._fences[path.name] = cached
        return cached

    def _search_segment(self, path: Path, subject: np.ndarray, ix: "_Indexed"):
        """(rows, info) of ``subject`` in an indexed segment: a search in the fence, one
        read of a block of subjects and their references, then the few entries and items
        found; plus a scan of any entries written after the index. None: not usable."""
        _, count, entries, items_end, _, _, every, _ = ix.header
        n = entries
        if not ix.complete:
            try:
                n = path.stat().st_size // ENTRY.itemsize
            except FileNotFoundError:
                return None
            if entries > n:
                return None  # not this segment's index (the segment was cut back or replaced)
        found = None
        # [subject, subject + 1) in one call each: left of subject + 1 is right of subject
        lo_block, hi_block = ix.fence.searchsorted(subject).tolist()
        if hi_block:
            lo = max(lo_block - 1, 0) * every
            hi = min(hi_block * every, count)
            base = _IDX_HEADER.size + 8 * len(ix.fence)
            try:
                fd = os.open(ix.idx, os.O_RDONLY)
            except FileNotFoundError:
                self._fences.pop(path.name, None)
                return None
            try:
                block = np.frombuffer(os.pread(fd, 8 * (hi - lo), base + 8 * lo), _U64)
                a, b = block.searchsorted(subject).tolist()
                refs = np.frombuffer(os.pread(fd, 8 * (b - a), base + 8 * count + 8 * (lo + a)), _U64) if b > a else None
                if refs is not None and ix.header[0] == IDX_MAGIC:
                    offsets = np.frombuffer(os.pread(fd, 4 * (b - a), base + 16 * count + 4 * (lo + a)), "<u4")
                elif refs is not None:
                    offsets = (refs & np.uint64(UNARY)).astype(np.uint32)  # format 3: the batch position
            finally:
                os.close(fd)
            if refs is not None:
                if len(refs) != b - a or len(offsets) != b - a:
                    return None
                found = self._fetch(ix, refs, offsets)
                if found is None:
                    self._fences.pop(path.name, None)
                    return None
        if entries < n:  # written after the index was made (a live writer's segment)
            tail = self._read_segment(path, int(subject[0]), None, entries, items_end)
            if tail is None:
                return None
            found = tail[0] if found is None else _join([found, tail[0]], _ROW)
        if found is None or not len(found):
            return np.zeros(0, _ROW), None
        if ix.info is None:
            ix.info = self._dictionary(path.with_suffix(".dict"))
        return found, ix.info

    @staticmethod
    def _fetch(ix: "_Indexed", refs: np.ndarray, offsets: np.ndarray) -> np.ndarray | None:
        """The rows of an index's references: entry ``ref >> 32``; for a batch item
        (``ref & UNARY`` its position in the batch, ``offsets`` its record's in the batch's
        records) its subject and result from the items."""
        refs = refs.tolist()
        try:
            f = os.open(ix.bin, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            raw = b"".join([os.pread(f, ENTRY.itemsize, (ref >> 32) * ENTRY.itemsize) for ref in refs])
        finally:
            os.close(f)
        if len(raw) != ENTRY.itemsize * len(refs):
            return None  # the segment was cut back under its index: scan it instead
        rows = np.frombuffer(raw, _ROW).copy()
        within = np.array([ref & UNARY for ref in refs], np.uint64)
        offsets = offsets.tolist()
        batched = np.flatnonzero(within != UNARY)
        if not len(batched):
            return rows
        whole = np.ones(len(refs), dtype=bool)
        try:
            g = os.open(ix.items, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            m = os.fstat(g).st_size // ITEM.itemsize
            for j in batched.tolist():
                first, count, at = int(rows["subject"][j]), int(rows["batch_index"][j]), int(within[j])
                item = os.pread(g, ITEM.itemsize, (first + offsets[j]) * ITEM.itemsize)
                if first + count > m or offsets[j] >= count or len(item) != ITEM.itemsize:
                    whole[j] = False  # all or nothing: a batch cut short is not shown
                    continue
                rows["subject"][j], rows["result"][j] = struct.unpack("<QB", item)
                rows["batch_index"][j] = at
        finally:
            os.close(g)
        return rows[whole]

    def _build(self, records: np.ndarray, segments: np.ndarray, infos: list) -> list[AuditEntry]:
        # Columns to Python lists once: indexing numpy rows one by one costs ~10x more.
        cols = {name: records[name].tolist() for name in _ROW.names}
        segs = segments.tolist()
        ids: list[str | None] = [None] * len(segs)
        v3 = [i for i, s in enumerate(segs) if infos[s][0] in _COMPACT and infos[s][2] is not None]
        if v3:  # one cipher call for all of them
            writers = np.array([infos[segs[i]][2] for i in v3], dtype=np.uint64)
            for i, d in zip(v3, self.ids.encode_many(writers, records["seq"][v3])):
                ids[i] = d
        releases: dict[tuple[int, int], tuple[str, str, str]] = {}
        out = []
        for i, s in enumerate(segs):
            version, codes, _ = infos[s]
            decision_id = ids[i]
            if decision_id is None:
                decision_id = (f"d-?writer-{cols['seq'][i]:x}" if version in _COMPACT
                               else f"d-{_name(codes, 'writer', cols['writer'][i])}-{cols['seq'][i]:x}")
            if cols["batch_index"][i] != UNARY:
                decision_id = f"{decision_id}-{cols['batch_index'][i]}"
            release = releases.get((s, cols["release"][i]))
            if release is None:
                words = _name(codes, "release" if version in _COMPACT else "model", cols["release"][i]).split(" ", 2)
                release = releases[(s, cols["release"][i])] = (*words, "", "")[:3]
            out.append(AuditEntry(
                decision_id=decision_id,
                time=_EPOCH + timedelta(microseconds=cols["time_ns"][i] // 1000),
                caller=_name(codes, "caller", cols["caller"][i]),
                method=_name(codes, "method", cols["method"][i]),
                scenario=_name(codes, "scenario", cols["scenario"][i]),
                result=cols["result"][i],
                model_version=release[0],
                subject=cols["subject"][i],
                calibration_version=release[1],
                rules_version=release[2],
                position=cols["position"][i],
                as_of_day=cols["as_of_day"][i],
            ))
        return out

    def _dictionary(self, path: Path) -> tuple[int | None, dict, int | None]:
        """(format version, codes, writer) of a segment; (None, {}, None) if its dictionary
        is missing. The writer is format 3's 64-bit number (None before)."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None, {}, None
        cached = self._dict_cache.get(path)
        if cached is not None and cached[0] == size:
            return cached[1]
        got = _read_dictionary(path)
        self._dict_cache[path] = (size, got)
        return got


def _read_dictionary(path: Path) -> tuple[int | None, dict, int | None]:
    codes: dict = {}
    version = writer = None
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, {}, None
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue  # a torn line (crash mid-write): its codes were never used by a durable entry
        if "format" in item:
            version = item.get("version")
            itemsize = ENTRY.itemsize if version in _COMPACT else ENTRY_V2.itemsize
            if (
                item.get("format") != FORMAT or version not in READABLE or item.get("itemsize") != itemsize
                or (version >= 2 and (item.get("items") or {}).get("itemsize") != ITEM.itemsize)
                or (version in _COMPACT and not isinstance(item.get("writer"), int))
            ):
                raise ValueError(f"{path}: unsupported audit format {item!r}")
            writer = item.get("writer") if version in _COMPACT else None
            continue
        codes[(item["kind"], item["code"])] = item["value"]
    return version, codes, writer


_LISTINGS: dict[str, tuple[int, int, list[str]]] = {}  # directory -> (mtime_ns, listed at ns, names)
_LISTING_SLACK_NS = 100_000_000  # beyond any file system's timestamp granularity


def _segment_names(directory: Path) -> list[str]:
    """The name of every segment's ``.bin`` in the directory, oldest first (names start
    with the segment's start time in ns, 19 digits until 2286). The listing is reused
    while the directory's mtime is unchanged and was already old when it was listed (so a
    change within the same timestamp tick cannot hide): one stat instead of a scandir of
    a year's thousands of files."""
    key = str(directory)
    try:
        mtime = os.stat(directory).st_mtime_ns
    except FileNotFoundError:
        return []
    cached = _LISTINGS.get(key)
    if cached is not None and cached[0] == mtime and cached[1] - mtime > _LISTING_SLACK_NS:
        return cached[2]
    now = time.time_ns()
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it if e.name.endswith(".bin") and _SEGMENT_RE.match(e.name)]
    except FileNotFoundError:
        return []
    names.sort()
    _LISTINGS[key] = (mtime, now, names)
    return names


def _segment_paths(directory: Path) -> list[Path]:
    return [directory / name for name in _segment_names(directory)]


def _ordered(rows: list[np.ndarray], segs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of all segments sorted by time (ties: segment, seq, position in the batch)."""
    if not rows:
        return np.zeros(0, _ROW), np.zeros(0, np.uint32)
    records = _join(rows, _ROW)
    keys = np.concatenate(segs)
    order = np.lexsort((records["batch_index"], records["seq"], keys, records["time_ns"]))
    return records[order], keys[order]


# --- the subject index --------------------------------------------------------------------


def build_index(bin_path) -> Path | None:
    """Write the subject index of a finished format-3 or -4 segment (``<stem>.idx``); None
    for older formats (scanned instead). Written to a temporary name, fsynced and renamed,
    so the index either exists whole or not at all."""
    bin_path = Path(bin_path)
    version, _, _ = _read_dictionary(bin_path.with_suffix(".dict"))
    if version not in _COMPACT:
        return None
    items_path = bin_path.with_suffix(".items")
    n = bin_path.stat().st_size // ENTRY.itemsize
    m = items_path.stat().st_size // ITEM.itemsize
    if n >= 1 << 32:
        raise ValueError(f"{bin_path.name}: {n} entries are too many for an index (segment_bytes too large)")
    entries = np.fromfile(bin_path, ENTRY, count=n)
    position = np.arange(n, dtype=np.uint64)
    unary = entries["batch_index"] == UNARY
    mine = unary & (entries["subject"] != 0)
    subjects = [entries["subject"][mine]]
    refs = [(position[mine] << np.uint64(32)) | np.uint64(UNARY)]
    offsets = [np.full(int(mine.sum()), UNARY, np.uint32)]
    heads = ~unary
    starts, counts = entries["subject"][heads], entries["batch_index"][heads].astype(np.uint64)
    durable = starts + counts <= np.uint64(m)  # a crashed writer's last header may lack items
    starts, counts, head_at = starts[durable].astype(np.int64), counts[durable].astype(np.int64), position[heads][durable]
    items_end = int((starts + counts).max()) if len(starts) else 0
    if len(starts):
        items = np.fromfile(items_path, ITEM, count=items_end)
        offset = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        gathered = items[np.repeat(starts, counts) + offset]
        within = _positions(gathered, counts, version)  # the batch position of each record
        keep = gathered["subject"] != 0  # unknown cards (format 3) and run markers (format 4)
        subjects.append(gathered["subject"][keep])
        refs.append((np.repeat(head_at, counts)[keep] << np.uint64(32)) | within[keep].astype(np.uint64))
        offsets.append(offset[keep].astype(np.uint32))
    subjects, refs, offsets = np.concatenate(subjects), np.concatenate(refs), np.concatenate(offsets)
    order = np.argsort(subjects)  # the order among one subject's entries does not matter: readers sort by time
    subjects, refs, offsets = subjects[order], refs[order], offsets[order]
    fence = subjects[::FENCE]
    times = entries["time_ns"]
    header = _IDX_HEADER.pack(IDX_MAGIC, len(subjects), n, items_end, int(times.min()) if n else 0,
                              int(times.max()) if n else 0, FENCE, len(fence))
    final = bin_path.with_suffix(".idx")
    tmp = bin_path.with_name(f"{bin_path.stem}.idx.tmp-{HOST}-{os.getpid()}-{threading.get_ident() % 10**6}")
    with open(tmp, "wb") as f:
        for part in (header, fence.astype(_U64).tobytes(), subjects.astype(_U64).tobytes(), refs.astype(_U64).tobytes(),
                     offsets.astype("<u4").tobytes()):
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(bin_path.parent)
    return final


def _index_of(bin_path: Path) -> tuple:
    """(header, fence) of a segment's index if it is whole (its size matches its header);
    (None, None) otherwise."""
    try:
        with open(bin_path.with_suffix(".idx"), "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), _IDX_HEADER.size, 0)
            if len(raw) != _IDX_HEADER.size:
                return _NO_INDEX
            header = _IDX_HEADER.unpack(raw)
            magic, count, _, _, _, _, every, nf = header
            if magic not in (IDX_MAGIC, _IDX_MAGIC_03) or every < 1 or nf != -(-count // every):
                return _NO_INDEX
            offsets = 4 * count if magic == IDX_MAGIC else 0
            if os.fstat(f.fileno()).st_size != _IDX_HEADER.size + 8 * (nf + 2 * count) + offsets:
                return _NO_INDEX  # torn or truncated
            fence = np.frombuffer(os.pread(f.fileno(), 8 * nf, _IDX_HEADER.size), _U64)
            if len(fence) != nf:
                return _NO_INDEX
    except FileNotFoundError:
        return _NO_INDEX
    return header, fence


def _pread_records(path: Path, dtype: np.dtype, first: int, count: int) -> np.ndarray:
    try:
        with open(path, "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), dtype.itemsize * count, dtype.itemsize * first)
    except FileNotFoundError:
        return np.zeros(0, dtype)
    return np.frombuffer(raw, dtype, count=len(raw) // dtype.itemsize)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


# --- scanning ----------------------------------------------------------------------------


def _chunks(path: Path, dtype: np.dtype, count: int, first: int = 0):
    """(position, records) of records ``first`` .. ``count`` - 1 of a file, ``_CHUNK`` at a
    time into one reused buffer (the caller copies what it keeps); a file cut short
    meanwhile just ends early. No memmap: a writer cutting a failed commit back would SIGBUS it."""
    size = dtype.itemsize
    if count <= first:
        return
    buf = memoryview(bytearray(min(count - first, _CHUNK) * size))
    with open(path, "rb", buffering=0) as f:
        f.seek(first * size)
        start = first
        while start < count:
            want = min(_CHUNK, count - start) * size
            got = 0
            while got < want:
                k = f.readinto(buf[got:want])
                if not k:
                    break
                got += k
            if got // size:
                yield start, np.frombuffer(buf, dtype=dtype, count=got // size)
            if got < want:
                return
            start += got // size


def _join(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.frombuffer(b"".join(p.tobytes() for p in parts), dtype=dtype).copy() if parts else np.zeros(0, dtype)


def _to_rows(old: np.ndarray) -> np.ndarray:
    """Format-1/2 entries as reader rows: the model version's code stands in the release's."""
    rows = np.zeros(len(old), _ROW)
    for name in ("time_ns", "seq", "subject", "writer", "batch_index", "caller", "method", "scenario", "result"):
        rows[name] = old[name]
    rows["release"] = old["model"]
    return rows


def _select_v1(path: Path, n: int, subject, since_ns) -> np.ndarray:
    """Format 1: every entry, batch items included, is one 48-byte entry."""
    picked = []
    for _, seg in _chunks(path, ENTRY_V2, n):
        mask = np.ones(len(seg), dtype=bool)
        if subject is not None:
            mask &= seg["subject"] == np.uint64(subject)
        if since_ns is not None:
            mask &= seg["time_ns"] >= np.int64(since_ns)
        if mask.any():
            picked.append(seg[mask])
    return _join(picked, ENTRY_V2)


def _select_batched(
    path: Path, n: int, items_path: Path, m: int, subject, since_ns, dtype: np.dtype, first_entry: int = 0, first_item: int = 0,
    version: int = VERSION,
) -> np.ndarray:
    """Formats 2, 3 and 4 (entries of ``dtype``) from entry ``first_entry`` and item
    ``first_item`` on: unary entries as stored; each batch header whose items are all
    durable (within the first ``m``) expanded into one entry per item: the header's fields
    with the item's subject and result and batch_index = the item's position in the batch.
    Format 4's run markers are not entries (its unknown cards have none)."""
    unary, heads = [], []
    for _, seg in _chunks(path, dtype, n, first_entry):
        is_head = seg["batch_index"] != UNARY
        mask = ~is_head
        if subject is not None:
            mask &= seg["subject"] == np.uint64(subject)
        if since_ns is not None:
            mask &= seg["time_ns"] >= np.int64(since_ns)
            is_head &= seg["time_ns"] >= np.int64(since_ns)
        if mask.any():
            unary.append(seg[mask])
        if is_head.any():
            heads.append(seg[is_head])
    unary, heads = _join(unary, dtype), _join(heads, dtype)
    starts = heads["subject"]
    counts = heads["batch_index"].astype(np.uint64)
    heads = heads[(starts + counts <= np.uint64(m)) & (starts >= np.uint64(first_item))]  # beyond the file: not durable (yet)
    if not len(heads):
        return unary
    order = np.argsort(heads["subject"], kind="stable")  # in file order already; cheap to make sure
    heads = heads[order]
    starts = heads["subject"].astype(np.int64)
    counts = heads["batch_index"].astype(np.int64)
    ends = starts + counts
    if subject is None:
        # Everything: all items of the kept headers, in order.
        expanded = np.repeat(heads, counts)
        first = np.repeat(starts, counts)
        within = np.arange(len(expanded), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        positions = first + within
        items = np.fromfile(items_path, dtype=ITEM, count=int(ends.max()) - first_item, offset=first_item * ITEM.itemsize)
        if len(items) < ends.max() - first_item:  # cut short since the stat: only whole batches
            keep = np.repeat(ends - first_item <= len(items), counts)
            expanded, positions, within = expanded[keep], positions[keep], within[keep]
        found = items[positions - first_item]
        if version == 4:
            within = _positions(found, counts[ends - first_item <= len(items)], 4)
            mine = found["subject"] != 0  # markers
            expanded, found, within = expanded[mine], found[mine], within[mine]
    elif version == 4 and subject == 0:
        return unary  # no item of format 4 is about nobody: its markers are not items
    else:
        # One person: scan the items for the subject, map each hit to its header.
        hits, found = [], []
        for start, chunk in _chunks(items_path, ITEM, int(ends.max()), first_item):
            at = np.flatnonzero(chunk["subject"] == np.uint64(subject))
            if len(at):
                hits.append(at + start)
                found.append(chunk[at])
        if not hits:
            return unary
        positions = np.concatenate(hits)
        found = _join(found, ITEM)
        k = np.searchsorted(starts, positions, side="right") - 1
        ok = (k >= 0) & (positions < ends[np.maximum(k, 0)])  # orphans (no durable header) are ignored
        positions, found, k = positions[ok], found[ok], k[ok]
        expanded = heads[k]
        within = positions - starts[k]
        if version == 4:  # a batch with unknown cards: count the positions its markers stand for
            whole = np.ones(len(k), dtype=bool)
            for h in np.unique(k[heads["unknown"][k] != 0]).tolist():
                mine = k == h
                region = _pread_records(items_path, ITEM, int(starts[h]), int(counts[h]))
                if len(region) != counts[h]:
                    whole &= ~mine  # cut short meanwhile: only whole batches
                    continue
                within[mine] = _positions(region, [len(region)], 4)[within[mine]]
            expanded, found, within = expanded[whole], found[whole], within[whole]
    expanded["subject"] = found["subject"]
    expanded["result"] = found["result"]
    expanded["batch_index"] = within
    return _join([unary, expanded], dtype)


def _compact(subjects: np.ndarray, results: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(item subjects, item results, unknown cards) of a batch in format 4: an item per
    known card (subject != 0), in batch order, each preceded by ceil(g / 256) run markers
    (subject 0, result r: r + 1 positions skipped) for the g unknown cards just before it;
    unknown cards after the last known one are only counted. A batch of known cards only is
    returned as is."""
    known = subjects != 0
    k = int(np.count_nonzero(known))
    n = len(subjects)
    if k == n:
        return subjects, results, 0
    if k == 0:
        return np.zeros(0, _U64), np.zeros(0, _U8), n
    at = np.flatnonzero(known)
    gaps = np.diff(at, prepend=-1) - 1  # unknown cards just before each known one
    runs = (gaps + 255) // 256  # markers before each known card
    place = np.arange(k) + np.cumsum(runs)  # each known card's record
    out_s = np.zeros(k + int(runs.sum()), _U64)
    out_r = np.zeros(len(out_s), _U8)
    out_s[place] = subjects[at]
    out_r[place] = results[at]
    m = len(out_s) - k
    if m:
        owner = np.repeat(np.arange(k), runs)
        t = np.arange(m) - np.repeat(np.cumsum(runs) - runs, runs)  # 0 .. runs - 1
        out_r[place[owner] - runs[owner] + t] = np.minimum(gaps[owner] - 256 * t, 256) - 1
    return out_s, out_r, n - k


def _positions(items: np.ndarray, counts: np.ndarray, version) -> np.ndarray:
    """The batch position (batch_index) of every record of consecutive batches' item
    records (``counts`` each): the number of positions the records before it in its batch
    stand for (format 4: a marker r + 1, an item 1; before: every record 1). Meaningful for
    items; markers (format 4, subject 0) are dropped by the callers."""
    counts = np.asarray(counts, np.int64)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    if version != 4:
        return np.arange(len(items), dtype=np.int64) - first
    step = np.where(items["subject"] == 0, items["result"].astype(np.int64) + 1, 1)
    before = np.cumsum(step) - step
    return before - before[first]


def _layout(dtype: np.dtype) -> list:
    return [[n, dtype.fields[n][0].str, dtype.fields[n][1]] for n in dtype.names]


def _name(codes: dict, kind: str, code: int) -> str:
    value = codes.get((kind, code))
    return f"?{kind}:{code}" if value is None else value  # a placeholder only if a dictionary was lost


def _as(values, dtype: np.dtype, what: str) -> np.ndarray:
    """A fresh one-dimensional array of ``dtype`` (always a copy: the caller may reuse its own)."""
    a = values if type(values) is np.ndarray else np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional")
    if a.dtype == dtype:
        return a.copy()
    if a.dtype.kind not in "iu" and a.size:
        raise ValueError(f"{what} must be integers")
    info = np.iinfo(dtype)
    if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
        raise ValueError(f"{what} out of range for {dtype.name}")
    return a.astype(dtype)
