"""The offline gate library (issue 19; docs/offline_gates.md): a station gateway decides every
scan locally from a signed list of the cards allowed now, and keeps deciding while the link
to the service is down.

    gate = Gate(public_key_pem, {"metro_pay_later": ScenarioPolicy()}, client=client, gate_id="xixi-03")
    gate.sync()                                   # snapshot once, then deltas (call every minute or so)
    gate.check("metro_pay_later", card_token)     # True: open on credit; False: the rider pays
    gate.upload()                                 # decisions taken offline, once the link is back

What it does, and why:

* **Everything is verified before it is used.** A snapshot's manifest and every delta are
  Ed25519-signed by the service (server/gate_snapshot.py); the gate holds the service's
  PUBLIC key, installed out of band, never fetched. The manifest lists each part's SHA-256,
  size and filter parameters; a part that does not match, a manifest or delta whose
  signature does not verify (tampered, or signed by another key), a delta whose bytes are
  shorter or longer than its header says (truncated) are refused with a :class:`GateError`
  saying which, and the list in use is left as it was.
* **Deltas apply in order, exactly.** A delta takes sequence S to S+1: the keys removed
  first, then those added, into an overlay over the snapshot's filter cascade (removed keys
  are denied, added keys allowed, whatever the cascade says). A delta from another
  sequence than the gate's is refused: an older one (a replay) with :class:`ReplayedDelta`,
  a later one (a gap) with :class:`SequenceGap`; :meth:`Gate.sync` then loads the snapshot
  again rather than guess.
* **Online while the link is up.** :meth:`Gate.check` asks the service (its answer is the
  truth at that moment, audited there) and falls back to the local list when the call fails
  with UNAVAILABLE or a deadline: the link is then "down", and every decision until it is
  back is kept (:attr:`Gate.pending`) and uploaded by :meth:`Gate.upload`, which the service
  writes to its audit log (GateService/OfflineCheck), so "who checked me" stays complete.
  ``online=False`` decides locally always (and keeps every decision for upload).
* **Fail closed on expiry.** Each manifest and delta carries its expiry (the service's
  ``--gate-valid``); past the latest one the gate has, a scenario whose policy says
  ``fail_closed`` (the default) answers False for every card (the rider pays the normal way)
  and counts it (``qj_gate_expired_denials_total``); ``fail_closed=False`` keeps answering
  from the stale list. Nothing expired is uploaded: no data about the rider was used.
* **Metrics** in a registry of the gate's own (:attr:`Gate.registry`, prometheus_client):
  ``qj_gate_snapshot_age_seconds`` (since the list's newest snapshot or delta was made),
  ``qj_gate_sequence``, ``qj_gate_offline_decisions_total`` (by result),
  ``qj_gate_pending_decisions``, ``qj_gate_expired_denials_total``, ``qj_gate_reloads_total``.

The wire format (shared with the service, which imports it from here):

* manifest: canonical JSON (sorted keys, no spaces, UTF-8) of ``format``, ``scenario``,
  ``sequence``, ``created``, ``expires`` (unix seconds), ``model_version``,
  ``calibration_version``, ``rules_version``, ``records_position``, ``as_of_date``,
  ``key_id``, ``universe`` (enrolled cards), ``allowed``, ``levels`` (each filter's
  parameters: clients/fuse.pyx) and ``parts`` (``name``, ``size``, ``sha256``);
* delta: ``QJGDELTA`` + uint32 length of a canonical JSON header (``format``, ``scenario``,
  ``from_sequence``, ``sequence``, ``created``, ``expires``, the versions and position,
  ``removed``, ``added``) + the removed keys + the added keys, 12 bytes each (a card
  token's bytes 0-7 and 12-15: clients/fuse.pyx).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from clients.fuse import Cascade, FuseFilter, token_key

MANIFEST_FORMAT = "qj-gate-snapshot/1"
DELTA_FORMAT = "qj-gate-delta/1"
DELTA_MAGIC = b"QJGDELTA"
KEY_BYTES = 12
#: Offline decisions one upload carries at most (the service refuses more).
MAX_UPLOAD = 10_000


class GateError(Exception):
    """A list the gate refuses: the message says what is wrong; the list in use is kept."""


class BadSignature(GateError):
    """The signature does not verify with the gate's public key (tampered, or another key)."""


class TamperedSnapshot(GateError):
    """A snapshot's part does not match its manifest (size or SHA-256), or cannot be read."""


class TruncatedDelta(GateError):
    """A delta's bytes disagree with its header (cut short, or padded)."""


