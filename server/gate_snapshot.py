"""Offline gate mode, the service's side (issue 19; docs/offline_gates.md): per pay-later
scenario, signed snapshots of the card tokens allowed now, signed deltas every few minutes,
and the domain of GateService (proto/qianjiang/v1/gate.proto). The gate's side is
clients/gate.py; the filters are clients/fuse.pyx.

Design, and why:

* **The ALLOWED set is encoded, not the denied one.** A gate must deny a card that was never
  enrolled (a visitor's card): a list of the denied would answer "not denied" for it, so it
  would need a second structure of the whole enrolled universe. Encoding the allowed set
  denies unknown cards but for the filter's false positives. The structure is a filter
  cascade over the enrolled universe (CRLite): level 1 holds the allowed keys, level 2 the
  enrolled-but-not-allowed keys level 1 passes, level 3 the allowed keys level 2 passes, and
  so on until a level has no false positive; it is then exact for every enrolled card (an
  enrolled card that is not allowed is never allowed: the test checks every card of a city).
* **Fingerprints: 17 bits at level 1, 16 below; a 3-wise binary fuse filter.** An unknown
  token is falsely allowed when level 1 passes it (2**-17 = 7.6e-6) and level 2 does not
  catch it: at most 7.6e-6, under the 1e-5 target, where 16 bits (1.53e-5) would be above it.
  The 3-wise binary fuse filter takes 1.125 slots a key at a city's size, so level 1 costs
  17 x 1.125 = 19.1 bits an allowed card; level 2 holds the denied cards level 1 passes
  (denied x 7.6e-6: a few dozen at 12.5 M) and level 3 the allowed cards level 2 passes
  (allowed x 1.5e-5): a few hundred bytes. About 19.2 bits an allowed card in all, under the
  target of 20 (18-bit fingerprints would be 20.25). A 4-wise filter (1.075) would allow
  18 bits in 19.4; its construction is slower and 17 bits already meets the rate.
  (``python -m loadtest.gate_bench`` measures both figures.)
* **Keys** are 96 bits of a card token (bytes 0-7 and 12-15), the bits the service's token
  index keeps (server/token_index.pyx): the enrolled universe is read out of the index's
  slots, not from the store. Hashed with a 64-bit seed per level, kept in the manifest.
* **One decision function.** The allowed set is the compiled check itself
  (server/token_index.pyx ``Checker``) run over every enrolled token against the serving
  state's gate words, exactly what EligibilityService/Check answers at that moment: the gate
  and the online check agree by construction, and the test compares them card by card.
* **Deltas every ``--gate-delta-interval`` (300 s).** The publisher (the parent process's
  thread: one sequence for every worker) re-derives each scenario's allowed set over the
  whole universe (about 3-5 s of one core at 12.5 M a scenario, the delta included), and compares it with the
  last one slot by slot (a slot of the token index never moves while the service runs):
  removed = was allowed and is not, or enrolled since and not allowed (so a new card the
  cascade would falsely pass is denied); added = allowed and was not. Everything that
  changes an answer is caught, whatever caused it: a write, a revoked or expired consent, a
  new serious record, an unpaid default, a day rollover, a model rollout. The gate applies
  removals first. Each delta is signed on its own with its own expiry, so an empty one
  still extends the gate's list.
* **Snapshots** are rebuilt every ``REBASE_EVERY`` deltas (an hour) or when the changes since
  the last one pass 1 % of the allowed cards, so a gate that loads one starts with a small
  overlay; deltas are kept ``KEEP_DELTAS`` (24 h) for gates to catch up, older => the gate
  reloads the snapshot. A restart publishes a new snapshot at the next sequence with no delta
  to it: every gate reloads once (the token index's slots are not those of before).
* **Files, atomic** (``<data-dir>/gate/<scenario>/``): ``snapshot-<seq>.json`` (the signed
  manifest), ``snapshot-<seq>.bin`` (the parts), ``delta-<seq>.bin`` (a signed delta from
  seq-1), ``CURRENT`` (the snapshot's and latest sequences, and the store positions of the
  kept sequences). Workers serve them from disk; the publisher writes them.
* **Signing key**: Ed25519, ``QJ_GATE_SIGNING_KEY`` (hex of the 32-byte private key) or
  ``<data-dir>/keys/gate_signing.key`` (PEM, 0600), never the repository; its public key is
  written beside it as ``gate_signing.pub`` for the gates. ``--production`` refuses to start
  without one (like the end-user keys: server/end_user.py); development makes it.
* **Audit.** A snapshot handed to a gateway is ONE bulk disclosure: an entry to that caller
  (method GateService/GetSnapshot, result GATE_SNAPSHOT, subject none) whose rules version
  carries the snapshot's sequence, allowed cards and bytes (``min550+pay_later@seq=S,cards=N,
  bytes=B``). Deltas are its continuation and are not audited again. Offline decisions
  uploaded by a gate are written one entry per known card (method GateService/OfflineCheck,
  results OFFLINE_ALLOW / OFFLINE_DENY), with the position of the list they were taken with;
  the entry's time is when the gate decided (``decided_at_unix``, refused unless within the
  last 7 days), so "who checked me" shows the scan's time, not the upload's.
* **Uploads are bounded and idempotent**: at most ``MAX_UPLOAD`` decisions, each for a
  pay-later scenario the caller may decide (PERMISSION_DENIED for the whole upload
  otherwise, nothing written), 16-byte tokens, strictly increasing ``gate_sequence``; per
  (caller, gate_id) the highest sequence written is kept under ``gate/uploads/`` (a file
  lock across workers), and anything at or below it is skipped. The card tokens count
  against the caller's batch quota, like BatchCheck (every known one is an audit entry).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.fuse import Cascade
from clients.gate import KEY_BYTES, MANIFEST_FORMAT, canonical_json, encode_delta, key_id
from server.errors import BatchQuota, GateNotReady, InvalidArgument, PermissionDenied, SnapshotRequired
from server.files import write_atomic
from server.keys import load_ed25519_key, new_ed25519_key, public_pem
from server.scenarios import RESULT_NAMES, Outcome, Scenario
from server.state import iso_of
from server.token_index import Checker

log = logging.getLogger("qianjiang.gate")

#: Audit result codes (decisions 1-10, score disclosures 100-102, rights events 120-129).
GATE_SNAPSHOT, OFFLINE_ALLOW, OFFLINE_DENY = 110, 111, 112
RESULT_NAMES.update({GATE_SNAPSHOT: "GATE_SNAPSHOT", OFFLINE_ALLOW: "OFFLINE_ALLOW", OFFLINE_DENY: "OFFLINE_DENY"})

SNAPSHOT_METHOD = "GateService/GetSnapshot"
OFFLINE_METHOD = "GateService/OfflineCheck"

DEFAULT_DELTA_SECONDS = 300.0
DEFAULT_VALID_SECONDS = 3600.0
REBASE_EVERY = 12
REBASE_FRACTION = 0.01
KEEP_DELTAS = 288
FINGERPRINT_BITS = (17, 16)
CHUNK_BYTES = 1 << 20
MAX_UPLOAD = 10_000
MAX_DECISION_AGE_S = 7 * 86_400
#: Enrolled tokens checked per pass of the compiled check while deriving an allowed set.
_PASS = 1 << 20

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
KEY_ENV = "QJ_GATE_SIGNING_KEY"


# --- the signing key ----------------------------------------------------------------------------

def key_paths(data_dir: str | Path) -> tuple[Path, Path]:
    folder = Path(data_dir) / "keys"
    return folder / "gate_signing.key", folder / "gate_signing.pub"


def load_signing_key(data_dir: str | Path, create: bool) -> Ed25519PrivateKey:
    """The service's gate signing key: ``QJ_GATE_SIGNING_KEY`` (hex) or the data directory's
    PEM file, made (mode 0600) when ``create`` (development) and missing; without it
    (``--production``) a missing key is a ValueError naming the file. The public key is
    (re)written beside it for the gates."""
    private_path, public_path = key_paths(data_dir)
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(env.strip()))
        except ValueError:
            raise ValueError(f"{KEY_ENV}: expected the 32-byte Ed25519 private key in hex") from None
    elif private_path.exists():
        key = load_ed25519_key(private_path)
    elif create:
        key = new_ed25519_key(private_path)
    else:
        raise ValueError(f"no gate signing key: set {KEY_ENV} or install {private_path} (mode 0600); the gates get its "
                         f"public key ({public_path.name})")
    pem = public_pem(key)
    try:
        if not public_path.exists() or public_path.read_bytes() != pem:
            public_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(public_path, pem, 0o600)  # like every file of keys/ (the gates get a copy)
    except OSError:  # a read-only key directory: the operator distributes the public key
        pass
    return key


# --- the allowed set -------------------------------------------------------------------------------

def enrolled(state) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(occupied, k0, k1) of the token index's slots: which slots hold a card, and every
    slot's key halves (clients/fuse.pyx keys)."""
    slots = state.tokens.slots
    occupied = np.asarray(state.tokens.rows) >= 0
    return occupied, slots[:, 0], (slots[:, 1] >> np.uint64(32)).astype(np.uint32)


