"""The audit log of disclosures (design.md §5): who saw what about whom, and when.

Every disclosure — a score view, an explanation, an eligibility decision, and each token of
a gateway's batch check — is recorded: time, decision id (writer + sequence number + index in
a batch), caller, method, scenario or purpose, pseudonymous subject, result code and model
version. A citizen can list who checked them, each batch item included.

Usage (one ``AuditLog`` per worker process, created after any fork)::

    log = AuditLog("data/audit", key=config.audit_key).start()
    seq = 1                                                   # the service's decision counter
    log.record(seq, "gate-07", "Check", "metro_pay_later", log.subject_of("c00000042"), 0, "1+f2ff")
    decision_id = log.decision_id(seq)                        # "d-<writer_prefix>-1"
    log.record_batch(2, "gate-07", "CheckBatch", "metro_pay_later", subjects, outcomes, "1+f2ff")
    ...
    log.checks_of("c00000042")                                # who checked me, newest first
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

Back-pressure: if more than ``max_pending`` disclosures (unary entries + batch items) are
waiting (the disk cannot keep up), the appending thread performs the group commit itself
before returning, so it blocks until the log has caught up. Entries are never silently
dropped: if a commit fails (disk full), both files are cut back to their durable ends, its
entries are kept and retried every interval, and once ``max_pending`` are waiting,
appending raises — a disclosure that cannot be audited should fail, not go unrecorded.

Decision ids: the service numbers its decisions and uses ``writer_prefix`` (or
``decision_id(seq)``) for them: ``d-<writer_prefix>-<hex seq>``, and ``<batch id>-<i>``
for item i of a batch; the files store (writer code, seq) and the item's position in its
batch, which rebuilds them exactly. Readers (``entries``, ``checks_of``) see what is
durable in every segment of the directory, a batch expanded into one ``AuditEntry`` per
item (so they cannot tell how it was stored); an entry appears at the latest one flush
interval after it was appended.

Files (format 2). Each writer appends to its own segment (a new one per process start and
whenever the segment's two data files together would exceed ``segment_bytes``), so several
worker processes share a directory without any locking:

* ``<dir>/audit-<start-unix-ns>-<pid>.bin``: fixed-width 48-byte entries (``ENTRY``). A
  unary disclosure is one entry with ``batch_index`` = ``UNARY``. A batch of n items is ONE
  header entry: its time, seq (the batch's), codes and ``batch_index`` = n (< ``UNARY``),
  ``subject`` = the position of its first item in the ``.items`` file, ``result`` unused (0).
* ``<dir>/audit-<start-unix-ns>-<pid>.items``: fixed-width 9-byte items (``ITEM``: subject
  uint64 LE, result uint8), a batch's items contiguous and in order, so item i of a header
  is item ``subject + i`` of the file. A 1,000-token batch costs 48 + 9,000 bytes instead
  of 48,000.
* ``<dir>/audit-<start-unix-ns>-<pid>.dict``: strings (callers, methods, scenarios, model
  versions, the writer's decision-id prefix) coded as small integers, JSON lines: a header
  (format, version, both record layouts), then one line per code.

Write order makes every durable entry decodable: the dictionary lines are fsynced before any
entry using a new code, and a commit fsyncs its items before it writes the headers that
reference them, so a durable header always has durable items. A crash can leave a torn last
entry, item or dictionary line, and items whose header never made it: readers ignore a
trailing partial entry or item (file size not a multiple of the record size), a partial
dictionary line, and any item not inside a durable header's range. A restarted process
opens a new segment and never appends after a torn tail. Format-1 segments (version 1 in
the dictionary header: no ``.items`` file, one 48-byte entry per batch item with
``batch_index`` = i) are still read.

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
import re
import secrets
import struct
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "qianjiang-audit"
VERSION = 2  # 1: one entry per batch item, no .items file (still read)
READABLE = (1, 2)
UNARY = 0xFFFFFFFF  # batch_index of an entry that is not part of a batch
SEGMENT_BYTES = 256 << 20

# Little-endian explicitly so segments are portable; 41 bytes of fields padded to 48 so
# every entry (and its int64/uint64 fields) is 8-byte aligned.
ENTRY = np.dtype(
    {
        "names": ["time_ns", "seq", "subject", "writer", "batch_index", "caller", "method", "scenario", "model", "result"],
        "formats": ["<i8", "<u8", "<u8", "<u4", "<u4", "<u2", "<u2", "<u2", "<u2", "u1"],
        "offsets": [0, 8, 16, 24, 28, 32, 34, 36, 38, 40],
        "itemsize": 48,
    }
)
_PACK_ENTRY = struct.Struct("<qQQIIHHHHB7x").pack  # ENTRY's layout, for the group commit
assert struct.calcsize("<qQQIIHHHHB7x") == ENTRY.itemsize
# One batch item (format 2): packed, no padding — the bulk of the log at high batch rates.
ITEM = np.dtype({"names": ["subject", "result"], "formats": ["<u8", "u1"], "offsets": [0, 8], "itemsize": 9})
_KINDS = ("writer", "caller", "method", "scenario", "model")
_STRINGS_CACHED = 4096  # (caller, method, scenario, model) combinations whose codes are remembered
_LIMIT = {"writer": 1 << 32, "caller": 1 << 16, "method": 1 << 16, "scenario": 1 << 16, "model": 1 << 16}
_SEGMENT_RE = re.compile(r"^audit-(\d+)-(\d+)\.bin$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_U64, _U8 = np.dtype("<u8"), np.dtype("u1")
_CHUNK = 1 << 16  # records per read: bounded memory, and no memmap to SIGBUS on a concurrent truncate


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


class AuditUnavailable(RuntimeError):
    """The audit log cannot take the disclosure now (closed while draining, or its disk is
    failing under back-pressure): the disclosure is refused, never made unrecorded."""


class AuditFull(RuntimeError):
    """The audit dictionary has no code left for a new caller, method, purpose or model."""


def pseudonym(key: bytes, citizen_id: str) -> int:
    """The keyed pseudonym of a citizen: HMAC-SHA256(key, id)[:8] as little-endian uint64.
    The (2**-64) digest 0 maps to 1 because 0 means "no person"."""
    digest = hmac.new(key, citizen_id.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") or 1


class AuditLog:
    def __init__(
        self,
        directory,
        key: bytes,
        flush_interval: float = 0.05,
        max_pending: int = 1_000_000,
        *,
        segment_bytes: int = SEGMENT_BYTES,
    ):
        if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
            raise ValueError("the audit key must be at least 16 bytes (from configuration)")
        if flush_interval <= 0 or max_pending < 1 or segment_bytes < ENTRY.itemsize:
            raise ValueError("flush_interval, max_pending and segment_bytes must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = bytes(key)
        self.flush_interval = float(flush_interval)
        self.max_pending = int(max_pending)
        self.segment_bytes = int(segment_bytes)
        # Same shape as the service's decision-id prefix: random, plus the pid for humans.
        self.writer_prefix = f"{secrets.token_hex(4)}{os.getpid():x}"

        # Appending side, guarded by _lock (held only for list appends and the swap).
        self._lock = threading.Lock()
        # Entries as tuples, unary and batch headers in append order: converted by the
        # flusher, not the caller. Header k's items are _subjects[k] / _results[k].
        self._rows: list[tuple] = []
        self._subjects: list[np.ndarray] = []
        self._results: list[np.ndarray] = []
        self._new_lines: list[str] = []  # dictionary lines of codes assigned since the last swap
        self._pending = 0  # disclosures waiting: unary entries + batch items
        self._codes: dict[str, dict[str, int]] = {k: {} for k in _KINDS}
        self._entry_codes: dict[tuple[str, str, str, str], tuple[int, int, int, int]] = {}  # _codes_of
        self._code("writer", self.writer_prefix)
        self._writer = 0
        self._closed = False

        # Writing side, guarded by _io_lock (one group commit at a time, in swap order).
        self._io_lock = threading.Lock()
        self._fd: int | None = None
        self._items_fd: int | None = None
        self._dict_fd: int | None = None
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
        self._thread: threading.Thread | None = None
        self._dict_cache: dict[Path, tuple[int, tuple[int | None, dict]]] = {}
        atexit.register(self.close)

    # --- pseudonyms and ids -----------------------------------------------------------

    def subject_of(self, citizen_id: str) -> int:
        return pseudonym(self._key, citizen_id)

    def subjects_of(self, citizen_ids) -> np.ndarray:
        """Pseudonyms of many citizens (e.g. a per-row column precomputed for batch checks)."""
        return np.fromiter((pseudonym(self._key, c) for c in citizen_ids), dtype=np.uint64)

    def decision_id(self, seq: int, batch_index: int | None = None) -> str:
        """``d-<prefix>-<hex seq>``; item i of a batch: ``<batch decision id>-<i>`` (decimal)."""
        base = f"d-{self.writer_prefix}-{seq:x}"
        return base if batch_index is None else f"{base}-{batch_index}"

    # --- appending (any thread; no I/O unless back-pressure) ---------------------------

    def _code(self, kind: str, value: str) -> int:
        codes = self._codes[kind]
        code = codes.get(value)  # lock-free fast path: a dict read is atomic under the GIL
        if code is None:
            if not isinstance(value, str):
                raise TypeError(f"{kind} must be a str, not {type(value).__name__}")
            with self._lock:
                code = codes.get(value)
                if code is None:
                    code = len(codes)
                    if code >= _LIMIT[kind]:
                        raise AuditFull(f"too many distinct {kind} values for the audit dictionary")
                    codes[value] = code
                    # Queued under the same lock as entries, so the swap that takes an entry
                    # using this code also takes (or already took) the code's line.
                    self._new_lines.append(json.dumps({"kind": kind, "code": code, "value": value}, ensure_ascii=False))
        return code

    def _codes_of(self, caller: str, method: str, scenario: str, model_version: str) -> tuple[int, int, int, int]:
        """The four codes of an entry's strings, remembered for the next entry with the same
        four (one lookup instead of four on the per-check path; a few hundred combinations
        at most: callers, methods, scenarios and models are all configured)."""
        key = (caller, method, scenario, model_version)
        codes = self._entry_codes.get(key)
        if codes is None:
            codes = (self._code("caller", caller), self._code("method", method),
                     self._code("scenario", scenario), self._code("model", model_version))
            if len(self._entry_codes) < _STRINGS_CACHED:
                self._entry_codes[key] = codes
        return codes

    def record(
        self, decision_seq: int, caller: str, method: str, scenario: str, subject: int, result: int, model_version: str
    ) -> None:
        """One unary disclosure; its decision id is ``decision_id(decision_seq)``."""
        # Validate here: a bad value found by the flusher would fail a whole group commit.
        if not (0 <= decision_seq < 1 << 64 and 0 <= subject < 1 << 64 and 0 <= result < 256):
            raise ValueError("decision_seq and subject must fit uint64, result uint8")
        codes = self._codes_of(caller, method, scenario, model_version)
        row = (time.time_ns(), decision_seq, subject, self._writer, UNARY, *codes, result)
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            self._rows.append(row)
            self._pending += 1
            over = self._pending >= self.max_pending
        if over:
            self._relieve()

    def record_batch(
        self, batch_seq: int, caller: str, method: str, scenario: str,
        subjects: np.ndarray, results: np.ndarray, model_version: str,
    ) -> None:
        """A whole batch: one header entry plus n 9-byte items; item i's decision id is
        ``decision_id(batch_seq, i)``. The arrays are copied (the caller may reuse them)."""
        subjects = _as(subjects, _U64, "subjects")
        results = _as(results, _U8, "results")
        n = len(subjects)
        if len(results) != n:
            raise ValueError(f"{n} subjects but {len(results)} results")
        if not 0 <= batch_seq < 1 << 64:
            raise ValueError("batch_seq must fit uint64")
        if n == 0:
            return
        if n >= UNARY:
            raise ValueError(f"a batch of {n} items is too large for the audit log")
        # The header's subject (its first item's position) is set by the group commit.
        codes = self._codes_of(caller, method, scenario, model_version)
        row = (time.time_ns(), batch_seq, 0, self._writer, n, *codes, 0)
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the audit log is closed")
            self._rows.append(row)
            self._subjects.append(subjects)
            self._results.append(results)
            self._pending += n
            over = self._pending >= self.max_pending
        if over:
            self._relieve()

    # --- group commit -----------------------------------------------------------------

    def start(self) -> "AuditLog":
        """Launch the flusher thread (one group commit per ``flush_interval``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-flusher", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.flush_interval):
            try:
                self._commit()
            except Exception:  # keep the entries (carried over) and retry next interval
                log.exception("audit group commit failed; retrying")

    def flush(self) -> None:
        """Write and fsync everything appended so far (blocking)."""
        self._commit()

    def close(self) -> None:
        """Flush and stop the flusher; appending afterwards raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
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
            atexit.unregister(self.close)

    def _relieve(self) -> None:
        """Back-pressure: commit in the appending thread; a failure refuses the disclosure
        (its entry stays queued and is written by a later commit)."""
        try:
            self._commit(only_if_over=True)
        except OSError as exc:
            raise AuditUnavailable(f"the audit log cannot be written ({exc.strerror or exc})") from exc

    def _commit(self, only_if_over: bool = False) -> None:
        with self._io_lock:
            with self._lock:
                if only_if_over and self._pending < self.max_pending:
                    return  # another thread's commit already relieved the pressure
                rows, self._rows = self._rows, []
                subjects, self._subjects = self._subjects, []
                results, self._results = self._results, []
                lines, self._new_lines = self._new_lines, []
                count, self._pending = self._pending, 0
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
                # Keep them for the next commit and count them again so back-pressure applies.
                self._carry = (entries, items.copy(), lines, count)  # the scratch is reused
                with self._lock:
                    self._pending += count
                raise
            self._carry = None

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
        if self._fd is None or (size and size + entries.nbytes + items.nbytes > self.segment_bytes):
            self._open_segment(lines)  # repeats every code known so far: dictionaries are per segment
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
        """pwrite + fdatasync at the durable end; on failure cut back to it, so a retry
        never writes after a torn tail."""
        start = getattr(self, size_attr)
        try:
            view = memoryview(data)
            done = 0
            while done < len(data):
                done += os.pwrite(fd, view[done:], start + done)
            os.fdatasync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise
        setattr(self, size_attr, start + len(data))

    def _open_segment(self, lines: list[str]) -> None:
        for fd in (self._fd, self._items_fd, self._dict_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._items_fd = self._dict_fd = None
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
        header = {"format": FORMAT, "version": VERSION, "itemsize": ENTRY.itemsize, "pid": pid,
                  "fields": _layout(ENTRY), "items": {"itemsize": ITEM.itemsize, "fields": _layout(ITEM)}}
        text = [json.dumps(header)] + self._lines_written + lines
        self._dict_fd, self._dict_size = dict_fd, 0
        self._append(dict_fd, "".join(line + "\n" for line in text).encode(), "_dict_size")
        # Items before entries, so a reader that sees a segment's entries sees its items file.
        self._items_fd = os.open(f"{stem}.items", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._items_size = 0
        self._fd = os.open(f"{stem}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._size = 0
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new names themselves must survive a crash
        finally:
            os.close(dir_fd)

    # --- reading (all segments of all processes in the directory) ----------------------

    def entries(self, subject: int | None = None, since_ns: int | None = None) -> list[AuditEntry]:
        """Durable entries of every writer in the directory, oldest first, one per batch
        item (entries still pending in memory appear after the next group commit)."""
        return self._build(*self._select(subject, since_ns))

    def checks_of(self, citizen_id: str, limit: int = 100) -> list[AuditEntry]:
        """Who checked this citizen and when: newest first, at most ``limit`` entries."""
        records, segments, dicts = self._select(self.subject_of(citizen_id), None)
        keep = max(limit, 0)
        return self._build(records[::-1][:keep], segments[::-1][:keep], dicts)

    def _select(self, subject, since_ns) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """The matching entries of all segments (batch items expanded to per-item entries,
        as format 1 stores them), sorted by time, with each one's segment (an index into the
        returned dictionaries)."""
        picked, segments, dicts = [], [], []
        for path in sorted(self.directory.glob("audit-*.bin")):
            if not _SEGMENT_RE.match(path.name):
                continue
            items_path = path.with_suffix(".items")
            try:
                n = path.stat().st_size // ENTRY.itemsize  # whole entries only: a torn tail is ignored
            except FileNotFoundError:
                continue
            if n == 0:
                continue
            # After the entries (the writer syncs items and codes before entries using them).
            try:
                m = items_path.stat().st_size // ITEM.itemsize  # whole items only
            except FileNotFoundError:
                m = None
            version, codes = self._dictionary(path.with_suffix(".dict"))
            if version is None:  # the dictionary was lost: only format 2 has an items file
                version = 1 if m is None else 2
            if version == 1:
                rows = _select_v1(path, n, subject, since_ns)
            else:
                rows = _select_v2(path, n, items_path, m or 0, subject, since_ns)
            if len(rows):
                dicts.append(codes)
                picked.append(rows.tobytes())
                segments.append(np.full(len(rows), len(dicts) - 1, dtype=np.uint32))
        if not picked:
            return np.zeros(0, ENTRY), np.zeros(0, np.uint32), dicts
        records = np.frombuffer(b"".join(picked), dtype=ENTRY)
        segs = np.concatenate(segments)
        order = np.lexsort((records["batch_index"], records["seq"], segs, records["time_ns"]))
        return records[order], segs[order], dicts

    @staticmethod
    def _build(records: np.ndarray, segments: np.ndarray, dicts: list[dict]) -> list[AuditEntry]:
        # Columns to Python lists once: indexing numpy rows one by one costs ~10x more.
        cols = {name: records[name].tolist() for name in ENTRY.names}
        out = []
        for i, s in enumerate(segments.tolist()):
            codes = dicts[s]
            decision_id = f"d-{_name(codes, 'writer', cols['writer'][i])}-{cols['seq'][i]:x}"
            if cols["batch_index"][i] != UNARY:
                decision_id = f"{decision_id}-{cols['batch_index'][i]}"
            out.append(AuditEntry(
                decision_id=decision_id,
                time=_EPOCH + timedelta(microseconds=cols["time_ns"][i] // 1000),
                caller=_name(codes, "caller", cols["caller"][i]),
                method=_name(codes, "method", cols["method"][i]),
                scenario=_name(codes, "scenario", cols["scenario"][i]),
                result=cols["result"][i],
                model_version=_name(codes, "model", cols["model"][i]),
                subject=cols["subject"][i],
            ))
        return out

    def _dictionary(self, path: Path) -> tuple[int | None, dict]:
        """(format version, codes) of a segment; (None, {}) if its dictionary is missing."""
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None, {}
        cached = self._dict_cache.get(path)
        if cached is not None and cached[0] == size:
            return cached[1]
        codes: dict = {}
        version = None
        with open(path, "rb") as f:
            raw = f.read()
        for line in raw.split(b"\n"):
            if not line:
                continue
            try:
                item = json.loads(line)
            except ValueError:
                continue  # a torn line (crash mid-write): its codes were never used by a durable entry
            if "format" in item:
                version = item.get("version")
                if (
                    item.get("format") != FORMAT or version not in READABLE or item.get("itemsize") != ENTRY.itemsize
                    or (version >= 2 and (item.get("items") or {}).get("itemsize") != ITEM.itemsize)
                ):
                    raise ValueError(f"{path}: unsupported audit format {item!r}")
                continue
            codes[(item["kind"], item["code"])] = item["value"]
        self._dict_cache[path] = (size, (version, codes))
        return version, codes


def _chunks(path: Path, dtype: np.dtype, count: int):
    """(position, records) of the first ``count`` records of a file, ``_CHUNK`` at a time
    into one reused buffer (the caller copies what it keeps); a file cut short meanwhile
    just ends early. No memmap: a writer cutting a failed commit back would SIGBUS it."""
    size = dtype.itemsize
    buf = memoryview(bytearray(min(count, _CHUNK) * size))
    with open(path, "rb", buffering=0) as f:
        start = 0
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
    return np.frombuffer(b"".join(p.tobytes() for p in parts), dtype=dtype) if parts else np.zeros(0, dtype)


def _select_v1(path: Path, n: int, subject, since_ns) -> np.ndarray:
    """Format 1: every entry, batch items included, is one 48-byte entry."""
    picked = []
    for _, seg in _chunks(path, ENTRY, n):
        mask = np.ones(len(seg), dtype=bool)
        if subject is not None:
            mask &= seg["subject"] == np.uint64(subject)
        if since_ns is not None:
            mask &= seg["time_ns"] >= np.int64(since_ns)
        if mask.any():
            picked.append(seg[mask])
    return _join(picked, ENTRY)


def _select_v2(path: Path, n: int, items_path: Path, m: int, subject, since_ns) -> np.ndarray:
    """Format 2: unary entries as stored; each batch header whose items are all durable
    (within the first ``m``) expanded into one entry per item: the header's fields with the
    item's subject and result and batch_index = the item's position in the batch."""
    unary, heads = [], []
    for _, seg in _chunks(path, ENTRY, n):
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
    unary, heads = _join(unary, ENTRY), _join(heads, ENTRY)
    starts = heads["subject"]
    counts = heads["batch_index"].astype(np.uint64)
    heads = heads[starts + counts <= np.uint64(m)]  # an item beyond the file: not durable (yet)
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
        items = np.fromfile(items_path, dtype=ITEM, count=int(ends.max()))
        if len(items) < ends.max():  # cut short since the stat: only whole batches
            keep = np.repeat(ends <= len(items), counts)
            expanded, positions, within = expanded[keep], positions[keep], within[keep]
        found = items[positions]
    else:
        # One person: scan the items for the subject, map each hit to its header.
        hits, found = [], []
        for start, chunk in _chunks(items_path, ITEM, int(ends.max())):
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
    expanded["subject"] = found["subject"]
    expanded["result"] = found["result"]
    expanded["batch_index"] = within
    return _join([unary, expanded], ENTRY)


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
