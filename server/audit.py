"""The audit log of disclosures (design.md §5): who saw what about whom, and when.

Every disclosure — a score view, an explanation, an eligibility decision, and each token of
a gateway's batch check — gets one fixed-width binary entry: time, decision id (writer +
sequence number + index in a batch), caller, method, scenario or purpose, pseudonymous
subject, result code and model version. A citizen can list who checked them.

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
``flush_interval`` with a single ``write`` + ``fdatasync`` (group commit). Hence:

* when ``flush()`` returns, every entry appended before it was called is on disk;
* a crash (even SIGKILL) loses at most the entries appended after the last completed group
  commit took its batch, i.e. those appended during the last ``flush_interval`` plus the
  time of one write + fsync. Nothing older is ever lost, and nothing is written twice.
* ``close()`` (also registered with ``atexit``) flushes on an orderly shutdown.

Back-pressure: if more than ``max_pending`` entries are waiting (the disk cannot keep up),
the appending thread performs the group commit itself before returning, so it blocks until
the log has caught up. Entries are never silently dropped: if a commit fails (disk full),
its entries are kept and retried every interval, and once ``max_pending`` are waiting,
appending raises — a disclosure that cannot be audited should fail, not go unrecorded.

Decision ids: the service numbers its decisions and uses ``writer_prefix`` (or
``decision_id(seq)``) for them: ``d-<writer_prefix>-<hex seq>``, and ``<batch id>-<i>``
for item i of a batch; entries store (writer code, seq, batch index), which rebuilds them
exactly. Readers (``entries``, ``checks_of``) see what is durable in every segment of the
directory; an entry appears at the latest one flush interval after it was appended.

Files. Each writer appends to its own segment ``<dir>/audit-<start-unix-ns>-<pid>.bin`` (a
new one per process start and whenever one would exceed ``segment_bytes``), so several
worker processes share a directory without any locking. Strings (callers, methods,
scenarios, model versions, the writer's decision-id prefix) are coded as small integers; the
codes live in ``audit-<start-unix-ns>-<pid>.dict`` (JSON lines: a header, then one line per
code), which is fsynced before any entry using a new code is written, so entries stay
fixed-width and every durable entry can be decoded. A crash can leave a torn last entry (or
dictionary line); readers ignore a trailing partial entry (file size not a multiple of the
entry size) and a partial dictionary line. A restarted process opens a new segment and
never appends after a torn tail.

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
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "qianjiang-audit"
VERSION = 1
UNARY = 0xFFFFFFFF  # batch_index of an entry that is not part of a batch
SEGMENT_BYTES = 256 << 20

# Little-endian explicitly so segments are portable; 41 bytes of fields padded to 48 so
# every entry (and its int64/uint64 fields) is 8-byte aligned in a memmap.
ENTRY = np.dtype(
    {
        "names": ["time_ns", "seq", "subject", "writer", "batch_index", "caller", "method", "scenario", "model", "result"],
        "formats": ["<i8", "<u8", "<u8", "<u4", "<u4", "<u2", "<u2", "<u2", "<u2", "u1"],
        "offsets": [0, 8, 16, 24, 28, 32, 34, 36, 38, 40],
        "itemsize": 48,
    }
)
_KINDS = ("writer", "caller", "method", "scenario", "model")
_LIMIT = {"writer": 1 << 32, "caller": 1 << 16, "method": 1 << 16, "scenario": 1 << 16, "model": 1 << 16}
_SEGMENT_RE = re.compile(r"^audit-(\d+)-(\d+)\.bin$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


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
        self._rows: list[tuple] = []  # unary entries as tuples: converted by the flusher, not the caller
        self._arrays: list[np.ndarray] = []  # batches, already structured
        self._new_lines: list[str] = []  # dictionary lines of codes assigned since the last swap
        self._pending = 0
        self._codes: dict[str, dict[str, int]] = {k: {} for k in _KINDS}
        self._code("writer", self.writer_prefix)
        self._writer = 0
        self._closed = False
        self._index = np.arange(0, dtype=np.uint32)  # grown on demand: batch_index column
        self._index_lock = threading.Lock()

        # Writing side, guarded by _io_lock (one group commit at a time, in swap order).
        self._io_lock = threading.Lock()
        self._fd: int | None = None
        self._dict_fd: int | None = None
        self._size = 0  # durable bytes of the current segment
        self._dict_size = 0
        self._lines_written: list[str] = []  # all code lines so far: a new segment repeats them
        self._carry = b""  # entries of a failed commit, retried first
        self._carry_lines: list[str] = []

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dict_cache: dict[Path, tuple[int, dict]] = {}
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
                        raise ValueError(f"too many distinct {kind} values for the audit dictionary")
                    codes[value] = code
                    # Queued under the same lock as entries, so the swap that takes an entry
                    # using this code also takes (or already took) the code's line.
                    self._new_lines.append(json.dumps({"kind": kind, "code": code, "value": value}, ensure_ascii=False))
        return code

    def record(
        self, decision_seq: int, caller: str, method: str, scenario: str, subject: int, result: int, model_version: str
    ) -> None:
        """One unary disclosure; its decision id is ``decision_id(decision_seq)``."""
        # Validate here: a bad value found by the flusher would fail a whole group commit.
        if not (0 <= decision_seq < 1 << 64 and 0 <= subject < 1 << 64 and 0 <= result < 256):
            raise ValueError("decision_seq and subject must fit uint64, result uint8")
        row = (
            time.time_ns(), decision_seq, subject, self._writer, UNARY,
            self._code("caller", caller), self._code("method", method),
            self._code("scenario", scenario), self._code("model", model_version), result,
        )
        with self._lock:
            if self._closed:
                raise RuntimeError("the audit log is closed")
            self._rows.append(row)
            self._pending += 1
            over = self._pending >= self.max_pending
        if over:
            self._commit(only_if_over=True)

    def record_batch(
        self, batch_seq: int, caller: str, method: str, scenario: str,
        subjects: np.ndarray, results: np.ndarray, model_version: str,
    ) -> None:
        """A whole batch, vectorised; item i's decision id is ``decision_id(batch_seq, i)``."""
        subjects = _as(subjects, np.uint64, "subjects")
        results = _as(results, np.uint8, "results")
        n = len(subjects)
        if len(results) != n:
            raise ValueError(f"{n} subjects but {len(results)} results")
        if not 0 <= batch_seq < 1 << 64:
            raise ValueError("batch_seq must fit uint64")
        if n == 0:
            return
        codes = (
            self._code("caller", caller), self._code("method", method),
            self._code("scenario", scenario), self._code("model", model_version),
        )
        if len(self._index) < n:
            with self._index_lock:
                if len(self._index) < n:
                    self._index = np.arange(max(n, 2 * len(self._index)), dtype=np.uint32)
        template = np.zeros(1, ENTRY)  # zeroed padding, which np.repeat copies into every entry
        template[0] = (time.time_ns(), batch_seq, 0, self._writer, 0, *codes, 0)
        entries = np.repeat(template, n)  # ~10x faster than assigning a structured scalar
        entries["subject"] = subjects
        entries["result"] = results
        entries["batch_index"] = self._index[:n]
        with self._lock:
            if self._closed:
                raise RuntimeError("the audit log is closed")
            self._arrays.append(entries)
            self._pending += n
            over = self._pending >= self.max_pending
        if over:
            self._commit(only_if_over=True)

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
                for fd in (self._fd, self._dict_fd):
                    if fd is not None:
                        os.close(fd)
                self._fd = self._dict_fd = None
            atexit.unregister(self.close)

    def _commit(self, only_if_over: bool = False) -> None:
        with self._io_lock:
            with self._lock:
                if only_if_over and self._pending < self.max_pending:
                    return  # another thread's commit already relieved the pressure
                rows, self._rows = self._rows, []
                arrays, self._arrays = self._arrays, []
                lines, self._new_lines = self._new_lines, []
                self._pending = 0
            if rows:
                unary = np.zeros(len(rows), ENTRY)  # zeros: np.array(rows) leaves padding bytes uninitialised
                unary[:] = rows
                arrays.insert(0, unary)
            # Join the bytes, not the arrays: np.concatenate would drop the padding (numpy
            # canonicalises the dtype to a packed one), changing the entry size.
            data = self._carry + b"".join(a.tobytes() for a in arrays)
            all_lines = self._carry_lines + lines
            if not data and not all_lines:
                return
            try:
                self._write(all_lines, data)
            except BaseException:
                # Keep them for the next commit and count them again so back-pressure applies.
                self._carry, self._carry_lines = data, all_lines
                with self._lock:
                    self._pending += len(data) // ENTRY.itemsize
                raise
            self._carry, self._carry_lines = b"", []

    def _write(self, lines: list[str], data: bytes) -> None:
        if self._fd is None or (self._size and self._size + len(data) > self.segment_bytes):
            self._open_segment(lines)  # repeats every code known so far: dictionaries are per segment
            self._lines_written.extend(lines)
        elif lines:
            self._append(self._dict_fd, "".join(line + "\n" for line in lines).encode(), "_dict_size")
            self._lines_written.extend(lines)
        if data:
            self._append(self._fd, data, "_size")

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
        for fd in (self._fd, self._dict_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._dict_fd = None
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
                  "fields": [[n, ENTRY.fields[n][0].str, ENTRY.fields[n][1]] for n in ENTRY.names]}
        text = [json.dumps(header)] + self._lines_written + lines
        self._dict_fd, self._dict_size = dict_fd, 0
        self._append(dict_fd, "".join(line + "\n" for line in text).encode(), "_dict_size")
        self._fd = os.open(f"{stem}.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self._size = 0
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the new names themselves must survive a crash
        finally:
            os.close(dir_fd)

    # --- reading (all segments of all processes in the directory) ----------------------

    def entries(self, subject: int | None = None, since_ns: int | None = None) -> list[AuditEntry]:
        """Durable entries of every writer in the directory, oldest first (entries still
        pending in memory appear after the next group commit)."""
        return self._build(*self._select(subject, since_ns))

    def checks_of(self, citizen_id: str, limit: int = 100) -> list[AuditEntry]:
        """Who checked this citizen and when: newest first, at most ``limit`` entries."""
        records, segments, dicts = self._select(self.subject_of(citizen_id), None)
        keep = max(limit, 0)
        return self._build(records[::-1][:keep], segments[::-1][:keep], dicts)

    def _select(self, subject, since_ns) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """The matching entries of all segments, sorted by time, with each one's segment
        (an index into the returned dictionaries)."""
        picked, segments, dicts = [], [], []
        for path in sorted(self.directory.glob("audit-*.bin")):
            if not _SEGMENT_RE.match(path.name):
                continue
            try:
                n = path.stat().st_size // ENTRY.itemsize  # whole entries only: a torn tail is ignored
            except FileNotFoundError:
                continue
            if n == 0:
                continue
            seg = np.memmap(path, dtype=ENTRY, mode="r", shape=(n,))
            mask = np.ones(n, dtype=bool)
            if subject is not None:
                mask &= seg["subject"] == np.uint64(subject)
            if since_ns is not None:
                mask &= seg["time_ns"] >= np.int64(since_ns)
            rows = np.flatnonzero(mask)
            if len(rows):
                # Read after the entries: the writer syncs codes before entries using them.
                dicts.append(self._dictionary(path.with_suffix(".dict")))
                picked.append(seg[rows].tobytes())  # a copy: the memmap can go
                segments.append(np.full(len(rows), len(dicts) - 1, dtype=np.uint32))
            del seg
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

    def _dictionary(self, path: Path) -> dict:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return {}
        cached = self._dict_cache.get(path)
        if cached is not None and cached[0] == size:
            return cached[1]
        codes: dict = {}
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
                if item.get("format") != FORMAT or item.get("version") != VERSION or item.get("itemsize") != ENTRY.itemsize:
                    raise ValueError(f"{path}: unsupported audit format {item!r}")
                continue
            codes[(item["kind"], item["code"])] = item["value"]
        self._dict_cache[path] = (size, codes)
        return codes


def _name(codes: dict, kind: str, code: int) -> str:
    value = codes.get((kind, code))
    return f"?{kind}:{code}" if value is None else value  # a placeholder only if a dictionary was lost


def _as(values, dtype, what: str) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional")
    if a.dtype == dtype:
        return a
    if a.dtype.kind not in "iu" and a.size:
        raise ValueError(f"{what} must be integers")
    info = np.iinfo(dtype)
    if a.size and (int(a.min()) < info.min or int(a.max()) > info.max):
        raise ValueError(f"{what} out of range for {np.dtype(dtype).name}")
    return a.astype(dtype)