def canonical_tokens(k0: np.ndarray, k1: np.ndarray) -> bytes:
    """16-byte tokens holding the keys (bytes 8-11 zero): the token index finds the same slot
    for them as for the real tokens (it compares bytes 0-7 and 12-15)."""
    t = np.zeros((len(k0), 16), np.uint8)
    t[:, :8] = np.ascontiguousarray(k0, "<u8").view(np.uint8).reshape(-1, 8)
    t[:, 12:] = np.ascontiguousarray(k1, "<u4").view(np.uint8).reshape(-1, 4)
    return t.tobytes()


def allowed_slots(state, scenario: Scenario, occupied: np.ndarray, k0: np.ndarray, k1: np.ndarray) -> np.ndarray:
    """bool per slot: the card is allowed now, by the compiled check the service answers
    EligibilityService/Check with (server/token_index.pyx), a pass of ``_PASS`` cards at a
    time."""
    checker = Checker(state.tokens, state.gate, state.subject)
    out = np.zeros(len(occupied), bool)
    where = np.flatnonzero(occupied)
    for lo in range(0, len(where), _PASS):
        sel = where[lo:lo + _PASS]
        outcomes, _, _ = checker.check(canonical_tokens(k0[sel], k1[sel]), *scenario.rule, consent_bit=scenario.consent_bit)
        out[sel] = outcomes == Outcome.ALLOW
    return out


