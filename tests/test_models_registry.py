"""The model registry (server/models.py) on a real SQLite store seeded with a small synthetic
city, and the `qjscore model` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from clients.cli import main as cli
from kernel.calibration import CalibrationError, CalibrationTable, RawHistogram
from kernel.spec import DEFAULT_SPEC_PATH, SpecError, load_spec
from server.app import seed_store
from server.keys import load_keys
from server.models import (
    RELEASE_ID_RE,
    ModelRegistry,
    RegistryError,
    StoreSnapshot,
    remove_pid_file,
    score_population,
    server_pid,
    signal_server,
    write_pid_file,
)
from server.files import write_atomic
from server.state import adults, today
from server.store import open_store

N_CITIZENS = 1500
#: The synthetic city of each release's fairness audit (the command's default is 400,000).
AUDIT_CITIZENS = 20_000


def variant(tmp_path: Path, old: str, new: str, name: str = "variant.toml") -> Path:
    """The default model's spec (kernel/models/v2.toml) with one piece of text changed."""
    text = DEFAULT_SPEC_PATH.read_text()
    assert text.count(old) == 1, old
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    return path


def prosocial_x3(tmp_path: Path) -> Path:
    return variant(tmp_path, "[dimensions.prosocial]\nweight = 0.15", "[dimensions.prosocial]\nweight = 0.45", "v1-prosocial.toml")


def half_calibration(pop, spec) -> CalibrationTable:
    """A table frozen from every other adult: a valid calibration unlike the store's own."""
    hist = RawHistogram.empty(spec)
    hist.add(pop.raw[pop.scored][::2])
    return hist.freeze()


