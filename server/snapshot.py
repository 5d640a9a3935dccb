"""Serving-state snapshots: the whole city served seconds after a restart or a crash.

The serving state (server/state.py) is one shared mapping: citizen columns, features, gate
words, both token indexes. A snapshot is that mapping's bytes in a file, with a header that
says what they are::

    <data_dir>/snapshot/state.qjsnap
        "QJSNAP01"  header length (u64 LE)  header (JSON)  zero padding to HEADER_BYTES
        the mapping's bytes, in parts of PART_BYTES, each with its SHA-256 in the header
        the rollover's index of ageing records (server/ageing.py; the loading process's
        own, not in the mapping): its arrays back to back, one SHA-256 over them

The header carries the format, the mapping's layout (every array's name, dtype and shape:
the state's schema), the model release (model and calibration versions), a fingerprint of
the keys (card tokens and audit pseudonyms are keyed), the store it was taken from (its
name and the time of its first change), the **replay position** and the as-of day.

Taking one while the service writes (``write``): the bytes are copied part by part while
workers apply writes, so a row may be copied mid-change. The replay position is therefore a
position every write at or before which had been applied before the copy began: the state's
position as sampled at least ``REPLAY_MARGIN_SECONDS`` earlier (a write is applied
milliseconds after its commit), or, at a clean stop once every worker has drained, the
state's position itself. Every change after it is replayed at the next start, so a row copied
mid-change is re-derived from the store.

Starting from one (``restore``): the header is checked against what the server is about to
serve (format, layout, release, keys, store; its position must be one the store has), the
bytes are read straight into the shared mapping and each part's digest is checked, then
every citizen the store's change log names after the replay position is re-derived from the
store (``replay``), and the state serves; the index of ageing records is read after that
(``read_ageing``, in the background: only the next day rollover needs it, and a damaged one
is dropped, the rollover then reading every citizen once). Where a start's seconds went at
12.5 M (3.2 GB of state): 0.8 s to the state allocated, 2 s for the bytes from the page
cache (4-7 s from disk), 1 ms a citizen replayed; it was 18 s before because the start
counted every record in the store (``Store.counts``) to decide whether to seed. Anything that does not match is refused with a log line saying why, and
the state is rebuilt from the store (server/state.py ``fill``): a snapshot is never served
unless it is exactly what the store says. Written atomically (temporary file, fsync, rename,
fsync of the directory): the previous snapshot stays until the new one is complete, and a
disk that fills mid-write leaves it in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from server.files import fsync_dir
from server.ageing import Ageing
from server.keys import Keys
from server.state import READY, ServingState
from server.store import Store

log = logging.getLogger("qianjiang.snapshot")

#: 2: the ageing section (the rollover's decaying records) after the mapping's bytes.
FORMAT = 2
MAGIC = b"QJSNAP01"
#: The header's room at the head of the file; the mapping's bytes start here (page aligned).
HEADER_BYTES = 1 << 20
PART_BYTES = 64 << 20
SNAPSHOT_FILE = Path("snapshot") / "state.qjsnap"
#: A write is applied to the state milliseconds after its commit; a position the state held
#: this long ago has every write at or before it applied (see the module docstring).
REPLAY_MARGIN_SECONDS = 60.0
#: Past this many citizens changed since the snapshot, re-deriving them one by one is slower
#: than a whole load from the store.
MAX_REPLAY_ROWS = 200_000


class SnapshotRefused(Exception):
    """A snapshot that must not be served; the message says why."""


def snapshot_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / SNAPSHOT_FILE


def keys_fingerprint(keys: Keys) -> str:
    """Which keys a snapshot's card tokens and pseudonyms were made with (not the keys)."""
    return hashlib.sha256(b"qj-snapshot-keys\0" + keys.card + b"\0" + keys.audit).hexdigest()[:16]


def store_identity(store: Store) -> dict:
    return {"name": store.name, "first_change_at": store.first_change_at()}


def layout_of(state: ServingState) -> list:
    """The state's schema: every array's name, dtype and shape, in mapping order."""
    layout = ServingState.layout(state.spec, state.capacity, state.token_capacity)
    return [[name, np.dtype(dtype).str, list(shape)] for name, (dtype, shape) in layout.items()]


# --- writing ----------------------------------------------------------------------------------


