"""Crash safety under SIGKILL: nothing acknowledged is lost, many times over.

    python -m loadtest.crash_soak --cycles 20                # one worker process
    python -m loadtest.crash_soak --cycles 20 --workers 2    # parent + two workers, killed as a group

Starts the real server (``python -m clients.cli serve``, 2,000 synthetic citizens, loopback
only, output to a log file per start) and, cycle after cycle: clients stream records
(IngestRecords, unique ids), grant and revoke consents, read scores and ask for eligibility
decisions; after a random 0.5-2 s the server is killed with SIGKILL (its whole process group),
restarted on the same data directory, and checked against what the clients were told before
the kill:

* records: every record id whose ACK a client received is in the store, with the fields sent
  (the SQLite file, opened read-only), and a sample re-sent through the restarted server comes
  back DUPLICATE;
* consents: every citizen's authorisation is the last grant or revoke that was acknowledged
  (in the store, and as the server answers: NOT_AUTHORISED exactly for revoked citizens), and
  every acknowledged grant/revoke is an event in the consent history;
* scores: for every citizen whose last score read before the kill is still current (see
  :class:`Ledger`), the restarted server gives the same score, level, percentile, raw points,
  dimension points and reasons;
* audit log: every disclosure the clients received (decision ids of checks, disclosure ids of
  score reads) whose response arrived more than ``flush interval + 0.25 s`` before the kill is
  in the audit log (server/audit.py's documented bound: a crash loses at most the last flush
  interval plus one write + fsync); disclosures inside that window may be missing and are
  counted.

After the last cycle the server is stopped gracefully (SIGTERM) and restarted once more: every
score must be unchanged and every disclosure, even the latest, must be in the audit log (a
drain flushes it). Prints one JSON line of figures (progress goes to stderr); the exit
status is 1 if any check failed, with examples in the line and the data and server logs kept.

Snapshots are written every 0.5 s (``--snapshot-interval``), so most restarts map the last
one and replay the store's changes after it (server/snapshot.py); the checks above hold for
what that start serves. Each start's log says which it was; the JSON line counts them
(``snapshot_starts``).

SIGKILL tests a crash of the process, not of the machine: the kernel's page cache survives
it, so this does not exercise ``synchronous = FULL`` (power loss) itself.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from clients.client import QianjiangClient, Record
from qianjiang.v1 import records_pb2, score_pb2
from server.app import ServerConfig

ROOT = Path(__file__).resolve().parent.parent

N_CITIZENS = 2000
#: Variables the data sources send, with their value ranges. None is a hard rule: a capped
#: score would hide most differences of raw points.
VARIABLES = (("utility_arrears_serious", (1.0, 1.0)), ("volunteer_hours", (1.0, 40.0)), ("traffic_violations", (1.0, 1.0)))
SCENARIOS = ("campus_fitness", "metro_pay_later", "library_deposit_free")
#: Records a stream may have sent and not yet seen acknowledged.
STREAM_WINDOW = 32
#: Beyond the audit log's flush interval: one write + fdatasync on a busy shared disk.
AUDIT_SLACK_SECONDS = 0.25
AUDIT_FLUSH_SECONDS = ServerConfig.audit_flush_seconds  # `serve` has no option to change it

ACCEPTED = records_pb2.RecordAck.Status.ACCEPTED
DUPLICATE = records_pb2.RecordAck.Status.DUPLICATE
OK, NOT_AUTHORISED = score_pb2.ScoreResult.Status.Value("OK"), score_pb2.ScoreResult.Status.Value("NOT_AUTHORISED")


def citizen_id(row: int) -> str:
    return f"c{row:08d}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _today() -> int:
    from server.state import today

    return today()


def _iso(day: int) -> str:
    from server.state import iso_of

    return iso_of(day)


def fingerprint(score: score_pb2.Score) -> tuple:
    """Everything a score read shows that depends on the stored data (not computed_at or
    the disclosure id)."""
    return (
        score.score, score.level, score.percentile, score.raw_points, score.hard_rule_applied,
        tuple(d.points for d in score.dimensions), tuple((r.code, r.points_lost) for r in score.reasons),
    )


# --- the server as a subprocess --------------------------------------------------------------


class ServerProcess:
    """``qjscore serve`` in its own session (so SIGKILL reaches every worker through the
    process group), its output in a log file per start, never an unread pipe."""

    def __init__(self, data_dir: Path, log_dir: Path, port: int, workers: int):
        self.data_dir, self.log_dir, self.port, self.workers = data_dir, log_dir, port, workers
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path: Path | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> float:
        """Start and wait for the ready line; returns the seconds it took."""
        self.starts += 1
        self.log_path = self.log_dir / f"serve-{self.starts:03d}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cmd = [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
               "--metrics-port", "0", "--seed-citizens", str(N_CITIZENS), "--workers", str(self.workers),
               "--snapshot-interval", "0.5"]  # kills land between snapshots: restarts replay from one
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + timeout
        while True:
            if "Stop with Ctrl-C" in self.log_path.read_text(errors="replace"):
                return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the whole process group (parent and workers at the same instant)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._reap_group()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM: drain gracefully (what an operator does); returns the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"server did not drain in {timeout:.0f} s:\n{self.tail()}") from None
        self._reap_group()
        return code

    def _reap_group(self) -> None:
        # Orphaned workers are reaped by whatever init the machine has, sometimes a second
        # later: wait until every process of the group is gone or a zombie (which holds no
        # socket or file), so the next start finds the port and the files free.
        deadline = time.monotonic() + 10
        while _group_alive(self.proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"process group {self.proc.pid} still alive 10 s after the server exited")
            time.sleep(0.02)

    def tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (zombies do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: fall back on the signal probe, zombies and all
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            return True
    return False


# --- what the clients were told -----------------------------------------------------------------


@dataclass
class SentRecord:
    citizen: str
    variable: str
    day: int
    value: float


@dataclass
class Ledger:
    """Everything the clients were acknowledged, and enough bookkeeping to know which score
    reads are still current at the moment of the kill.

    Scores. Comparing every score before and after the crash is wrong: a record acknowledged
    (or merely received and committed, its ACK lost in the kill) after a citizen's last read
    changes that citizen's score. So every record sent bumps a global counter and remembers,
    per citizen, the counter of its latest send and how many of its records await an ACK.
    A read of citizen c is *current* if, when it was sent, c had no record awaiting an ACK
    (every record of c before it was committed and applied, and ACKs come after both) and no
    record of c was sent since (``last_send[c] <= counter at the read``). The server's answer
    to a current read is exactly what the store must give back after a restart. The reads
    right after each restart (all citizens, nothing in flight) start every citizen current;
    the cycle's writes make some stale and the cycle's reads make some current again.

    This is stronger than the simpler "read all, restart gracefully, read again" (which only
    shows that a reload is deterministic): it ties the restarted scores to what a client saw
    before the crash, including citizens whose acknowledged records changed their score. The
    run ends with that simpler check as well.
    """

    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0
    in_flight: Counter = field(default_factory=Counter)
    last_send: dict = field(default_factory=dict)
    sent: dict = field(default_factory=dict)  # record id -> SentRecord, every record ever sent
    acked: set = field(default_factory=set)  # record ids whose ACCEPTED came back
    acked_cycle: list = field(default_factory=list)
    consent: dict = field(default_factory=dict)  # citizen -> last acknowledged state
    consent_acked_ops: Counter = field(default_factory=Counter)
    consent_tried_ops: Counter = field(default_factory=Counter)
    consent_pending: dict = field(default_factory=dict)  # citizen -> state of a call without an answer
    reads: dict = field(default_factory=dict)  # citizen -> (fingerprint, counter when sent)
    disclosures: list = field(default_factory=list)  # (decision or disclosure id, monotonic time of the answer)
    unexpected: list = field(default_factory=list)

    # records
    def send(self, record_id: str, rec: SentRecord) -> None:
        with self.lock:
            self.counter += 1
            self.in_flight[rec.citizen] += 1
            self.last_send[rec.citizen] = self.counter
            self.sent[record_id] = rec

    def ack(self, record_id: str, status: int) -> None:
        with self.lock:
            rec = self.sent[record_id]
            self.in_flight[rec.citizen] -= 1
            if status == ACCEPTED:
                self.acked.add(record_id)
                self.acked_cycle.append(record_id)
            else:
                self.unexpected.append(f"ack {record_id}: status {status}, expected ACCEPTED")

    # consent
    def consent_begin(self, cid: str, granted: bool) -> None:
        with self.lock:
            self.consent_tried_ops[cid] += 1
            self.consent_pending[cid] = granted

    def consent_done(self, cid: str, granted: bool) -> None:
        with self.lock:
            self.consent[cid] = granted
            self.consent_acked_ops[cid] += 1
            self.consent_pending.pop(cid, None)

    # score reads
    def read_begin(self, cid: str | None = None) -> tuple[int, bool]:
        """Before sending a read: the counter, and whether none of ``cid``'s records awaits an
        ACK (both at one instant: a send between the two would go unnoticed)."""
        with self.lock:
            return self.counter, cid is None or self.in_flight[cid] == 0

    def read_done(self, cid: str, fp: tuple, counter_at_send: int, clean_at_send: bool) -> None:
        if clean_at_send:
            with self.lock:
                self.reads[cid] = (fp, counter_at_send)

    def current_reads(self) -> dict:
        """Citizen -> fingerprint, for the reads no later send has made stale."""
        with self.lock:
            return {c: fp for c, (fp, n) in self.reads.items() if self.last_send.get(c, 0) <= n}

    def disclosed(self, decision_id: str, at: float) -> None:
        with self.lock:
            self.disclosures.append((decision_id, at))

    def error(self, what: str) -> None:
        with self.lock:
            self.unexpected.append(what)


# --- the workload of one cycle --------------------------------------------------------------------


class Workload:
    """Client threads against the live server: ``streams`` record streams, one consent
    thread, one reader (scores and checks). ``killed`` is set just before the SIGKILL, so
    errors after it are the expected UNAVAILABLE, not findings."""

    def __init__(self, target: str, ledger: Ledger, tokens: list[bytes], rng: random.Random, cycle: int,
                 run_tag: str, streams: int):
        self.target, self.ledger, self.tokens, self.cycle, self.run_tag = target, ledger, tokens, cycle, run_tag
        self.seeds = [rng.randrange(1 << 30) for _ in range(streams + 2)]
        self.killed = threading.Event()
        targets = [(self._stream, (i,)) for i in range(streams)] + [(self._consents, ()), (self._reads, ())]
        self.threads = [threading.Thread(target=self._guarded, args=t, daemon=True) for t in targets]
        self.recent: list[str] = []  # citizens lately written to: the reader favours them

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise RuntimeError(f"client thread {t.name} still running {timeout:.0f} s after the kill")

    def _guarded(self, target, args) -> None:
        try:
            target(*args)
        except Exception as exc:  # noqa: BLE001 - a broken client thread is a failed run, not a quiet one
            self.ledger.error(f"{target.__name__}: {type(exc).__name__}: {exc}")

    def _rpc_failed(self, what: str, exc: grpc.RpcError) -> bool:
        """True: stop this thread (the server is gone)."""
        if self.killed.is_set():
            return True
        self.ledger.error(f"{what}: {exc.code().name}: {exc.details()}")
        return False

    def _stream(self, index: int) -> None:
        rng = random.Random(self.seeds[index])
        today = _today()
        n = 0
        while not self.killed.is_set():
            window = threading.Semaphore(STREAM_WINDOW)

            def requests(window: threading.Semaphore):
                nonlocal n
                while not self.killed.is_set():
                    if not window.acquire(timeout=0.05):
                        continue
                    n += 1
                    row = rng.randrange(N_CITIZENS)
                    variable, (lo, hi) = rng.choice(VARIABLES)
                    # From yesterday back: never "in the future" for a server started before midnight.
                    rec = SentRecord(citizen_id(row), variable, today - 1 - rng.randrange(300), round(rng.uniform(lo, hi), 1))
                    record_id = f"crash-{self.run_tag}-{self.cycle}-{index}-{n}"
                    self.ledger.send(record_id, rec)
                    self.recent.append(rec.citizen)
                    yield Record(record_id=record_id, citizen_id=rec.citizen, variable=rec.variable, date=_iso(rec.day),
                                 value=rec.value, source="crash_soak")

            with QianjiangClient(self.target, timeout=5.0) as qj:
                try:
                    for ack in qj.records.IngestRecords(requests(window), timeout=120):
                        self.ledger.ack(ack.record_id, ack.status)
                        window.release()
                except grpc.RpcError as exc:
                    if self._rpc_failed(f"stream {index}", exc):
                        return
                    time.sleep(0.05)

    def _consents(self) -> None:
        rng = random.Random(self.seeds[-2])
        with QianjiangClient(self.target, timeout=5.0) as qj:
            while not self.killed.is_set():
                cid = citizen_id(rng.randrange(N_CITIZENS))
                granted = rng.random() < 0.5
                self.ledger.consent_begin(cid, granted)
                try:
                    state = qj.grant_consent(cid) if granted else qj.revoke_consent(cid)
                except grpc.RpcError as exc:
                    if self._rpc_failed(f"consent {cid}", exc):
                        return
                    continue
                if state.granted != granted:
                    self.ledger.error(f"consent {cid}: answered granted={state.granted}, asked {granted}")
                self.ledger.consent_done(cid, granted)

    def _reads(self) -> None:
        rng = random.Random(self.seeds[-1])
        with QianjiangClient(self.target, timeout=5.0) as qj:
            while not self.killed.is_set():
                if rng.random() < 0.6:
                    recent = self.recent[-200:]
                    cid = rng.choice(recent) if recent and rng.random() < 0.7 else citizen_id(rng.randrange(N_CITIZENS))
                    counter, clean = self.ledger.read_begin(cid)
                    try:
                        score = qj.get_score(cid, purpose="service_verification")
                    except grpc.RpcError as exc:
                        if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                            continue  # not authorised or under 18: nothing disclosed
                        if self._rpc_failed(f"score {cid}", exc):
                            return
                        continue
                    self.ledger.disclosed(score.disclosure_id, time.monotonic())
                    self.ledger.read_done(cid, fingerprint(score), counter, clean)
                else:
                    row = rng.randrange(N_CITIZENS)
                    try:
                        decision = qj.check(rng.choice(SCENARIOS), self.tokens[row])
                    except grpc.RpcError as exc:
                        if self._rpc_failed(f"check row {row}", exc):
                            return
                        continue
                    self.ledger.disclosed(decision.decision_id, time.monotonic())


# --- checks after a restart -------------------------------------------------------------------


@dataclass
class Figures:
    cycles: int = 0
    records_acked: int = 0
    records_lost: int = 0
    records_wrong: int = 0
    records_unacked_but_stored: int = 0
    duplicate_probes: int = 0
    duplicate_probe_failures: int = 0
    consent_ops_acked: int = 0
    consents_checked: int = 0
    consent_mismatches: int = 0
    consent_history_short: int = 0
    consent_state_vs_store: int = 0
    scores_compared: int = 0
    score_mismatches: int = 0
    disclosures: int = 0
    audit_missing_beyond_bound: int = 0
    audit_missing_in_bound: int = 0
    audit_duplicates: int = 0
    audit_missing_oldest_seconds: float = 0.0  # the oldest answer (before the kill) missing from the log
    restart_seconds: list = field(default_factory=list)
    examples: list = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(text)


def _db(data_dir: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{data_dir / 'qianjiang.db'}?mode=ro", uri=True)


def check_records(data_dir: Path, ledger: Ledger, qj: QianjiangClient, rng: random.Random, figures: Figures) -> None:
    with _db(data_dir) as db:
        stored = {
            rid: SentRecord(cid, var, day, value)
            for rid, cid, var, day, value in db.execute(
                "SELECT r.record_id, c.citizen_id, r.variable, r.day, r.value FROM records r"
                " JOIN citizens c USING (citizen_row) WHERE r.record_id LIKE 'crash-%'")
        }
    for rid in ledger.acked:
        got = stored.get(rid)
        if got is None:
            figures.records_lost += 1
            figures.note(f"cycle {figures.cycles}: acknowledged record {rid} is not in the store")
        elif got != ledger.sent[rid]:
            figures.records_wrong += 1
            figures.note(f"cycle {figures.cycles}: record {rid} stored as {got}, sent {ledger.sent[rid]}")
    figures.records_unacked_but_stored = len(set(stored) - ledger.acked)
    # The same through the restarted server: re-sending an acknowledged record is a duplicate.
    probe = rng.sample(ledger.acked_cycle, min(25, len(ledger.acked_cycle)))
    if probe:
        msgs = [Record(record_id=r, citizen_id=ledger.sent[r].citizen, variable=ledger.sent[r].variable,
                       date=_iso(ledger.sent[r].day), value=ledger.sent[r].value, source="crash_soak") for r in probe]
        for ack in qj.ingest(msgs):
            figures.duplicate_probes += 1
            if ack.status != DUPLICATE:
                figures.duplicate_probe_failures += 1
                figures.note(f"cycle {figures.cycles}: re-sent {ack.record_id} answered {ack.status}, not DUPLICATE")


def read_all(qj: QianjiangClient, ledger: Ledger) -> dict:
    """Every citizen's BatchGetScores result after a restart: citizen -> (status, fingerprint).
    Nothing is in flight, so each OK read is current; the disclosures go to the ledger."""
    out = {}
    counter, _ = ledger.read_begin()
    ids = [citizen_id(r) for r in range(N_CITIZENS)]
    for i in range(0, len(ids), 1000):
        results = qj.batch_scores(ids[i:i + 1000], purpose="service_verification", timeout=30)
        at = time.monotonic()
        for res in results:
            if res.status == OK:
                fp = fingerprint(res.score)
                out[res.citizen_id] = (OK, fp)
                ledger.disclosed(res.score.disclosure_id, at)
                ledger.read_done(res.citizen_id, fp, counter, True)
            else:
                out[res.citizen_id] = (res.status, None)
    return out


def check_consents(data_dir: Path, ledger: Ledger, served: dict, since: float, figures: Figures) -> None:
    with _db(data_dir) as db:
        stored = dict(db.execute("SELECT citizen_id, consent FROM citizens"))
        history = dict(db.execute(
            "SELECT c.citizen_id, COUNT(*) FROM consent_history h JOIN citizens c USING (citizen_row)"
            " WHERE h.at >= ? GROUP BY c.citizen_id", (since,)))
    for cid, consent in stored.items():
        # The restarted server's state against its store, for everyone.
        status = served[cid][0]
        if (status == NOT_AUTHORISED) != (consent == 0):
            figures.consent_state_vs_store += 1
            figures.note(f"cycle {figures.cycles}: {cid} stored consent {consent}, served status {status}")
    for cid in set(ledger.consent) | set(ledger.consent_pending):
        allowed = {ledger.consent[cid]} if cid in ledger.consent else set()
        if cid in ledger.consent_pending:  # a call the kill cut off: either outcome is right
            allowed.add(ledger.consent_pending[cid])
            if cid not in ledger.consent:
                allowed.add(None)  # never acknowledged: whatever the citizen had
        got = bool(stored[cid])
        figures.consents_checked += 1
        if got not in allowed and None not in allowed:
            figures.consent_mismatches += 1
            figures.note(f"cycle {figures.cycles}: {cid} consent {got} after restart, acknowledged {ledger.consent.get(cid)}")
        n = history.get(cid, 0)
        if not ledger.consent_acked_ops[cid] <= n <= ledger.consent_tried_ops[cid]:
            figures.consent_history_short += 1
            figures.note(f"cycle {figures.cycles}: {cid} has {n} consent events since the start; "
                         f"{ledger.consent_acked_ops[cid]} acknowledged, {ledger.consent_tried_ops[cid]} sent")
        ledger.consent[cid] = got  # resolves a cut-off call for the next cycle
        ledger.consent_pending.pop(cid, None)


def check_scores(before: dict, served: dict, figures: Figures) -> None:
    for cid, fp in before.items():
        status, now = served[cid]
        if status != OK:
            continue  # revoked since (checked as a consent)
        figures.scores_compared += 1
        if now != fp:
            figures.score_mismatches += 1
            figures.note(f"cycle {figures.cycles}: {cid} score {now[:4]} after restart, {fp[:4]} before the kill")


def check_audit(audit, ledger: Ledger, t_kill: float | None, figures: Figures) -> None:
    """``t_kill`` None: after a graceful stop, every disclosure must be there."""
    entries = Counter(e.decision_id for e in audit.entries())
    figures.audit_duplicates = sum(1 for n in entries.values() if n > 1)
    bound = AUDIT_FLUSH_SECONDS + AUDIT_SLACK_SECONDS
    for decision_id, at in ledger.disclosures:
        if decision_id in entries:
            continue
        if t_kill is None or at < t_kill - bound:
            figures.audit_missing_beyond_bound += 1
            when = "after a graceful stop" if t_kill is None else f"{t_kill - at:.3f} s before the kill"
            figures.note(f"cycle {figures.cycles}: disclosure {decision_id} answered {when} is not in the audit log")
        else:
            figures.audit_missing_in_bound += 1
        if t_kill is not None:
            figures.audit_missing_oldest_seconds = max(figures.audit_missing_oldest_seconds, t_kill - at)
    figures.disclosures += len(ledger.disclosures)
    ledger.disclosures.clear()


# --- the run ------------------------------------------------------------------------------------


def run(cycles: int = 20, workers: int = 1, work_dir: Path | None = None, seed: int = 6, streams: int = 2,
        min_run: float = 0.5, max_run: float = 2.0, log=print) -> dict:
    from server.audit import AuditLog
    from server.keys import card_token, load_keys, synthetic_card_number

    t_start = time.monotonic()
    keep = work_dir is not None
    work = Path(work_dir) if keep else Path(tempfile.mkdtemp(prefix="qj-crash-soak-"))
    data_dir, log_dir = work / "data", work / "logs"
    if data_dir.exists() and any(data_dir.iterdir()):
        raise SystemExit(f"{data_dir} is not empty: give a new --work-dir")
    log_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    run_tag = f"{seed}"
    server = ServerProcess(data_dir, log_dir, _free_port(), workers)
    ledger, figures = Ledger(), Figures()
    ok = False
    try:
        server.start()  # seeds the city and freezes the calibration
        since = time.time()  # consent events after this are the clients'
        keys = load_keys(data_dir)
        tokens = [card_token(keys.card, synthetic_card_number(row)) for row in range(N_CITIZENS)]
        audit = AuditLog(data_dir / "audit", keys.audit)  # only to read entries()
        # Closing it would write a segment of its own (the constructor queues its writer's
        # dictionary line), at exit too: a reader must not add files to the server's log.
        atexit.unregister(audit.close)
        with QianjiangClient(server.target, timeout=10) as qj:
            read_all(qj, ledger)
        for cycle in range(1, cycles + 1):
            figures.cycles = cycle
            workload = Workload(server.target, ledger, tokens, rng, cycle, run_tag, streams)
            ledger.acked_cycle = []
            workload.start()
            time.sleep(rng.uniform(min_run, max_run))
            workload.killed.set()  # from here, errors are the kill's and no record is sent
            t_kill = time.monotonic()
            server.kill()
            workload.join()
            before = ledger.current_reads()  # every send is in the ledger now
            ledger.in_flight.clear()  # records cut off by the kill are stored or not: the next reads tell
            figures.restart_seconds.append(server.start())
            with QianjiangClient(server.target, timeout=10) as qj:
                if qj.health() != "SERVING":
                    raise RuntimeError("restarted server is not SERVING after its ready line")
                check_records(data_dir, ledger, qj, rng, figures)
                check_audit(audit, ledger, t_kill, figures)
                served = read_all(qj, ledger)
                check_consents(data_dir, ledger, served, since, figures)
                check_scores(before, served, figures)
            figures.records_acked = len(ledger.acked)
            figures.consent_ops_acked = sum(ledger.consent_acked_ops.values())
            log(f"cycle {cycle}/{cycles}: {len(ledger.acked_cycle)} records acked, {len(before)} current scores,"
                f" restart {figures.restart_seconds[-1]:.2f} s, lost {figures.records_lost},"
                f" audit beyond bound {figures.audit_missing_beyond_bound}, in bound {figures.audit_missing_in_bound}")
        # The simple check too: a graceful stop and restart changes no score and flushes the audit log.
        with QianjiangClient(server.target, timeout=10) as qj:
            before = {c: fp for c, (status, fp) in read_all(qj, ledger).items() if status == OK}
        graceful_exit = server.stop()
        graceful = Figures(cycles=figures.cycles)
        check_audit(audit, ledger, None, graceful)
        server.start()
        with QianjiangClient(server.target, timeout=10) as qj:
            check_scores(before, read_all(qj, ledger), graceful)
        server.stop()
        figures.examples += graceful.examples
        ledger.disclosures.clear()
        restarts = figures.restart_seconds
        result = {
            "cycles": figures.cycles, "workers": workers, "streams": streams,
            "records_acked": figures.records_acked, "records_lost": figures.records_lost,
            "records_wrong": figures.records_wrong, "records_unacked_but_stored": figures.records_unacked_but_stored,
            "duplicate_probes": figures.duplicate_probes, "duplicate_probe_failures": figures.duplicate_probe_failures,
            "consent_ops_acked": figures.consent_ops_acked, "consents_checked": figures.consents_checked,
            "consent_mismatches": figures.consent_mismatches, "consent_history_mismatches": figures.consent_history_short,
            "consent_state_vs_store_mismatches": figures.consent_state_vs_store,
            "scores_compared": figures.scores_compared, "score_mismatches": figures.score_mismatches,
            "disclosures": figures.disclosures, "audit_bound_seconds": AUDIT_FLUSH_SECONDS + AUDIT_SLACK_SECONDS,
            "audit_missing_beyond_bound": figures.audit_missing_beyond_bound,
            "audit_missing_in_bound": figures.audit_missing_in_bound, "audit_duplicates": figures.audit_duplicates,
            "audit_missing_oldest_seconds": round(figures.audit_missing_oldest_seconds, 3),
            "graceful": {"exit_status": graceful_exit, "scores_compared": graceful.scores_compared,
                         "score_mismatches": graceful.score_mismatches, "disclosures": graceful.disclosures,
                         "audit_missing": graceful.audit_missing_beyond_bound},
            "restart_seconds": {"p50": round(statistics.median(restarts), 3), "max": round(max(restarts), 3)} if restarts else None,
            "snapshot_starts": sum("started from the snapshot" in f.read_text(errors="replace")
                                   for f in server.log_dir.glob("serve-*.log")),
            "unexpected_errors": len(ledger.unexpected),
            "seconds": round(time.monotonic() - t_start, 1),
        }
        failures = [
            figures.records_lost, figures.records_wrong, figures.duplicate_probe_failures, figures.consent_mismatches,
            figures.consent_history_short, figures.consent_state_vs_store, figures.score_mismatches,
            figures.audit_missing_beyond_bound, figures.audit_duplicates, graceful.score_mismatches,
            graceful.audit_missing_beyond_bound, graceful_exit, len(ledger.unexpected),
        ]
        result["ok"] = ok = not any(failures)
        result["examples"] = figures.examples + ledger.unexpected[:10]
        if keep or not ok:
            result["work_dir"] = str(work)
        return result
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
        if ok and not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.crash_soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=20, help="kill-restart cycles")
    ap.add_argument("--workers", type=int, default=1, help="server worker processes (2: the group is killed)")
    ap.add_argument("--streams", type=int, default=2, help="concurrent IngestRecords streams")
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--min-run", type=float, default=0.5, help="least seconds of load before a kill")
    ap.add_argument("--max-run", type=float, default=2.0, help="most seconds of load before a kill")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="new directory for data and server logs, kept (default: a temporary one, removed if all passed)")
    args = ap.parse_args(argv)
    result = run(args.cycles, args.workers, args.work_dir, args.seed, args.streams, args.min_run, args.max_run,
                 log=lambda text: print(text, file=sys.stderr, flush=True))
    print(json.dumps(result, ensure_ascii=False), flush=True)
    if not result["ok"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