def snapshot(root: Path) -> dict:
    """Every file under root (hidden ones too) with its bytes: to show nothing changed."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    store = open_store(f"sqlite:///{d}/qianjiang.db")
    try:
        seed_store(store, load_spec(), N_CITIZENS, 5, load_keys(d))
    finally:
        store.close()
    return d


@pytest.fixture
def store(data_dir):
    s = open_store(f"sqlite:///{data_dir}/qianjiang.db")
    yield s
    s.close()


@pytest.fixture
def registry(data_dir, store):
    """A registry whose first release (the default model, calibrated on the store) is active."""
    reg = ModelRegistry(data_dir, audit_citizens=AUDIT_CITIZENS)
    spec = load_spec()
    reg.bootstrap(spec, score_population(store, spec).calibration)
    return reg


# --- scoring a population ------------------------------------------------------------------------


def test_score_population_matches_the_server_start(tmp_path):
    """The registry calibrates and scores exactly as Runtime.load does at first start."""
    from server.app import Runtime, ServerConfig

    config = ServerConfig(data_dir=tmp_path, seed_citizens=N_CITIZENS, seed=5, metrics_port=0, port=0, audit=False)
    runtime = Runtime.prepare(config)
    runtime.load()
    n = runtime.state.n_citizens
    store = open_store(config.resolved_store_url)
    try:
        pop = score_population(store, runtime.spec)
    finally:
        store.close()
    assert pop.calibration.calibration_version == runtime.calibration().calibration_version
    assert (pop.score == runtime.state.columns.score[:n]).all()
    assert (pop.level == runtime.state.columns.level[:n]).all()
    assert (pop.adult == runtime.state.adult[:n]).all()
    np.testing.assert_array_equal(pop.raw, runtime.state.columns.raw[:n])

    # the first start registered what it served as the active release
    reg = ModelRegistry(tmp_path)
    rid = f"{runtime.spec.model_version}~{pop.calibration.calibration_version}"
    assert reg.active() == rid == runtime.release
    assert reg.adopt_legacy() == rid


def test_a_data_directory_from_before_the_registry_is_adopted(tmp_path):
    """A data directory that only has the legacy calibration-<model>.npz: its table becomes
    the first release, and the server serves it."""
    import shutil

    from server.app import Runtime, ServerConfig

    config = ServerConfig(data_dir=tmp_path, seed_citizens=N_CITIZENS, seed=5, metrics_port=0, port=0, audit=False)
    runtime = Runtime.prepare(config)
    runtime.load()
    rid = runtime.release
    legacy = tmp_path / f"calibration-{runtime.spec.model_version}.npz"
    assert legacy.exists()
    shutil.rmtree(tmp_path / "models")
    again = Runtime.prepare(config)
    assert again.release == rid == ModelRegistry(tmp_path).active()


def test_score_population_with_a_given_calibration_and_a_snapshot(store):
    spec = load_spec()
    first = score_population(store, spec)
    snap = StoreSnapshot(store)
    again = score_population(snap, spec, first.calibration)
    assert again.calibration is first.calibration
    assert (again.score == first.score).all()
    n_adults = int(adults(store.citizens().birth_day, today()).sum())
    assert int(first.scored.sum()) == n_adults == first.calibration.total
    assert set(np.unique(first.level[first.scored])) <= set(range(5))
    assert (first.score[first.adult == 0] == -1).all()


# --- bootstrap, stage ---------------------------------------------------------------------------------


def test_bootstrap_registers_a_first_release_once(registry, store):
    rid = registry.active()
    assert RELEASE_ID_RE.match(rid) and registry.previous() is None
    spec, table = registry.release(rid)
    assert rid == f"{spec.model_version}~{table.calibration_version}"
    assert (registry.path(rid) / "spec.toml").read_bytes() == DEFAULT_SPEC_PATH.read_bytes()
    assert registry.releases() == [rid]
    assert [h["action"] for h in registry.history()] == ["bootstrap"]
    # once something is active, bootstrap changes nothing
    before = snapshot(registry.root)
    other = half_calibration(score_population(store, spec), spec)
    assert registry.bootstrap(spec, other) == rid
    assert snapshot(registry.root) == before


def test_stage_a_valid_variant(registry, store, tmp_path):
    old = registry.active()
    path = prosocial_x3(tmp_path)
    rid, report = registry.stage(path, store=store)

    assert RELEASE_ID_RE.match(rid) and rid != old
    assert rid.split("~")[0] == load_spec(path).model_version
    assert registry.active() == old and registry.previous() is None  # staging does not activate
    assert set(registry.releases()) == {old, rid}
    assert (registry.path(rid) / "spec.toml").read_bytes() == path.read_bytes()
    table = registry.release(rid)[1]
    assert table.total == int(adults(store.citizens().birth_day, today()).sum())

    n_adults = table.total
    assert (report.old_release, report.new_release, report.n_adults) == (old, rid, n_adults)
    assert report.migration.shape == (5, 5) and report.migration.sum() == n_adults
    assert report.psi_raw > 0.1 and 0 <= report.psi_score < 0.1
    assert 0 < report.changed_share < 0.5 and report.n_up + report.n_down > 0
    assert abs(report.mean_score_change) < 5 and report.mean_abs_score_change > 0
    info = registry.info(rid)
    assert info["report"] == json.loads(json.dumps(report.to_dict()))
    assert info["origin"] == "stage" and "frozen from" in info["calibration"]

    # staging the same spec again is the same release (same population, same calibration)
    assert registry.stage(path, store=store)[0] == rid
    assert set(registry.releases()) == {old, rid}


def test_stage_without_a_spec_recalibrates_the_active_one(registry, store):
    rid, report = registry.stage(store=store)
    assert rid == registry.active()  # same population: the same table
    assert report.psi_raw == 0.0 and report.changed_share == 0.0
    assert (report.migration == np.diag(np.diag(report.migration))).all()


def test_stage_with_a_given_calibration(registry, store, tmp_path):
    path = prosocial_x3(tmp_path)
    spec = load_spec(path)
    table = half_calibration(score_population(store, spec), spec)
    table.save(tmp_path / "cal.npz")
    rid, _ = registry.stage(path, tmp_path / "cal.npz", store=store)
    assert rid == f"{spec.model_version}~{table.calibration_version}"
    assert registry.release(rid)[1].calibration_version == table.calibration_version
    assert registry.info(rid)["calibration"] == str(tmp_path / "cal.npz")


@pytest.mark.parametrize("edit, problem", [
    (("[dimensions.identity]\nweight = 0.15", "[dimensions.identity]\nweight = -0.15"), "dimensions.identity.weight: must be > 0"),
    (("hard_rule_cap = 549", "hard_rule_cap = 700"), "model.hard_rule_cap"),
    (("[model]", "[model"), "not valid TOML"),
])
def test_an_invalid_spec_is_rejected_and_the_registry_is_unchanged(registry, store, tmp_path, edit, problem):
    before = snapshot(registry.root)
    with pytest.raises(SpecError, match=problem.replace(".", r"\.").replace("[", r"\[")):
        registry.stage(variant(tmp_path, *edit), store=store)
    with pytest.raises(SpecError, match="cannot read"):
        registry.stage(tmp_path / "missing.toml", store=store)
    assert snapshot(registry.root) == before


def test_a_calibration_of_another_model_is_rejected(registry, store, tmp_path):
    before = snapshot(registry.root)
    v1_table = registry.path(registry.active()) / "calibration.npz"
    with pytest.raises(CalibrationError, match="was built for model"):
        registry.stage(prosocial_x3(tmp_path), v1_table, store=store)
    (tmp_path / "junk.npz").write_bytes(b"not a table")
    with pytest.raises(CalibrationError, match="junk.npz: not a calibration table"):
        registry.stage(None, tmp_path / "junk.npz", store=store)
    assert snapshot(registry.root) == before


def test_a_failed_write_leaves_no_release_behind(registry, store, tmp_path, monkeypatch):
    before = snapshot(registry.root)

    def broken(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CalibrationTable, "save", broken)
    with pytest.raises(OSError, match="No space"):
        registry.stage(prosocial_x3(tmp_path), store=store)
    assert snapshot(registry.root) == before
    assert not [p for p in registry.root.iterdir() if p.name.startswith(".stage-")]


# --- activate, restore -----------------------------------------------------------------------------


def test_activate_and_restore(registry, store, tmp_path):
    v1 = registry.active()
    v2, _ = registry.stage(prosocial_x3(tmp_path), store=store)

    assert registry.activate(v2) == v1
    assert (registry.active(), registry.previous()) == (v2, v1)
    assert registry.activate(v2) == v2  # already active: PREVIOUS stays
    assert (registry.active(), registry.previous()) == (v2, v1)

    assert registry.restore() == v1
    assert (registry.active(), registry.previous()) == (v1, v2)
    assert registry.restore() == v2  # restore twice: back again
    assert (registry.active(), registry.previous()) == (v2, v1)
    assert [h["action"] for h in registry.history()] == ["bootstrap", "activate", "restore", "restore"]
    assert registry.history(1)[0] == {**registry.history(1)[0], "active": v2, "previous": v1}

    # a report staged now compares with the active release
    rid, report = registry.stage(store=store)
    assert report.old_release == v2 == rid


def test_activate_refuses_unknown_malformed_or_damaged_releases(registry, store, tmp_path):
    v1 = registry.active()
    before = snapshot(registry.root)
    unknown = v1.split("~")[0] + "~cal-000000000000"
    with pytest.raises(RegistryError, match="not staged"):
        registry.activate(unknown)
    for bad in ("../../etc", "latest", v1 + "/", ""):
        with pytest.raises(RegistryError, match="is not a release id"):
            registry.activate(bad)
    with pytest.raises(RegistryError, match="nothing to restore"):
        registry.restore()
    assert snapshot(registry.root) == before

    v2, _ = registry.stage(prosocial_x3(tmp_path), store=store)
    spec_file = registry.path(v2) / "spec.toml"
    spec_file.write_text(DEFAULT_SPEC_PATH.read_text())  # someone swapped the spec in place
    with pytest.raises(CalibrationError, match="was built for model"):
        registry.activate(v2)
    for name in ("spec.toml", "calibration.npz"):  # ... or the whole release
        (registry.path(v2) / name).write_bytes((registry.path(v1) / name).read_bytes())
    with pytest.raises(RegistryError, match="the directory was altered"):
        registry.activate(v2)
    spec_file.write_text(spec_file.read_text().replace("hard_rule_cap = 549", "hard_rule_cap = 700"))
    with pytest.raises(SpecError, match="model.hard_rule_cap"):
        registry.activate(v2)
    assert registry.active() == v1


def test_a_damaged_pointer_is_reported(registry):
    (registry.root / "ACTIVE").write_text("../../secrets\n")
    with pytest.raises(RegistryError, match="ACTIVE: '../../secrets' is not a release id"):
        registry.active()


# --- atomicity ----------------------------------------------------------------------------------------


def test_active_is_replaced_by_rename_never_rewritten_in_place(registry, store, tmp_path, monkeypatch):
    v1 = registry.active()
    v2, _ = registry.stage(prosocial_x3(tmp_path), store=store)
    active_file = registry.root / "ACTIVE"
    inode = active_file.stat().st_ino
    registry.activate(v2)
    assert active_file.stat().st_ino != inode  # a new file renamed over the old one
    assert active_file.read_text() == f"{v2}\n"

    # a crash before the rename leaves the old content and no temporary file
    def crash(src, dst):
        raise OSError(5, "Input/output error")

    registry.audit(v1)  # the first release has no fairness audit: made now, so the crash below hits ACTIVE
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        registry.activate(v1)
    monkeypatch.undo()
    assert registry.active() == v2
    assert not [p.name for p in registry.root.iterdir() if p.name.endswith(".tmp")]


def test_readers_never_see_a_missing_or_partial_active_file(registry, store, tmp_path):
    v1 = registry.active()
    v2, _ = registry.stage(prosocial_x3(tmp_path), store=store)
    registry.activate(v2)
    seen, stop = set(), threading.Event()

    def read():
        while not stop.is_set():
            try:
                seen.add((registry.root / "ACTIVE").read_text())
            except FileNotFoundError:
                seen.add("<missing>")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(30):
            registry.restore()
    finally:
        stop.set()
        reader.join()
    assert seen <= {f"{v1}\n", f"{v2}\n"} and seen
    assert registry.active() == v2  # an even number of swaps


def test_write_atomic(tmp_path):
    target = tmp_path / "f"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["f"]


# --- the running server: pid file and SIGHUP ---------------------------------------------------------


@pytest.fixture
def hangups():
    got = []
    old = signal.signal(signal.SIGHUP, lambda signum, frame: got.append(signum))
    yield got
    signal.signal(signal.SIGHUP, old)


def test_pid_file_and_signal(tmp_path, hangups):
    assert server_pid(tmp_path) is None and signal_server(tmp_path) is False
    write_pid_file(tmp_path)
    assert server_pid(tmp_path) == os.getpid()
    assert signal_server(tmp_path) is True
    assert hangups == [signal.SIGHUP]

    # a stale file: that process is gone
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "qjscore.pid").write_text(f"{gone.pid} -\n")
    assert server_pid(tmp_path) is None and signal_server(tmp_path) is False
    # a reused pid: alive, but not the process that wrote the file
    (tmp_path / "qjscore.pid").write_text(f"{os.getpid()} 1\n")
    assert server_pid(tmp_path) is None and signal_server(tmp_path) is False
    (tmp_path / "qjscore.pid").write_text("garbage\n")
    assert server_pid(tmp_path) is None
    assert hangups == [signal.SIGHUP]

    write_pid_file(tmp_path)
    remove_pid_file(tmp_path)
    assert not (tmp_path / "qjscore.pid").exists()


# --- qjscore model ---------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_stage_activate_restore_status(data_dir, tmp_path, capsys, hangups):
    d = ["--data-dir", str(data_dir)]
    audit = ["--fairness-citizens", str(AUDIT_CITIZENS)]
    code, out, _ = run_cli(capsys, "model", "status", *d)
    assert code == 0 and "none yet" in out

    # first stage of v1 itself: nothing is active, so no comparison
    code, out, _ = run_cli(capsys, "model", "stage", str(DEFAULT_SPEC_PATH), *d, *audit, "--json")
    first = json.loads(out)
    assert code == 0 and first["report"] is None and first["active"] is None
    v1 = first["release_id"]
    code, out, _ = run_cli(capsys, "model", "activate", v1, *d, *audit)
    assert code == 0 and f"activated {v1}" in out and "no running server" in out

    code, out, _ = run_cli(capsys, "model", "stage", str(prosocial_x3(tmp_path)), *d, *audit)
    assert code == 0 and "PSI raw" in out and "level migration" in out and "信用良好" in out
    v2 = out.split()[1]
    assert RELEASE_ID_RE.match(v2) and f"qjscore model activate {v2}" in out
    code, out, _ = run_cli(capsys, "model", "stage", str(prosocial_x3(tmp_path)), *d, *audit, "--json")
    staged = json.loads(out)
    assert staged["release_id"] == v2 and staged["report"]["old_release"] == v1
    assert sum(map(sum, staged["report"]["migration"])) == staged["report"]["n_adults"] > 0

    write_pid_file(data_dir)  # "the server" is this process: it acknowledges what the registry says on SIGHUP
    registry = ModelRegistry(data_dir)
    acks = [lambda: registry.record_served(registry.active(), registry.active(), "switched")]
    signal.signal(signal.SIGHUP, lambda signum, frame: (hangups.append(signum), acks[-1]()))
    code, out, _ = run_cli(capsys, "model", "activate", v2, *d, *audit, "--json")
    got = json.loads(out)
    assert code == 0 and (got["active"], got["previous"], got["server_pid"], got["serving"]) == (v2, v1, os.getpid(), v2)
    assert hangups == [signal.SIGHUP]

    code, out, _ = run_cli(capsys, "model", "status", *d, "--json")
    status = json.loads(out)
    assert (status["active"], status["previous"], status["server_pid"]) == (v2, v1, os.getpid())
    assert {r["release_id"]: r["state"] for r in status["releases"]} == {v1: "previous", v2: "active"}
    assert [h["action"] for h in status["history"]] == ["activate", "activate"]
    code, out, _ = run_cli(capsys, "model", "status", *d)
    assert v1 in out and v2 in out and "active" in out and f"pid {os.getpid()}, serving {v2}" in out

    # a server that refuses the switch (it keeps v2): never reported as done
    acks.append(lambda: registry.record_served(v2, registry.active(), "rejected", "calibration.npz: the directory was altered"))
    code, out, _ = run_cli(capsys, "model", "restore", *d)
    assert code == 1 and f"restored {v1}" in out and "NOT SWITCHED" in out and "directory was altered" in out
    assert f"still serves {v2}" in out
    code, out, _ = run_cli(capsys, "model", "status", *d)
    assert f"serving {v2} -- NOT the active release" in out
    # a server that does not answer at all
    acks.append(lambda: None)
    code, out, _ = run_cli(capsys, "model", "activate", v2, *d, *audit, "--wait", "0.3")
    assert code == 1 and "NOT CONFIRMED" in out and "did not acknowledge within 0.3 s" in out
    assert hangups == [signal.SIGHUP] * 3
    remove_pid_file(data_dir)


def test_cli_reports_errors_in_one_line(data_dir, tmp_path, capsys):
    d = ["--data-dir", str(data_dir)]
    bad = variant(tmp_path, "[dimensions.identity]\nweight = 0.15", "[dimensions.identity]\nweight = 0")
    code, out, err = run_cli(capsys, "model", "stage", str(bad), *d)
    assert code == 2 and err.startswith("error: dimensions.identity.weight: must be > 0") and not out
    code, _, err = run_cli(capsys, "model", "restore", *d)
    assert code == 2 and "nothing to restore" in err
    code, _, err = run_cli(capsys, "model", "activate", "nope", *d)
    assert code == 2 and "'nope' is not a release id" in err
    assert not (data_dir / "models" / "ACTIVE").exists()
    code, out, err = run_cli(capsys, "model", "stage", str(DEFAULT_SPEC_PATH), "--data-dir", str(tmp_path / "empty"))
    assert code == 2 and err.startswith("error: no store at") and not out