def write(path: Path, state: ServingState, *, release: str, model_version: str, calibration_version: str,
          keys_id: str, store: dict, position: int) -> dict:
    """Write ``state`` to ``path`` atomically; ``position``: the replay position (module
    docstring). Returns the header. OSError (a full disk) leaves any previous snapshot."""
    t0 = time.perf_counter()
    buffer = memoryview(state._arena.buffer)
    size = len(buffer)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digests = []
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.lseek(fd, HEADER_BYTES, os.SEEK_SET)
        ready = _ready_offset(state)
        for start in range(0, size, PART_BYTES):
            part = bytearray(buffer[start : start + PART_BYTES])  # one copy: what is hashed is what is written
            if start <= ready < start + len(part):  # written not ready: see _ready_offset
                part[ready - start : ready - start + 8] = bytes(8)
            digests.append(hashlib.sha256(part).hexdigest())
            _write_all(fd, part)
        ageing = _write_ageing(fd, state.ageing)
        header = {
            "format": FORMAT, "layout": layout_of(state), "capacity": state.capacity,
            "token_capacity": state.token_capacity, "bytes": size, "part_bytes": PART_BYTES, "parts": digests,
            "release": release, "model_version": model_version, "calibration_version": calibration_version,
            "keys": keys_id, "store": store, "position": int(position), "as_of_day": state.as_of_day,
            "n_citizens": state.n_citizens, "created": time.time(), "ageing": ageing,
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        head = MAGIC + struct.pack("<Q", len(text)) + text
        if len(head) > HEADER_BYTES:
            raise ValueError(f"snapshot header of {len(head)} bytes does not fit {HEADER_BYTES}")
        os.pwrite(fd, head, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    log.info("snapshot of %d citizens (%.0f MB, and %.0f MB of the rollover's index; replay from position %d) "
             "written in %.1f s", state.n_citizens, size / 1e6, (state.ageing.nbytes if state.ageing else 0) / 1e6,
             position, time.perf_counter() - t0)
    return header


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _write_ageing(fd: int, ageing: Ageing | None) -> dict | None:
    """The rollover's index of ageing records (server/ageing.py; the loading process's, not
    in the mapping) after the mapping's bytes: its arrays back to back, one SHA-256 over
    them."""
    if ageing is None:
        return None
    digest, arrays = hashlib.sha256(), []
    for name, array in ageing.arrays().items():
        data = np.ascontiguousarray(array)
        digest.update(memoryview(data).cast("B"))
        _write_all(fd, data)
        arrays.append([name, data.dtype.str, len(data)])
    return {"arrays": arrays, "sha256": digest.hexdigest()}


def read_ageing(path: Path, header: dict) -> Ageing | None:
    """The snapshot's index of ageing records (server/ageing.py; SnapshotRefused when short
    or damaged): read after the start serves, by the loading process, which needs it only
    at the next day rollover."""
    spec = header.get("ageing")
    if spec is None:
        return None
    arrays, digest = {}, hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        fh.seek(HEADER_BYTES + header["bytes"])
        for name, dtype, length in spec["arrays"]:
            array = np.empty(int(length), np.dtype(dtype))
            view, got = memoryview(array).cast("B"), 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise SnapshotRefused(f"{path}: truncated in its ageing section")
                got += n
            digest.update(view)
            arrays[name] = array
    if digest.hexdigest() != spec["sha256"] or set(arrays) != set(Ageing.DTYPES):
        raise SnapshotRefused(f"{path}: its ageing section does not match its checksum (a damaged file)")
    return Ageing(**arrays)


def _ready_offset(state: ServingState) -> int:
    """Where the state's READY flag lies in its mapping. A snapshot holds it cleared: while a
    start reads the bytes into the shared mapping, workers already mapped to it wait for
    READY, which the start sets only once every part is in and the changes are replayed."""
    base = np.frombuffer(state._arena.buffer, np.uint8).__array_interface__["data"][0]
    return state.meta.__array_interface__["data"][0] - base + READY * state.meta.itemsize


# --- reading ----------------------------------------------------------------------------------


def read_header(path: Path) -> dict:
    """The header of the snapshot at ``path``; SnapshotRefused when there is none or it
    cannot be read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC) + 8)
            if len(head) < len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
                raise SnapshotRefused(f"{path}: not a snapshot of this service (no {MAGIC.decode()} header)")
            (length,) = struct.unpack("<Q", head[len(MAGIC):])
            if length > HEADER_BYTES:
                raise SnapshotRefused(f"{path}: header length {length} is corrupt")
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        raise SnapshotRefused(f"{path}: no snapshot") from None
    except (OSError, ValueError) as exc:
        raise SnapshotRefused(f"{path}: unreadable header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotRefused(f"{path}: snapshot format {header.get('format') if isinstance(header, dict) else '?'}, "
                              f"this server reads format {FORMAT}")
    return header


def check(header: dict, state: ServingState, *, release: str, model_version: str, calibration_version: str,
          keys_id: str, store: dict, store_position: int) -> None:
    """SnapshotRefused unless the snapshot is of this state's schema, this release, these
    keys and this store, at a position the store has."""
    expected = {
        "layout": (layout_of(state), "the serving state's schema (or its capacity) changed"),
        "model_version": (model_version, "another model"),
        "calibration_version": (calibration_version, "another calibration"),
        "keys": (keys_id, "other keys (card tokens and pseudonyms would not match)"),
        "store": (store, "another store"),
    }
    for key, (want, why) in expected.items():
        if header.get(key) != want:
            got = header.get(key)
            shown = "(a different layout)" if key == "layout" else repr(got)
            raise SnapshotRefused(f"snapshot of {why}: {key} {shown}, serving {want if key != 'layout' else '(this one)'}")
    if not 0 <= header.get("position", -1) <= store_position:
        raise SnapshotRefused(f"snapshot at position {header.get('position')}, but the store is at {store_position} "
                              "(a store restored from an older backup?)")


def load_into(path: Path, header: dict, state: ServingState, threads: int = 2) -> None:
    """Read the snapshot's bytes into the state's mapping, checking each part's digest
    (SnapshotRefused on a mismatch or a short file: the mapping then holds garbage, which
    the caller clears by rebuilding from the store). Not the index of ageing records after
    them: :func:`read_ageing`."""
    buffer = memoryview(state._arena.buffer)
    size, part_bytes, digests = header["bytes"], header["part_bytes"], header["parts"]
    if size != len(buffer) or len(digests) != -(-size // part_bytes):
        raise SnapshotRefused(f"{path}: {size} bytes in {len(digests)} parts does not fit a mapping of {len(buffer)}")
    ageing = header.get("ageing")
    expected = HEADER_BYTES + size + sum(np.dtype(t).itemsize * int(k) for _, t, k in (ageing or {}).get("arrays", ()))
    try:
        actual = os.stat(path).st_size
    except OSError as exc:
        raise SnapshotRefused(f"{path}: {exc.strerror}") from None
    if actual != expected:
        raise SnapshotRefused(f"{path}: truncated or grown ({actual} bytes, its header says {expected})")

    def read_part(i: int) -> None:
        start = i * part_bytes
        view = buffer[start : min(start + part_bytes, size)]
        with open(path, "rb", buffering=0) as fh:
            fh.seek(HEADER_BYTES + start)
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise SnapshotRefused(f"{path}: truncated in part {i} ({start + got} of {size} bytes)")
                got += n
        if hashlib.sha256(view).hexdigest() != digests[i]:
            raise SnapshotRefused(f"{path}: part {i} does not match its checksum (a damaged file)")

    with ThreadPoolExecutor(threads) as pool:  # hashlib and file reads release the GIL
        list(pool.map(read_part, range(len(digests))))
    state.ageing = None  # read_ageing reads it, after the start
    # a periodic snapshot may have caught a writer inside a row (its sequence odd): no writer
    # is in any row of this state, and nobody reads it before it is READY
    state.row_seq[:] = 0


def replay(state: ServingState, store: Store, scenarios, scorer, position: int) -> int:
    """Re-derive every citizen the change log names after ``position`` from the store
    (records, consent, birth day, cards; a citizen added since gets its row). Returns how
    many. SnapshotRefused when a change names no single citizen (a bulk write) or too many
    changed: a whole load is then the way."""
    hwm = store.high_water_mark()
    changes = store.changes_since(position)
    rows = set()
    for seq, kind, row in changes:
        if row is None:
            raise SnapshotRefused(f"a change after the snapshot ({kind} at position {seq}) touched many citizens")
        rows.add(row)
    if len(rows) > MAX_REPLAY_ROWS:
        raise SnapshotRefused(f"{len(rows):,} citizens changed since the snapshot: a whole load is faster")
    bound = scorer.bind(state.features, state.adult, state.columns)
    with state.lock:
        for row in sorted(rows):
            if row >= state.capacity:
                raise SnapshotRefused(f"citizen row {row} does not fit the snapshot's capacity of {state.capacity}")
            # at a position at or past every change read above
            state.apply_citizen(state.read_citizen(store, row), scenarios, bound)
        state.advance(hwm)
    return len(rows)
