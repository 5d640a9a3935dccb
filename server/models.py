"""The model registry: model releases staged, activated and restored in the data directory.

    >>> reg = ModelRegistry("data")                                          # doctest: +SKIP
    >>> release_id, report = reg.stage("v2.toml", store=open_store(url))     # doctest: +SKIP
    >>> print(report.format())            # PSI and level migration vs the active release  # doctest: +SKIP
    >>> reg.activate(release_id); signal_server("data")                      # doctest: +SKIP
    >>> reg.restore(); signal_server("data")                                 # doctest: +SKIP

A release is a model spec with its frozen calibration table. Its id is
``<model_version>~<calibration_version>``, e.g. ``1+f2ffda0723ab~cal-0123456789ab``: a model
version is ``<version>+<12 hex>`` (kernel/spec.py) and a calibration version ``cal-<12 hex>``
(kernel/calibration.py), so ids hold only digits, lower-case letters, ``+``, ``~`` and ``-``
and are safe as directory names. Layout::

    <data_dir>/models/<release_id>/spec.toml        a byte-for-byte copy of the validated spec
    <data_dir>/models/<release_id>/calibration.npz  its calibration table
    <data_dir>/models/<release_id>/release.json     how it was made; the report at staging
    <data_dir>/models/<release_id>/fairness.*       its fairness audit: .json, .png, .html (kernel/fairness.py)
    <data_dir>/models/ACTIVE                        the release id the server serves
    <data_dir>/models/PREVIOUS                      the one before (what restore goes back to)
    <data_dir>/models/HISTORY                       append-only: one JSON line per change
    <data_dir>/models/SERVED                        the server's acknowledgement: what it serves
    <data_dir>/qjscore.pid                          the running server (write_pid_file)

Every change is atomic: a file is written under a temporary name, fsynced, renamed over the
old one and the directory fsynced, so a reader sees the old content or the new, never a
missing or partial file. A release is written into a hidden staging directory and renamed
into place whole. Writers (stage, activate, restore, bootstrap) serialise on ``models/.lock``.
ACTIVE is the authority: :meth:`ModelRegistry.activate` writes PREVIOUS first, so a crash
between the two writes leaves the served release unchanged.

Staging validates the spec (:class:`kernel.spec.SpecError` names the bad key, and nothing is
written), calibrates it on the store's population when no table is given (as the server does
at first start), and compares it with the active release on the same population
(:func:`kernel.rollout.compare`), and audits its fairness on the synthetic city
(:func:`kernel.fairness.audit_city`: approval rates and four-fifths ratios of every protected
group in every scenario, and the proxy check), stored with the release. Activation is gated
by that audit: a release with a four-fifths ratio below 0.8 is refused unless the operator
gives a reason, which the history keeps with who activated it (a release staged before the
audit existed, or registered at a first start, is audited at activation). Activating and
restoring only move the pointers; restoring is the way back and is never gated. The server
is told to switch by SIGHUP (:func:`signal_server`) and answers in ``SERVED`` (the release it
serves, and whether the switch was made or why not), which ``qjscore model activate`` waits
for (:func:`wait_for_served`): it never reports a switch that did not happen.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import getpass
import json
import os
import re
import secrets
import shutil
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

from kernel.calibration import CalibrationError, CalibrationTable, RawHistogram
from kernel.fairness import AUDIT_CITIZENS, AUDIT_SEED, FOUR_FIFTHS, JSON_FILE, FairnessReport, audit_city
from kernel.rollout import PopulationScores, RolloutReport, compare
from kernel.score import Scorer
from kernel.spec import DEFAULT_SPEC_PATH, V1_SPEC_PATH, ModelSpec, SpecError, load_spec
from server.files import fsync_dir, fsync_file, write_atomic
from server.scenarios import Scenario, load_scenarios
from server.state import ServingState, today

#: What a release id looks like: ``<model_version>~<calibration_version>``.
RELEASE_ID_RE = re.compile(r"\A[0-9]{1,20}\+[0-9a-f]{12}~cal-[0-9a-f]{12}\Z")
SPEC_FILE, CALIBRATION_FILE, RELEASE_FILE = "spec.toml", "calibration.npz", "release.json"
ACTIVE, PREVIOUS, HISTORY, SERVED = "ACTIVE", "PREVIOUS", "HISTORY", "SERVED"
PID_FILE = "qjscore.pid"


class RegistryError(ValueError):
    """A registry operation cannot be done (unknown release, nothing to restore, a damaged
    registry file). The message names the release or file."""


class FairnessGateError(RegistryError):
    """Activation refused: the release fails the four-fifths rule and no reason was given."""


def operator_name() -> str:
    """Who is changing the registry, for its history: the login behind sudo, or the user."""
    try:
        return os.environ.get("SUDO_USER") or getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        return f"uid {os.getuid()}"


def release_id(spec: ModelSpec, calibration: CalibrationTable) -> str:
    return f"{spec.model_version}~{calibration.calibration_version}"


def check_release_id(value: str) -> str:
    """``value`` if it is a well-formed release id (so also a safe directory name)."""
    if not isinstance(value, str) or not RELEASE_ID_RE.match(value):
        raise RegistryError(
            f"{value!r} is not a release id (expected <model_version>~<calibration_version>, "
            "e.g. 1+f2ffda0723ab~cal-0123456789ab; `qjscore model status` lists them)"
        )
    return value


# --- atomic files ------------------------------------------------------------------------------




def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_calibration(path: str | Path, spec: ModelSpec | None = None) -> CalibrationTable:
    """A calibration file, checked against its own version and (given) the spec; every
    problem is a CalibrationError naming the file."""
    try:
        return CalibrationTable.load(path, spec)
    except CalibrationError:
        raise
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such calibration file") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{path}: not a calibration table ({type(exc).__name__}: {exc})") from None


# --- scoring a population -------------------------------------------------------------------------


class StoreSnapshot:
    """One read of what scoring needs from a store (citizens, cards, active records), so two
    releases are scored on exactly the same people and records. Duck-types the read side of
    :class:`server.store.Store` that :meth:`ServingState.load` uses."""

    def __init__(self, store):
        self._position = store.high_water_mark()  # first: what is read below is at least this new
        self._citizens = store.citizens()
        self._cards = store.cards()
        self._active = store.active_records()

    def high_water_mark(self) -> int:
        return self._position

    def citizens(self):
        return self._citizens

    def cards(self):
        return self._cards

    def active_records(self, citizen_row: int | None = None):
        if citizen_row is not None:
            return self._active.for_citizen(citizen_row)
        return self._active


def score_population(store, spec: ModelSpec, calibration: CalibrationTable | None = None,
                     scenarios: dict[str, Scenario] | None = None, as_of_day: int | None = None,
                     n_threads: int = 2) -> PopulationScores:
    """Score every citizen of ``store`` (a Store or a :class:`StoreSnapshot`) under ``spec``
    and ``calibration``, through the server's own loading path (:meth:`ServingState.load`),
    as of ``as_of_day`` (default today). With no calibration, one is frozen from these
    adults' raw points first, exactly as the server does at first start. The result's
    ``calibration`` is the table the scores were made with."""
    snap = store if isinstance(store, StoreSnapshot) else StoreSnapshot(store)
    scenarios = load_scenarios() if scenarios is None else scenarios
    day = today() if as_of_day is None else int(as_of_day)
    n = len(snap.citizens().ids)
    state = ServingState.allocate(spec, max(1, n), token_capacity=max(1, n, len(snap.cards())))
    state.load(snap, Scorer(spec, calibration) if calibration is not None else Scorer(spec), scenarios, day,
               n_threads=n_threads, mark_ready=False)
    if calibration is None:
        hist = RawHistogram.empty(spec)
        hist.add(state.columns.raw[:n][state.adult[:n] == 1])
        calibration = hist.freeze()
        state.rescore(Scorer(spec, calibration), n_threads=n_threads)
    cols = state.columns
    return PopulationScores(
        raw=cols.raw[:n].copy(), score=cols.score[:n].copy(), level=cols.level[:n].copy(),
        adult=state.adult[:n].copy(), calibration=calibration,
    )


# --- the registry ---------------------------------------------------------------------------------


class ModelRegistry:
    """Releases under ``<data_dir>/models``; see the module docstring for the layout."""

    def __init__(self, data_dir: str | Path, audit_citizens: int = AUDIT_CITIZENS, audit_seed: int = AUDIT_SEED):
        """``audit_citizens`` and ``audit_seed``: the synthetic city of the fairness audit that
        staging (and activating a release that has none) runs."""
        self.data_dir = Path(data_dir)
        self.root = self.data_dir / "models"
        self.audit_citizens, self.audit_seed = audit_citizens, audit_seed

    # --- reading -------------------------------------------------------------------------

    def _pointer(self, name: str) -> str | None:
        try:
            text = (self.root / name).read_text().strip()
        except FileNotFoundError:
            return None
        if not text:
            return None
        try:
            return check_release_id(text)
        except RegistryError:
            raise RegistryError(f"{self.root / name}: {text[:80]!r} is not a release id; the file was altered") from None

    def active(self) -> str | None:
        """The release id the server serves, or None before the first release."""
        return self._pointer(ACTIVE)

    def previous(self) -> str | None:
        """The release that was active before the current one (what :meth:`restore` brings back)."""
        return self._pointer(PREVIOUS)

    def path(self, rid: str) -> Path:
        return self.root / check_release_id(rid)

    def releases(self) -> list[str]:
        """Staged release ids, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and RELEASE_ID_RE.match(p.name)]
        return [p.name for p in sorted(found, key=lambda p: (self.info(p.name).get("staged_at", ""), p.name))]

    def info(self, rid: str) -> dict:
        """The release's ``release.json`` (how it was made, its report at staging); {} if unreadable."""
        try:
            return json.loads((self.path(rid) / RELEASE_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def release(self, rid: str) -> tuple[ModelSpec, CalibrationTable]:
        """The release's spec and calibration, loaded and validated: SpecError for a spec that
        no longer validates, CalibrationError for a table that does not fit it, RegistryError
        for an unknown release or files that do not match the id."""
        where = self.path(rid)
        if not where.is_dir():
            raise RegistryError(f"release {rid}: not staged (no {where}); `qjscore model stage SPEC` first")
        spec = load_spec(where / SPEC_FILE)
        table = load_calibration(where / CALIBRATION_FILE, spec)
        if release_id(spec, table) != rid:
            raise RegistryError(
                f"release {rid}: its files are model {spec.model_version} with calibration "
                f"{table.calibration_version}; the directory was altered"
            )
        return spec, table

    def fairness(self, rid: str) -> FairnessReport | None:
        """The release's fairness audit (``fairness.json``), or None if it has none."""
        try:
            return FairnessReport.from_dict(json.loads((self.path(rid) / JSON_FILE).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def history(self, limit: int | None = None) -> list[dict]:
        """Changes of ACTIVE, oldest first (the last ``limit``)."""
        try:
            lines = (self.root / HISTORY).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines[-limit:] if limit else lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def served(self) -> dict | None:
        """The running server's last acknowledgement (:meth:`record_served`), or None."""
        try:
            doc = json.loads((self.root / SERVED).read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("seq"), int) else None

    def record_served(self, release: str | None, requested: str | None, result: str, error: str | None = None) -> dict:
        """The server says what it serves, after its start (``result`` "serving") or a switch
        request ("switched", "unchanged", "rejected", "failed" with ``error``). Only the
        server on this data directory writes it (it holds the directory's lock)."""
        last = self.served()
        doc = {"seq": (last["seq"] + 1) if last else 1, "pid": os.getpid(), "release": release, "requested": requested,
               "result": result, "error": error, "at": _now()}
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / SERVED, json.dumps(doc).encode())
        return doc

    # --- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _set(self, name: str, rid: str) -> None:
        write_atomic(self.root / name, f"{rid}\n".encode())

    def _log(self, action: str, active: str, previous: str | None, **more) -> None:
        line = json.dumps({"time": _now(), "action": action, "active": active, "previous": previous, **more},
                          ensure_ascii=False) + "\n"
        fd = os.open(self.root / HISTORY, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_release(self, spec_bytes: bytes, spec: ModelSpec, table: CalibrationTable, meta: dict,
                       files: dict[str, bytes] | None = None) -> str:
        """Write a release whole (staging directory, then one rename). A release that exists
        already keeps its files (same id, same content) and gets the new ``release.json`` and
        ``files`` (its reports: name -> bytes)."""
        files = files or {}
        rid = release_id(spec, table)
        final = self.root / rid
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".stage-{os.getpid()}-{secrets.token_hex(4)}"
        meta = {"release_id": rid, "model_version": spec.model_version,
                "calibration_version": table.calibration_version, **meta}
        try:
            staging.mkdir()
            write_atomic(staging / SPEC_FILE, spec_bytes)
            table.save(staging / CALIBRATION_FILE)
            fsync_file(staging / CALIBRATION_FILE)
            write_atomic(staging / RELEASE_FILE, json.dumps(meta, indent=1, ensure_ascii=False).encode())
            for name, data in files.items():
                write_atomic(staging / name, data)
            copy_spec = load_spec(staging / SPEC_FILE)  # what is on disk is what was validated
            if copy_spec.model_version != spec.model_version:
                raise RegistryError(f"{staging / SPEC_FILE}: the copy is model {copy_spec.model_version}, not {spec.model_version}")
            with self._locked():
                if final.is_dir():
                    self.release(rid)  # the existing copy must still be sound
                    for name in files:
                        write_atomic(final / name, files[name])
                    write_atomic(final / RELEASE_FILE, (staging / RELEASE_FILE).read_bytes())
                else:
                    os.rename(staging, final)
                    fsync_dir(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return rid

    def bootstrap(self, spec: ModelSpec, calibration: CalibrationTable, spec_path: str | Path | None = None) -> str:
        """At first start: register ``spec`` (read from ``spec_path``, default
        kernel/models/v2.toml, the default model) with ``calibration`` as the ACTIVE release, unless one is
        active already. Returns the active release id."""
        current = self.active()
        if current is not None:
            return current
        calibration.check_model(spec)
        src = Path(spec_path) if spec_path is not None else DEFAULT_SPEC_PATH
        spec_bytes = src.read_bytes()
        if load_spec(src).model_version != spec.model_version:
            raise RegistryError(f"{src}: is not model {spec.model_version}; give the path the spec was loaded from")
        rid = self._write_release(spec_bytes, spec, calibration,
                                  {"staged_at": _now(), "origin": "bootstrap", "source_spec": str(src)})
        with self._locked():
            current = self.active()
            if current is not None:  # another process bootstrapped meanwhile
                return current
            self._set(ACTIVE, rid)
            self._log("bootstrap", rid, None)
        return rid

    def adopt_legacy(self, spec_path: str | Path | None = None) -> str | None:
        """Before the registry existed the server kept ``<data_dir>/calibration-<model_version>.npz``:
        if nothing is active and that file exists for ``spec_path`` (default: the default
        model, then version 1, the model of every data directory from before the registry),
        bootstrap from it. Returns the active release id, or None."""
        if self.active() is not None:
            return self.active()
        for path in [spec_path] if spec_path is not None else [DEFAULT_SPEC_PATH, V1_SPEC_PATH]:
            spec = load_spec(path)
            legacy = self.data_dir / f"calibration-{spec.model_version}.npz"
            if legacy.exists():
                return self.bootstrap(spec, load_calibration(legacy, spec), path)
        return None

    def stage(self, spec_path: str | Path | None = None, calibration_path: str | Path | None = None, *,
              store, scenarios: dict[str, Scenario] | None = None, as_of_day: int | None = None,
              n_threads: int = 2) -> tuple[str, RolloutReport | None]:
        """Validate a spec (default: the active release's, to recalibrate it) and a calibration
        (default: frozen on the store's population), write the release, and return its id and
        its report against the active release on the same population (None when nothing is
        active). A bad spec raises SpecError, a calibration that does not fit it
        CalibrationError; either way nothing is written. Staging does not activate. The
        release's fairness audit (:meth:`fairness`) is written with it."""
        active = self.active()
        if spec_path is None:
            if active is None:
                raise RegistryError("no active release to recalibrate: give a spec file to stage")
            src = self.path(active) / SPEC_FILE
        else:
            src = Path(spec_path)
        try:
            spec_bytes = src.read_bytes()
        except OSError as exc:
            raise SpecError(f"{src}: cannot read the spec ({exc.strerror})") from None
        spec = load_spec(src)
        table = load_calibration(calibration_path, spec) if calibration_path is not None else None

        snap = StoreSnapshot(store)
        day = today() if as_of_day is None else int(as_of_day)
        new = score_population(snap, spec, table, scenarios, day, n_threads)
        rid = release_id(spec, new.calibration)
        report = None
        if active is not None:
            old_spec, old_table = self.release(active)
            old = score_population(snap, old_spec, old_table, scenarios, day, n_threads)
            report = compare(old, new, old_spec, spec, active, rid)
        fairness = audit_city(spec, new.calibration, scenarios, self.audit_citizens, self.audit_seed, n_threads)
        meta = {
            "staged_at": _now(),
            "origin": "stage",
            "source_spec": str(src),
            "calibration": str(calibration_path) if calibration_path is not None
            else f"frozen from {new.calibration.total:,} adults as of day {day}",
            "as_of_day": day,
            "report": report.to_dict() if report is not None else None,
            "fairness": fairness.summary(),
        }
        self._write_release(spec_bytes, spec, new.calibration, meta, fairness.files())
        return rid, report

    def audit(self, rid: str, scenarios: dict[str, Scenario] | None = None, n_threads: int = 2) -> FairnessReport:
        """The release's fairness audit: the stored one, or (a release without one) one run
        now on the registry's synthetic city and stored with the release."""
        found = self.fairness(rid)
        if found is not None:
            return found
        spec, table = self.release(rid)
        report = audit_city(spec, table, scenarios, self.audit_citizens, self.audit_seed, n_threads)
        where = self.path(rid)
        with self._locked():
            for name, data in report.files().items():
                write_atomic(where / name, data)
            info = self.info(rid)
            if info:
                write_atomic(where / RELEASE_FILE, json.dumps({**info, "fairness": report.summary()}, indent=1,
                                                               ensure_ascii=False).encode())
        return report

    def activate(self, rid: str, reason: str | None = None, by: str | None = None) -> str | None:
        """Make a staged release the active one (the old active becomes PREVIOUS). Refuses an
        unknown, unstaged or damaged release, and (:class:`FairnessGateError`) one whose
        fairness audit has a four-fifths ratio below 0.8 unless ``reason`` says why it is
        activated anyway. The history line keeps ``by`` (default: the operator's login), the
        reason and the audit's lowest ratio. Returns the release that was active before."""
        check_release_id(rid)
        self.release(rid)  # validates: a release that cannot load is never made active
        if self.active() == rid:
            return rid
        reason = reason.strip() if reason else None
        fairness = self.audit(rid)
        failures = [(a, s, r) for a, s, r in fairness.failures() if r < FOUR_FIFTHS]
        if failures and not reason:
            worst = "; ".join(f"{a} x {s}: {r:.2f}" for a, s, r in failures[:5])
            raise FairnessGateError(
                f"release {rid} fails the four-fifths rule in {len(failures)} protected attribute x scenario "
                f"pair(s) ({worst}{'; ...' if len(failures) > 5 else ''}): below {FOUR_FIFTHS} on the synthetic city "
                f"of {fairness.citizens:,} (seed {fairness.seed}); its report is {self.path(rid) / 'fairness.html'}. "
                "Give a reason to activate it anyway (qjscore model activate RELEASE --reason TEXT): the history keeps it")
        with self._locked():
            current = self.active()
            if current == rid:
                return current
            if current is not None:
                self._set(PREVIOUS, current)
            self._set(ACTIVE, rid)
            self._log("activate", rid, current, by=by or operator_name(), reason=reason,
                      fairness={"min_ratio": fairness.min_ratio, "passed": not failures,
                                "failures": [{"attribute": a, "scenario": s, "ratio": r} for a, s, r in failures]})
        return current

    def restore(self) -> str:
        """Swap ACTIVE and PREVIOUS: the release served before the last switch comes back.
        Returns the now active release id."""
        with self._locked():
            current, prev = self.active(), self.previous()
            if prev is None:
                raise RegistryError(f"nothing to restore: {self.root / PREVIOUS} names no release")
            if prev == current:
                raise RegistryError(f"nothing to restore: the previous release {prev} is the active one")
            self.release(prev)  # still loads
            if current is not None:
                self._set(PREVIOUS, current)
            self._set(ACTIVE, prev)
            self._log("restore", prev, current, by=operator_name())
        return prev


# --- the running server ---------------------------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


#: Held for as long as a server runs on the data directory (and its forked workers live).
LOCK_FILE = "qjscore.lock"
_held: dict[Path, int] = {}  # data directories this process holds, with the lock file's fd


class DataDirInUse(RuntimeError):
    """Another server is running on this data directory."""


def lock_data_dir(data_dir: str | Path) -> int:
    """Take the data directory for this process's server, before anything else touches it:
    an exclusive flock on ``<data_dir>/qjscore.lock``, kept until the process (and every
    worker it forks, which shares the open file) ends. Taking it again in the same process is
    a no-op. DataDirInUse names the running server's pid."""
    path = Path(data_dir).resolve()
    if path in _held:
        return _held[path]
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = server_pid(path)
        raise DataDirInUse(f"a server is already running on {data_dir} (pid {pid if pid else 'unknown'}); "
                           "stop it first, or give this one another --data-dir") from None
    _held[path] = fd
    return fd


def write_pid_file(data_dir: str | Path) -> Path:
    """Record this process as the data directory's server: ``<data_dir>/qjscore.pid`` holds
    the pid and the process's start time (so a stale file never signals a reused pid)."""
    pid = os.getpid()
    path = Path(data_dir) / PID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, f"{pid} {_start_time(pid) or '-'}\n".encode())


def remove_pid_file(data_dir: str | Path) -> None:
    """Remove the pid file if it names this process (at shutdown)."""
    path = Path(data_dir) / PID_FILE
    with contextlib.suppress(OSError, ValueError, IndexError):
        if int(path.read_text().split()[0]) == os.getpid():
            path.unlink()


def server_pid(data_dir: str | Path) -> int | None:
    """The pid of the server running on ``data_dir``, or None (no pid file, or it names a
    process that is gone or is not the one that wrote it)."""
    try:
        parts = (Path(data_dir) / PID_FILE).read_text().split()
        pid = int(parts[0])
    except (OSError, ValueError, IndexError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, but another user's
    started = parts[1] if len(parts) > 1 else "-"
    now = _start_time(pid)
    if started != "-" and now is not None and now != started:
        return None  # the pid was reused by another process
    return pid


def wait_for_served(registry: ModelRegistry, after_seq: int, pid: int, timeout: float) -> dict | None:
    """The server's first acknowledgement newer than ``after_seq`` (:meth:`ModelRegistry.served`),
    or None if the server ``pid`` gave none within ``timeout`` seconds or is gone."""
    deadline = time.monotonic() + timeout
    while True:
        doc = registry.served()
        if doc is not None and doc["seq"] > after_seq and doc.get("pid") == pid:
            return doc
        if time.monotonic() >= deadline or server_pid(registry.data_dir) != pid:
            return None
        time.sleep(0.1)


def signal_server(data_dir: str | Path, sig: int = signal.SIGHUP) -> bool:
    """Tell the server running on ``data_dir`` to switch to the active release (SIGHUP).
    True if a live server was signalled."""
    pid = server_pid(data_dir)
    if pid is None:
        return False
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True