class SequenceGap(GateError):
    """A delta after a missing one: reload the snapshot."""


class ReplayedDelta(GateError):
    """A delta the gate has already applied (or an older one): refused, nothing changes."""


class WrongScenario(GateError):
    """A list of another scenario than the one it was given for."""


# --- keys and signatures ------------------------------------------------------------------------

def canonical_json(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(key) -> Ed25519PublicKey:
    """An Ed25519 public key from itself, its PEM bytes, or a PEM file's path."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    data = Path(key).read_bytes() if isinstance(key, (str, Path)) else bytes(key)
    public = serialization.load_pem_public_key(data)
    if not isinstance(public, Ed25519PublicKey):
        raise ValueError("the gate key must be an Ed25519 public key")
    return public


def verify(public: Ed25519PublicKey, body: bytes, signature: bytes, what: str) -> None:
    try:
        public.verify(bytes(signature), bytes(body))
    except InvalidSignature:
        raise BadSignature(f"{what}: the signature does not verify with this gate's key "
                           f"(key {key_id(public)}): tampered, or signed by another key") from None


# --- deltas --------------------------------------------------------------------------------------

def encode_delta(header: dict, removed: bytes, added: bytes) -> bytes:
    """A delta's body (what is signed): removed and added are packed 12-byte keys."""
    if len(removed) % KEY_BYTES or len(added) % KEY_BYTES:
        raise ValueError("keys are 12 bytes each")
    header = {**header, "format": DELTA_FORMAT, "removed": len(removed) // KEY_BYTES, "added": len(added) // KEY_BYTES}
    text = canonical_json(header)
    return DELTA_MAGIC + struct.pack("<I", len(text)) + text + removed + added


def decode_delta(body: bytes) -> tuple[dict, bytes, bytes]:
    """(header, removed keys, added keys) of a delta's body; TruncatedDelta if its bytes
    disagree with its header. (Verify the signature too: :func:`verify`.)"""
    body = bytes(body)
    if len(body) < len(DELTA_MAGIC) + 4 or not body.startswith(DELTA_MAGIC):
        raise TruncatedDelta(f"delta: {len(body)} bytes do not start with a delta header")
    (n,) = struct.unpack_from("<I", body, len(DELTA_MAGIC))
    start = len(DELTA_MAGIC) + 4
    if start + n > len(body):
        raise TruncatedDelta(f"delta: its header needs {n} bytes, {len(body) - start} are there")
    try:
        header = json.loads(body[start:start + n])
        removed, added = int(header["removed"]), int(header["added"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TruncatedDelta(f"delta: unreadable header ({exc})") from None
    if header.get("format") != DELTA_FORMAT:
        raise TruncatedDelta(f"delta: format {header.get('format')!r}, expected {DELTA_FORMAT}")
    keys = body[start + n:]
    expected = (removed + added) * KEY_BYTES
    if len(keys) != expected or removed < 0 or added < 0:
        raise TruncatedDelta(f"delta {header.get('from_sequence')}->{header.get('sequence')}: header says {removed} removed "
                             f"+ {added} added = {expected} bytes of keys, the body has {len(keys)}")
    return header, keys[: removed * KEY_BYTES], keys[removed * KEY_BYTES:]


def split_keys(packed: bytes) -> list[bytes]:
    return [packed[i:i + KEY_BYTES] for i in range(0, len(packed), KEY_BYTES)]


# --- one scenario's verified list -----------------------------------------------------------------

@dataclass
class ScenarioPolicy:
    """What a gate does with a scenario's list. ``fail_closed``: past the list's expiry
    answer False for every card (the default); False: keep answering from the stale list."""

    fail_closed: bool = True


@dataclass
class VerifiedList:
    """A scenario's snapshot (verified) and the deltas applied to it."""

    scenario: str
    manifest: dict
    cascade: Cascade
    sequence: int
    created: float  # of the newest snapshot or delta applied
    expires: float
    records_position: int
    removed: set = field(default_factory=set)  # 12-byte keys denied over the cascade
    added: set = field(default_factory=set)  # 12-byte keys allowed over the cascade

    @classmethod
    def load(cls, public: Ed25519PublicKey, scenario: str, body: bytes, signature: bytes, parts: dict[str, bytes]) -> "VerifiedList":
        """Verify the manifest's signature, each part's size and SHA-256, and build the cascade."""
        verify(public, body, signature, f"{scenario} snapshot manifest")
        try:
            manifest = json.loads(body)
        except ValueError as exc:
            raise TamperedSnapshot(f"{scenario} snapshot manifest: not JSON ({exc})") from None
        if manifest.get("format") != MANIFEST_FORMAT:
            raise TamperedSnapshot(f"{scenario} snapshot: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
        if manifest.get("scenario") != scenario:
            raise WrongScenario(f"a snapshot of {manifest.get('scenario')!r} given for {scenario!r}")
        levels = []
        specs = manifest.get("parts") or []
        if len(specs) != len(manifest.get("levels") or ()) or not specs:
            raise TamperedSnapshot(f"{scenario} snapshot: {len(specs)} parts for {len(manifest.get('levels') or ())} levels")
        for spec, params in zip(specs, manifest["levels"]):
            data = parts.get(spec["name"])
            if data is None:
                raise TamperedSnapshot(f"{scenario} snapshot: part {spec['name']!r} is missing")
            if len(data) != spec["size"]:
                raise TamperedSnapshot(f"{scenario} snapshot: part {spec['name']!r} has {len(data)} bytes, the manifest says "
                                       f"{spec['size']} (truncated?)")
            if hashlib.sha256(data).hexdigest() != spec["sha256"]:
                raise TamperedSnapshot(f"{scenario} snapshot: part {spec['name']!r} does not match its SHA-256 (tampered)")
            try:
                levels.append(FuseFilter.from_parts(params, data))
            except ValueError as exc:
                raise TamperedSnapshot(f"{scenario} snapshot: part {spec['name']!r}: {exc}") from None
        return cls(scenario, manifest, Cascade(levels), int(manifest["sequence"]), float(manifest["created"]),
                   float(manifest["expires"]), int(manifest.get("records_position", 0)))

    def apply(self, public: Ed25519PublicKey, body: bytes, signature: bytes) -> dict:
        """Apply one delta (S -> S+1): removals first, then additions. Returns its header."""
        header, removed, added = decode_delta(body)  # TruncatedDelta first: the clearer error
        verify(public, body, signature, f"{self.scenario} delta {header.get('from_sequence')}->{header.get('sequence')}")
        if header.get("scenario") != self.scenario:
            raise WrongScenario(f"a delta of {header.get('scenario')!r} given for {self.scenario!r}")
        start, to = int(header["from_sequence"]), int(header["sequence"])
        if to != start + 1:
            raise TruncatedDelta(f"delta {start}->{to}: not one step")
        if start < self.sequence:
            raise ReplayedDelta(f"{self.scenario} delta {start}->{to} is older than this gate's sequence {self.sequence}: "
                                "refused (a replay)")
        if start > self.sequence:
            raise SequenceGap(f"{self.scenario} delta {start}->{to} does not follow this gate's sequence {self.sequence}: "
                              "deltas are missing, reload the snapshot")
        for key in split_keys(removed):
            self.added.discard(key)
            self.removed.add(key)
        for key in split_keys(added):
            self.removed.discard(key)
            self.added.add(key)
        self.sequence = to
        self.created = float(header["created"])
        self.expires = float(header["expires"])
        self.records_position = int(header.get("records_position", self.records_position))
        return header

    def allows(self, token: bytes) -> bool:
        if not (self.removed or self.added):
            return self.cascade.allows(token)
        key = token[:8] + token[12:16]  # token_key, inline
        if key in self.removed:
            return False
        if key in self.added:
            return True
        return self.cascade.allows(token)

    def allows_many(self, tokens: bytes) -> np.ndarray:
        """uint8 per packed 16-byte token: 1 allowed (the overlay applied in numpy)."""
        out = self.cascade.query_tokens(tokens)
        if self.removed or self.added:
            t = np.frombuffer(tokens, np.uint8).reshape(-1, 16)
            keys = np.ascontiguousarray(np.concatenate([t[:, :8], t[:, 12:]], axis=1)).view("V12").ravel()
            for overlay, value in ((self.removed, 0), (self.added, 1)):
                if overlay:
                    out[np.isin(keys, np.frombuffer(b"".join(overlay), "V12"))] = value
        return out


# --- the gate ---------------------------------------------------------------------------------------

_LINK_DOWN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.RESOURCE_EXHAUSTED)


class Gate:
    """A station gateway's lists and decisions (see the module's docstring).

    ``public_key``: the service's gate key (an Ed25519PublicKey, PEM bytes, or a file);
    ``scenarios``: name -> :class:`ScenarioPolicy` (or a list of names: fail closed);
    ``client``: a clients.client.QianjiangClient to the service (None: offline only);
    ``clock``: seconds since the epoch (tests move it)."""

    def __init__(self, public_key, scenarios, client=None, gate_id: str = "gate", online: bool = True,
                 clock=time.time, check_timeout: float = 0.3, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.public = load_public_key(public_key)
        if not isinstance(scenarios, dict):
            scenarios = {name: ScenarioPolicy() for name in scenarios}
        self.policies: dict[str, ScenarioPolicy] = dict(scenarios)
        self.client = client
        self.gate_id = gate_id
        self.online = online and client is not None
        self.clock = clock
        self.check_timeout = check_timeout
        self.lists: dict[str, VerifiedList] = {}
        self.link_up = self.online
        self.pending: list = []  # offline decisions not yet acknowledged by the service
        # The service keeps, per gate_id, the highest sequence it has written: a restarted gate
        # must go on above it, so the counter starts at the wall clock's microseconds.
        self._next_sequence = time.time_ns() // 1000
        self._lock = threading.Lock()
        self._stub = None
        if client is not None:
            from qianjiang.v1 import gate_pb2_grpc

            self._stub = gate_pb2_grpc.GateServiceStub(client.channel)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.m_age = Gauge("qj_gate_snapshot_age_seconds", "Seconds since the list's newest snapshot or delta was made",
                           ["scenario"], registry=self.registry)
        self.m_sequence = Gauge("qj_gate_sequence", "The sequence of the list in use", ["scenario"], registry=self.registry)
        self.m_offline = Counter("qj_gate_offline_decisions", "Decisions taken from the local list while offline",
                                 ["scenario", "result"], registry=self.registry)
        self.m_pending = Gauge("qj_gate_pending_decisions", "Offline decisions kept for upload", registry=self.registry)
        self.m_expired = Counter("qj_gate_expired_denials", "Scans refused because the list had expired (fail closed)",
                                 ["scenario"], registry=self.registry)
        self.m_reloads = Counter("qj_gate_reloads", "Snapshots (re)loaded", ["scenario", "why"], registry=self.registry)
        for name in self.policies:
            self.m_age.labels(scenario=name).set_function(lambda name=name: self.age(name))

    # --- lists ---------------------------------------------------------------------------------

    def age(self, scenario: str) -> float:
        lst = self.lists.get(scenario)
        return float("nan") if lst is None else max(0.0, self.clock() - lst.created)

    def sequence(self, scenario: str) -> int:
        lst = self.lists.get(scenario)
        return 0 if lst is None else lst.sequence

    def load_snapshot(self, scenario: str, body: bytes, signature: bytes, parts: dict[str, bytes], why: str = "load") -> VerifiedList:
        lst = VerifiedList.load(self.public, scenario, body, signature, parts)
        with self._lock:
            self.lists[scenario] = lst
        self.m_sequence.labels(scenario=scenario).set(lst.sequence)
        self.m_reloads.labels(scenario=scenario, why=why).inc()
        return lst

    def apply_delta(self, scenario: str, body: bytes, signature: bytes) -> dict:
        lst = self.lists.get(scenario)
        if lst is None:
            raise SequenceGap(f"{scenario}: no snapshot loaded yet")
        with self._lock:
            header = lst.apply(self.public, body, signature)
        self.m_sequence.labels(scenario=scenario).set(lst.sequence)
        return header

    def expired(self, scenario: str) -> bool:
        lst = self.lists.get(scenario)
        return lst is None or self.clock() >= lst.expires

    # --- talking to the service ----------------------------------------------------------------

    def fetch_snapshot(self, scenario: str, timeout: float = 60.0) -> tuple[bytes, bytes, dict[str, bytes]]:
        """(manifest body, signature, parts) from GateService/GetSnapshot."""
        from qianjiang.v1 import gate_pb2

        body = signature = None
        parts: dict[str, bytearray] = {}
        for chunk in self._stub.GetSnapshot(gate_pb2.GetSnapshotRequest(scenario=scenario), timeout=timeout):
            if chunk.HasField("manifest"):
                body, signature = chunk.manifest.body, chunk.manifest.signature
                continue
            part = parts.setdefault(chunk.part, bytearray())
            if chunk.offset != len(part):
                raise TamperedSnapshot(f"{scenario} snapshot: part {chunk.part!r} chunk at {chunk.offset}, expected {len(part)}")
            part += chunk.data
        if body is None:
            raise TamperedSnapshot(f"{scenario} snapshot: the stream carried no manifest")
        return body, signature, {k: bytes(v) for k, v in parts.items()}

    def sync(self, scenarios=None, timeout: float = 60.0) -> dict[str, int]:
        """Bring each scenario's list up to the service's latest: the deltas since the gate's
        sequence, or the snapshot when there is none yet, when the service no longer keeps
        them (SNAPSHOT_REQUIRED) or a delta is refused (a gap, a replay, a bad one). Returns
        each scenario's sequence. Raises grpc errors of the link (the link is then down)."""
        from clients.client import QianjiangError

        out = {}
        for scenario in scenarios or list(self.policies):
            try:
                if scenario not in self.lists:
                    self.load_snapshot(scenario, *self.fetch_snapshot(scenario, timeout), why="first")
                try:
                    self._catch_up(scenario, timeout)
                except grpc.RpcError as exc:
                    if QianjiangError.of(exc).reason != "SNAPSHOT_REQUIRED":
                        raise
                    self.load_snapshot(scenario, *self.fetch_snapshot(scenario, timeout), why="snapshot_required")
                    self._catch_up(scenario, timeout)
                except (SequenceGap, ReplayedDelta, TruncatedDelta, BadSignature, WrongScenario):
                    self.load_snapshot(scenario, *self.fetch_snapshot(scenario, timeout), why="refused_delta")
                    self._catch_up(scenario, timeout)
            except grpc.RpcError as exc:
                if exc.code() in _LINK_DOWN:
                    self.link_up = False
                raise
            out[scenario] = self.lists[scenario].sequence
        if self.online:
            self.link_up = True
        return out

    def _catch_up(self, scenario: str, timeout: float) -> None:
        from qianjiang.v1 import gate_pb2

        request = gate_pb2.GetDeltasRequest(scenario=scenario, since_sequence=self.lists[scenario].sequence)
        for delta in self._stub.GetDeltas(request, timeout=timeout):
            self.apply_delta(scenario, delta.body, delta.signature)

    # --- decisions -------------------------------------------------------------------------------

    def check_local(self, scenario: str, token: bytes) -> bool:
        """The list's answer (False past its expiry when the scenario fails closed)."""
        if len(token) != 16:
            raise ValueError("card_token: expected 16 bytes")
        policy = self.policies.get(scenario)
        if policy is None:
            raise KeyError(f"this gate has no list for {scenario!r}")
        lst = self.lists.get(scenario)
        if lst is None or (policy.fail_closed and self.clock() >= lst.expires):
            self.m_expired.labels(scenario=scenario).inc()
            return False
        return lst.allows(token)

    def check(self, scenario: str, token: bytes) -> bool:
        """One scan: the service's answer while the link is up, else the local list's (kept
        for upload). Never raises for the link: every scan is answered."""
        if self.online and self.link_up:
            try:
                decision = self.client.check(scenario, token, timeout=self.check_timeout)
                return decision.outcome == 1  # ALLOW
            except grpc.RpcError as exc:
                if exc.code() not in _LINK_DOWN:
                    raise
                self.link_up = False
        return self._offline(scenario, token)

    def _offline(self, scenario: str, token: bytes) -> bool:
        lst = self.lists.get(scenario)
        expired = lst is None or (self.policies[scenario].fail_closed and self.clock() >= lst.expires)
        allowed = self.check_local(scenario, token)
        if not expired:  # an expired list used nothing about the rider: nothing to upload
            with self._lock:
                self.pending.append((self._next_sequence, scenario, bytes(token), allowed, lst.sequence, int(self.clock())))
                self._next_sequence += 1
            self.m_pending.set(len(self.pending))
            self.m_offline.labels(scenario=scenario, result="allow" if allowed else "deny").inc()
        return allowed

    def upload(self, timeout: float = 10.0) -> int:
        """Send the kept offline decisions (in batches of at most MAX_UPLOAD) and drop what the
        service acknowledges. Returns how many it acknowledged. Safe to retry: the service
        skips what it has seen."""
        from qianjiang.v1 import gate_pb2

        done = 0
        while self.pending:
            with self._lock:
                batch = self.pending[:MAX_UPLOAD]
            request = gate_pb2.UploadOfflineDecisionsRequest(gate_id=self.gate_id, decisions=[
                gate_pb2.OfflineDecision(gate_sequence=seq, scenario=sc, card_token=tok, allowed=ok, list_sequence=ls,
                                         decided_at_unix=at) for seq, sc, tok, ok, ls, at in batch])
            resp = self._stub.UploadOfflineDecisions(request, timeout=timeout)
            with self._lock:
                before = len(self.pending)
                self.pending = [d for d in self.pending if d[0] > resp.acknowledged_sequence]
                done += before - len(self.pending)
            self.m_pending.set(len(self.pending))
            if resp.acknowledged_sequence < batch[-1][0]:
                break  # the service kept the rest back: try again later
        if self.online:
            self.link_up = True
        return done