def pack_keys(k0: np.ndarray, k1: np.ndarray) -> bytes:
    """Keys as 12 bytes each (clients/fuse.pyx token_key's layout)."""
    t = np.empty((len(k0), KEY_BYTES), np.uint8)
    t[:, :8] = np.ascontiguousarray(k0, "<u8").view(np.uint8).reshape(-1, 8)
    t[:, 8:] = np.ascontiguousarray(k1, "<u4").view(np.uint8).reshape(-1, 4)
    return t.tobytes()


def build_snapshot(signing_key: Ed25519PrivateKey, scenario: str, sequence: int, k0, k1, allowed, meta: dict,
                   created: float, valid_seconds: float, seed: int | None = None) -> tuple[bytes, bytes, bytes, dict]:
    """(manifest body, signature, parts' bytes, manifest) of the cascade of the universe
    (k0, k1) with ``allowed``. ``meta``: the versions, position and day."""
    seed = int.from_bytes(os.urandom(8), "little") if seed is None else seed
    cascade = Cascade.build(k0, k1, allowed, bits=FINGERPRINT_BITS, seed=seed)
    parts, specs, levels = [], [], []
    for i, lv in enumerate(cascade.levels):
        data = lv.payload()
        parts.append(data)
        specs.append({"name": f"level-{i + 1}", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        levels.append(lv.params())
    manifest = {
        "format": MANIFEST_FORMAT, "scenario": scenario, "sequence": int(sequence), "created": int(created),
        "expires": int(created + valid_seconds), "key_id": key_id(signing_key.public_key()),
        "universe": int(len(k0)), "allowed": int(np.count_nonzero(allowed)), "levels": levels, "parts": specs,
        "bytes": sum(len(p) for p in parts), **meta,
    }
    body = canonical_json(manifest)
    return body, signing_key.sign(body), b"".join(parts), manifest


# --- the publisher (the parent process) --------------------------------------------------------------

@dataclass
class _Track:
    sequence: int
    base: int  # the sequence of the latest snapshot
    occupied: np.ndarray
    allowed: np.ndarray
    digest: int
    changed: int  # keys changed since the latest snapshot


def _digest(occupied: np.ndarray, k0: np.ndarray, k1: np.ndarray) -> int:
    """A checksum of the keys in the occupied slots: the slots still hold the same cards."""
    with np.errstate(over="ignore"):
        return int((k0[occupied] * np.uint64(0x9E3779B97F4A7C15) + k1[occupied].astype(np.uint64)).sum(dtype=np.uint64))


class GatePublisher:
    """Publishes each pay-later scenario's snapshot and deltas under ``<data_dir>/gate``.

    ``serving()`` gives (state, model_version, calibration_version) of what serves now."""

    def __init__(self, data_dir: str | Path, scenarios: dict[str, Scenario], signing_key: Ed25519PrivateKey, serving,
                 delta_seconds: float = DEFAULT_DELTA_SECONDS, valid_seconds: float = DEFAULT_VALID_SECONDS,
                 keep_deltas: int = KEEP_DELTAS, rebase_every: int = REBASE_EVERY, clock=time.time, metrics=None,
                 directory: str | Path | None = None):
        self.dir = Path(directory) if directory is not None else Path(data_dir) / "gate"
        self.scenarios = {n: s for n, s in scenarios.items() if s.pay_later}
        self.key = signing_key
        self.key_id = key_id(signing_key.public_key())
        self.serving = serving
        self.delta_seconds, self.valid_seconds = delta_seconds, valid_seconds
        self.keep_deltas, self.rebase_every = keep_deltas, rebase_every
        self.clock = clock
        self.metrics = metrics
        self.tracks: dict[str, _Track] = {}
        self.last: dict[str, dict] = {}  # what the last publish did, per scenario (tests, the bench)

    def publish(self) -> dict[str, dict]:
        """One round: every scenario's delta (and snapshot when due). Returns what it wrote."""
        state, model_version, calibration_version = self.serving()
        occupied, k0, k1 = enrolled(state)
        for name, scenario in self.scenarios.items():
            t0 = time.perf_counter()
            allowed = allowed_slots(state, scenario, occupied, k0, k1)
            meta = {"model_version": model_version, "calibration_version": calibration_version,
                    "rules_version": scenario.rules_version, "records_position": state.position,
                    "as_of_date": iso_of(state.as_of_day)}
            self.last[name] = out = self._publish(name, occupied, k0, k1, allowed, meta)
            out["seconds"] = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics(name, out["sequence"], out)
        return self.last

    def _publish(self, name, occupied, k0, k1, allowed, meta) -> dict:
        folder = self.dir / name
        folder.mkdir(parents=True, exist_ok=True)
        current = read_current(self.dir, name) or {}
        now = self.clock()
        track = self.tracks.get(name)
        if track is not None:
            digest = _digest(track.occupied, k0, k1)
            if digest != track.digest or not occupied[track.occupied].all():
                log.warning("gate %s: the token index changed under the publisher; publishing a new snapshot", name)
                track = None
        sequence = (track.sequence if track is not None else int(current.get("latest", 0))) + 1
        out = {"sequence": sequence}
        positions = {int(k): v for k, v in (current.get("positions") or {}).items() if int(k) > sequence - self.keep_deltas - 1}
        positions[sequence] = meta["records_position"]
        base = track.base if track is not None else sequence
        changed = 0
        if track is not None:
            removed = occupied & ~allowed & (track.allowed | ~track.occupied)
            added = allowed & ~track.allowed
            header = {"scenario": name, "from_sequence": sequence - 1, "sequence": sequence, "created": int(now),
                      "expires": int(now + self.valid_seconds), "key_id": self.key_id, **meta}
            body = encode_delta(header, pack_keys(k0[removed], k1[removed]), pack_keys(k0[added], k1[added]))
            write_atomic(folder / f"delta-{sequence}.bin", _signed_file(body, self.key.sign(body)))
            changed = int(np.count_nonzero(removed) + np.count_nonzero(added))
            out.update(delta_bytes=len(body), removed=int(np.count_nonzero(removed)), added=int(np.count_nonzero(added)))
            changed += track.changed
        # a snapshot at least as new as the oldest delta kept, so a gate can always catch up
        if track is None or sequence - track.base >= min(self.rebase_every, self.keep_deltas - 1) or changed > REBASE_FRACTION * max(1, np.count_nonzero(allowed)):
            sel = np.flatnonzero(occupied)
            body, signature, parts, manifest = build_snapshot(self.key, name, sequence, k0[sel], k1[sel], allowed[sel], meta,
                                                              now, self.valid_seconds)
            write_atomic(folder / f"snapshot-{sequence}.bin", parts)
            write_atomic(folder / f"snapshot-{sequence}.json", _signed_file(body, signature))
            base, changed = sequence, 0
            out.update(snapshot_bytes=len(parts), allowed=manifest["allowed"], universe=manifest["universe"],
                       levels=len(manifest["levels"]))
        # the first delta kept: none leads to a snapshot published without one (a start)
        oldest = sequence + 1 if track is None else max(int(current.get("oldest_delta", 1)),
                                                          sequence - self.keep_deltas + 1)
        write_atomic(folder / "CURRENT", json.dumps({"snapshot": base, "latest": sequence, "oldest_delta": oldest,
                                                     "positions": positions, "key_id": self.key_id}).encode())
        self.tracks[name] = _Track(sequence, base, occupied.copy(), allowed, _digest(occupied, k0, k1), changed)
        self._prune(folder, sequence, base)
        return out

    def _prune(self, folder: Path, sequence: int, base: int) -> None:
        """Deltas older than the window; snapshots but the newest two (a worker may be reading
        the one just replaced)."""
        snapshots = sorted({int(p.stem.partition("-")[2]) for p in folder.glob("snapshot-*.json")
                            if p.stem.partition("-")[2].isdigit()})
        keep = set(snapshots[-2:]) | {base}
        for path in folder.iterdir():
            kind, _, rest = path.stem.partition("-")
            if not rest.isdigit():
                continue
            seq = int(rest)
            if (kind == "delta" and seq <= sequence - self.keep_deltas) or (kind == "snapshot" and seq not in keep):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass

    def run(self, stop: threading.Event) -> None:
        """Publish at once, then every ``delta_seconds`` until ``stop``, at a lower CPU priority
        (this thread only, like the parent's other background work) so the workers come first."""
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:  # not permitted here: the normal priority
            pass
        while not stop.is_set():
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - keep the gates' last lists; retry next interval
                log.exception("gate lists not published")
            if stop.wait(self.delta_seconds):
                return


def _signed_file(body: bytes, signature: bytes) -> bytes:
    return json.dumps({"body": base64.b64encode(body).decode(), "signature": base64.b64encode(signature).decode()}).encode()


def _read_signed(path: Path) -> tuple[bytes, bytes]:
    doc = json.loads(path.read_bytes())
    return base64.b64decode(doc["body"]), base64.b64decode(doc["signature"])


def read_current(root: Path, name: str) -> dict | None:
    try:
        return json.loads((Path(root) / name / "CURRENT").read_bytes())
    except FileNotFoundError:
        return None


def publisher_metrics(metrics):
    """The publisher's callback feeding server/metrics.py's gauges (None: no metrics)."""
    if metrics is None:
        return None

    def update(scenario: str, sequence: int, out: dict) -> None:
        metrics.gate_sequence.labels(scenario=scenario).set(sequence)
        if "snapshot_bytes" in out:
            metrics.gate_snapshot_bytes.labels(scenario=scenario).set(out["snapshot_bytes"])
        for change in ("removed", "added"):
            if out.get(change):
                metrics.gate_delta_changes.labels(scenario=scenario, change=change).inc(out[change])
        if "seconds" in out:
            metrics.gate_publish_seconds.observe(out["seconds"])

    return update


def gate_dir(config) -> Path:
    """Where a server's lists are published and served from: ``--gate-dir``, by default
    ``<data-dir>/gate``. Replicas share one: one node publishes (the others run with
    ``--gate-delta-interval 0``) and every node serves its lists and takes uploads."""
    given = getattr(config, "gate_dir", None)
    return Path(given) if given is not None else Path(config.data_dir) / "gate"


def start_publisher(runtime, stop: threading.Event, metrics=None) -> GatePublisher | None:
    """The parent's publisher thread for a server (server/app.py), with the runtime's key."""
    cfg = runtime.config
    key = getattr(runtime, "gate_key", None)
    if key is None or getattr(cfg, "gate_delta_seconds", DEFAULT_DELTA_SECONDS) <= 0:
        return None
    publisher = GatePublisher(cfg.data_dir, runtime.scenarios, key,
                              lambda: (runtime.state, runtime.spec.model_version, runtime.calibration().calibration_version),
                              delta_seconds=getattr(cfg, "gate_delta_seconds", DEFAULT_DELTA_SECONDS),
                              valid_seconds=getattr(cfg, "gate_valid_seconds", DEFAULT_VALID_SECONDS),
                              metrics=publisher_metrics(metrics), directory=gate_dir(cfg))
    threading.Thread(target=publisher.run, args=(stop,), name="qj-gate", daemon=True).start()
    return publisher


# --- the domain of GateService (each worker) -------------------------------------------------------------

@dataclass
class UploadResult:
    written: int
    already_uploaded: int
    unknown_cards: int
    acknowledged: int


class GateLists:
    """What GateService answers, from the publisher's files, authorised like checks."""

    def __init__(self, data_dir: str | Path, service, directory: str | Path | None = None):
        self.root = Path(directory) if directory is not None else Path(data_dir) / "gate"
        self.service = service  # the worker's CreditService (state, audit, ids, quota)

    def _scenario(self, name: str, caller) -> Scenario:
        scenario = self.service.scenario(name)  # INVALID_ARGUMENT empty, NOT_FOUND unknown
        caller.check_scenario(name)
        if not scenario.pay_later:
            raise InvalidArgument("scenario", f"{name!r} is not a pay-later scenario: it has no offline list")
        return scenario

    def _current(self, name: str) -> dict:
        current = read_current(self.root, name)
        if current is None:
            raise GateNotReady(name)
        return current

    def manifest(self, name: str, caller) -> tuple[bytes, bytes, str, int]:
        """(body, signature, key id, latest sequence)."""
        self._scenario(name, caller)
        current = self._current(name)
        try:
            body, signature = _read_signed(self.root / name / f"snapshot-{current['snapshot']}.json")
        except FileNotFoundError:  # replaced between the two reads
            current = self._current(name)
            body, signature = _read_signed(self.root / name / f"snapshot-{current['snapshot']}.json")
        return body, signature, current.get("key_id", ""), int(current["latest"])

    def snapshot(self, name: str, caller):
        """(manifest (body, signature, key id, latest), an iterator of (part, offset, bytes)).
        Audited at once as one bulk disclosure to the caller."""
        scenario = self._scenario(name, caller)
        for attempt in range(3):  # the publisher may replace the snapshot between the two reads
            body, signature, kid, latest = self.manifest(name, caller)
            manifest = json.loads(body)
            try:
                data = (self.root / name / f"snapshot-{manifest['sequence']}.bin").read_bytes()
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise GateNotReady(name) from None
        self._audit_snapshot(scenario, caller, manifest)
        def chunks():
            offset = 0
            for spec in manifest["parts"]:
                part = data[offset:offset + spec["size"]]
                for at in range(0, max(len(part), 1), CHUNK_BYTES):
                    yield spec["name"], at, part[at:at + CHUNK_BYTES]
                offset += spec["size"]
        return (body, signature, kid, latest), chunks()

    def _audit_snapshot(self, scenario: Scenario, caller, manifest: dict) -> None:
        svc = self.service
        release = (f"{manifest['model_version']} {manifest['calibration_version']} {scenario.rules_version}"
                   f"@seq={manifest['sequence']},cards={manifest['allowed']},bytes={manifest['bytes']}")
        day = (np.datetime64(manifest["as_of_date"]) - np.datetime64("1970-01-01")).astype(int)
        seq, _ = svc.ids.next()
        svc.audit.record(seq, caller.audit_name, SNAPSHOT_METHOD, scenario.name, 0, GATE_SNAPSHOT, release,
                         int(manifest["records_position"]), int(day))

    def deltas(self, name: str, since: int, caller) -> list[tuple[bytes, bytes, str]]:
        """The signed deltas since+1 .. latest; SnapshotRequired when one is not kept."""
        self._scenario(name, caller)
        current = self._current(name)
        latest = int(current["latest"])
        if since > latest:
            raise SnapshotRequired(f"sequence {since} is ahead of the service's {latest} (restored?): load the snapshot")
        if since == latest:
            return []
        if since + 1 < int(current.get("oldest_delta", 1)) or since <= 0:
            raise SnapshotRequired(f"the deltas after {since} are no longer kept (the oldest is "
                                   f"{current.get('oldest_delta')}): load the snapshot")
        out = []
        for seq in range(since + 1, latest + 1):
            try:
                body, signature = _read_signed(self.root / name / f"delta-{seq}.bin")
            except FileNotFoundError:
                raise SnapshotRequired(f"delta {seq} is no longer kept: load the snapshot") from None
            out.append((body, signature, current.get("key_id", "")))
        return out

    def upload(self, gate_id: str, decisions: list, caller) -> UploadResult:
        """Write a gate's offline decisions to the audit log (module docstring)."""
        if not isinstance(gate_id, str) or not _ID.fullmatch(gate_id):
            raise InvalidArgument("gate_id", "expected 1-64 of A-Z a-z 0-9 _ . : - (starting with a letter or digit)")
        if len(decisions) > MAX_UPLOAD:
            raise InvalidArgument("decisions", f"{len(decisions)} decisions exceed the limit of {MAX_UPLOAD} an upload")
        now = time.time()
        scenarios: dict[str, Scenario] = {}
        last = 0
        for i, d in enumerate(decisions):
            if d.scenario not in scenarios:
                try:
                    scenarios[d.scenario] = self._scenario(d.scenario, caller)
                except PermissionDenied:
                    raise PermissionDenied(f"{caller.identity} may not decide scenario {d.scenario[:64]!r} "
                                           f"(decisions[{i}]): nothing was written") from None
                except InvalidArgument as exc:
                    raise InvalidArgument(f"decisions[{i}].scenario", str(exc).partition(": ")[2]) from None
            if len(d.card_token) != 16:
                raise InvalidArgument(f"decisions[{i}].card_token", f"expected 16 bytes, got {len(d.card_token)}")
            if d.gate_sequence <= last:
                raise InvalidArgument(f"decisions[{i}].gate_sequence", "must be above 0 and strictly increasing")
            last = d.gate_sequence
            if not now - MAX_DECISION_AGE_S <= d.decided_at_unix <= now + 300:
                raise InvalidArgument(f"decisions[{i}].decided_at_unix", "must be within the last 7 days")
        svc = self.service
        if decisions and svc.batch_quota is not None and not caller.unrestricted \
                and not svc.batch_quota.take(caller.identity, len(decisions)):
            raise BatchQuota(int(svc.batch_quota.rate))
        state = svc.state
        self.root.mkdir(parents=True, exist_ok=True)
        folder = self.root / "uploads"
        folder.mkdir(exist_ok=True)
        name = hashlib.sha256(f"{caller.identity}\0{gate_id}".encode()).hexdigest()[:32]
        written = skipped = unknown = 0
        with open(folder / f"{name}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = folder / f"{name}.json"
            try:
                acked = int(json.loads(path.read_bytes())["acknowledged"])
            except FileNotFoundError:
                acked = 0
            done = acked
            try:
                positions = {}
                for d in decisions:
                    if d.gate_sequence <= acked:
                        skipped += 1
                        continue
                    row = state.tokens.get(bytes(d.card_token))
                    if row < 0:
                        unknown += 1
                    else:
                        scenario = scenarios[d.scenario]
                        if d.scenario not in positions:
                            positions[d.scenario] = (read_current(self.root, d.scenario) or {}).get("positions") or {}
                        position = int(positions[d.scenario].get(str(d.list_sequence), 0))
                        release = svc._release[scenario.name].audit
                        seq, _ = svc.ids.next()
                        svc.audit.record(seq, caller.audit_name, OFFLINE_METHOD, scenario.name, int(state.subject[row]),
                                         OFFLINE_ALLOW if d.allowed else OFFLINE_DENY, release, position, state.as_of_day,
                                         at_ns=int(d.decided_at_unix) * 10**9)
                        written += 1
                    done = d.gate_sequence
            finally:
                if done > acked:
                    write_atomic(path, json.dumps({"caller": caller.identity, "gate_id": gate_id,
                                                   "acknowledged": done}).encode(), 0o600)
        return UploadResult(written, skipped, unknown, max(done, acked))
