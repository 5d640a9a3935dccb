"""The population batch on Dask (kernel/batch.py, server/export.py): partitions, the two
passes on a real dask.distributed cluster (a LocalCluster of worker processes, and a `dask
scheduler` with `dask worker`s started as separate processes), the same numbers as one
process to the bit, a worker killed mid-run, and parts that fail their check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clients.cli import main as cli
from conftest import ROOT, free_port
from kernel import batch
from kernel.batch import BatchError, BatchInputError
from kernel.calibrate import calibrate
from kernel.calibration import CalibrationTable
from kernel.score import Scorer
from kernel.spec import load_spec
from kernel.synthetic import generate_features, generate_partitions
from server.keys import load_keys
from server.models import ModelRegistry, score_population
from server.seed import seed_store
from server.store import open_store

N, K, SEED = 24_000, 6, 41

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def spec():
    return load_spec()


@pytest.fixture(scope="module")
def population(tmp_path_factory, spec):
    out = tmp_path_factory.mktemp("batch") / "pop"
    generate_partitions(spec, N, out, K, seed=SEED, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(spec):
    """The single-process result: the whole city in memory, calibrated and scored at once."""
    people, features = generate_features(spec, N, seed=SEED, progress=False)
    table = calibrate(spec, features, people.adult)
    return table, Scorer(spec, table).score(features, people.adult)


@pytest.fixture(scope="module")
def local(tmp_path_factory, spec, population):
    return batch.rescore_local(population, tmp_path_factory.mktemp("batch") / "local", spec)


def rows_of(ids) -> np.ndarray:
    return np.array([int(s[1:]) for s in ids.to_pylist()])


def assert_equals_reference(spec, out, reference):
    table, cols = reference
    doc, scores = batch.read_scores(out)
    rows = rows_of(scores.column("citizen_id"))
    assert sorted(rows.tolist()) == list(range(N))
    assert doc["calibration_version"] == table.calibration_version
    assert np.array_equal(CalibrationTable.load(Path(out) / "calibration.npz").counts, table.counts)
    for name in ("score", "level", "flags"):
        assert np.array_equal(scores.column(name).to_numpy(), getattr(cols, name)[rows]), name
    for name in ("raw", "percentile"):  # NaN for minors, in the same places
        assert np.array_equal(scores.column(name).to_numpy(), getattr(cols, name)[rows], equal_nan=True), name
    for d, dim in enumerate(spec.dimensions):
        assert np.array_equal(scores.column(f"points_{dim.name}").to_numpy(), cols.dimension_points[rows, d],
                              equal_nan=True)
    codes = np.array([v.reason.code for v in spec.variables] + [None], object)
    for r in range(4):
        assert scores.column(f"reason_{r + 1}").to_pylist() == codes[cols.reasons[rows, r]].tolist()


# --- partitions ---------------------------------------------------------------------------------


def test_the_partition_of_an_id_is_stable_and_the_same_vectorised_and_in_plain_python():
    ids = ["c00000000", "c00000001", "x", "a-much-longer.citizen:id_" + "9" * 30, "Z" * 64]
    vec = batch.partition_of_ids(ids, 200)
    assert vec.tolist() == [batch.partition_of_id(s, 200) for s in ids]
    # Pinned: a change of the function would silently re-partition every export.
    assert batch.partition_of_id("c00000000", 7) == 0 and batch.partition_of_id("c00000001", 7) == 3
    assert batch.partition_of_id("c12345678", 1000) == 445 and batch.partition_of_id("Z" * 64, 1000) == 172
    rng = np.random.default_rng(3)
    many = [f"c{n:08d}" for n in rng.integers(0, 10**8, 20_000)]
    counts = np.bincount(batch.partition_of_ids(many, 8), minlength=8)
    assert counts.min() > 0.9 * len(many) / 8  # spread evenly
    with pytest.raises(BatchError, match="longer than 64"):
        batch.partition_of_ids(["x" * 65], 4)


def test_generated_parts_hold_exactly_the_generated_city(spec, population):
    doc = batch.read_manifest(population)
    assert doc["rows"] == N and doc["partitions"] == K and doc["model_version"] == spec.model_version
    assert doc["variables"] == list(spec.variable_names) and doc["source"]["seed"] == SEED
    people, features = generate_features(spec, N, seed=SEED, progress=False)
    seen = 0
    for p, entry in enumerate(doc["parts"]):
        path = population / entry["file"]
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        part = batch.load_part(population, entry, spec)
        rows = rows_of(part.ids)
        assert (batch.partition_of_ids(part.ids.to_pylist(), K) == p).all()
        assert np.array_equal(part.features, features[rows]) and np.array_equal(part.adult, people.adult[rows])
        seen += len(rows)
    assert seen == N
    assert oct(population.stat().st_mode & 0o777) == "0o700"


# --- the same numbers ----------------------------------------------------------------------------


def test_single_process_equals_the_whole_city_scored_at_once(spec, local, reference):
    assert_equals_reference(spec, local.out, reference)


def test_dask_local_cluster_of_two_worker_processes_equals_one_process(spec, population, local, reference, tmp_path):
    progress = []
    result = batch.rescore(population, tmp_path / "dask", spec, workers=2, log=lambda line: None,
                           on_progress=lambda name, done, total: progress.append((name, done, total)))
    assert result.manifest["cluster"] == "LocalCluster of 2 worker processes"
    assert result.digests == local.digests
    assert result.calibration.calibration_version == local.calibration.calibration_version
    assert progress[-1] == ("score", K, K) and ("histogram", K, K) in progress
    assert_equals_reference(spec, tmp_path / "dask", reference)
    assert [p.name for p in tmp_path.iterdir()] == ["dask"]  # no partial directory left


def test_a_real_cluster_scheduler_and_workers_as_separate_processes(spec, population, local, tmp_path):
    """`dask scheduler` and `dask worker` on loopback, the job through the CLI."""
    port = free_port()
    dask = str(Path(sys.executable).with_name("dask"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        procs.append(subprocess.Popen([dask, "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "2", "--nthreads", "1",
                                       "--host", "127.0.0.1", "--no-dashboard"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path))
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        out = tmp_path / "scores"
        run = subprocess.run([sys.executable, "-m", "clients.cli", "batch", "rescore", "--input", str(population),
                              "--out", str(out), "--scheduler", f"tcp://127.0.0.1:{port}", "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        summary = json.loads(run.stdout)
        assert summary["cluster"] == f"scheduler tcp://127.0.0.1:{port}"
        assert summary["calibration_version"] == local.calibration.calibration_version
        doc = batch.read_manifest(out, batch.SCORES_FORMAT)
        assert [p["digest"] for p in doc["parts"]] == local.digests
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGINT)
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_worker_killed_mid_run_is_retried_and_the_result_is_still_exact(spec, population, local, tmp_path):
    from distributed import Client

    killed = []
    with batch.local_cluster(workers=2) as cluster, Client(cluster) as client:
        def kill_one(name, done, total):
            if killed or name != "histogram":
                return
            # A worker holding a finished histogram: its result is lost with it and must be
            # computed again before the calibration can be frozen.
            holders = [w for ws in client.who_has().values() for w in ws]
            if not holders:
                return
            pid = client.run(os.getpid, workers=[holders[0]])[holders[0]]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        result = batch.rescore(population, tmp_path / "scores", spec, client=client, log=lambda line: None,
                               on_progress=kill_one)
    assert killed, "no worker was killed: the test did not test anything"
    assert result.workers_lost >= 1 and result.manifest["workers_lost"] >= 1
    assert result.digests == local.digests
    assert result.calibration.calibration_version == local.calibration.calibration_version


# --- parts that fail their check -------------------------------------------------------------------


def copy_population(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def rewrite_part(pop: Path, index: int, change) -> str:
    """Rewrite part ``index`` through ``change(table) -> table`` and fix its manifest entry
    (a well-formed file whose contents are bad)."""
    doc = json.loads((pop / "manifest.json").read_text())
    entry = doc["parts"][index]
    path = pop / entry["file"]
    pq.write_table(change(pq.read_table(path)), path)
    entry["sha256"] = batch._sha256_file(path)
    entry["rows"] = pq.read_metadata(path).num_rows
    (pop / "manifest.json").write_text(json.dumps(doc))
    return entry["file"]


def set_value(table, column: str, row: int, value):
    values = table.column(column).to_pylist()
    values[row] = value
    i = table.schema.get_field_index(column)
    return table.set_column(i, table.schema.field(i).with_nullable(True), pa.array(values, table.schema.field(i).type))


@pytest.mark.parametrize("change, problem", [
    (lambda t: set_value(t, "court_listed_dishonest_debtor", 17, -1.0), "row 17 column court_listed_dishonest_debtor: -1.0 is not a finite non-negative number"),
    (lambda t: set_value(t, "traffic_violations", 5, float("nan")), "row 5 column traffic_violations: nan is not a finite"),
    (lambda t: set_value(t, "citizen_id", 3, None), "row 3 column citizen_id: is null"),
    (lambda t: set_value(t, "adult", 9, 2), "row 9 column adult: adult must be 0 or 1, got 2"),
    (lambda t: t.drop_columns(["residence_years"]), "no column 'residence_years'"),
    (lambda t: t.set_column(2, "residence_years", t.column(2).cast(pa.float64())), "column 'residence_years' is double, expected float"),
])
def test_a_bad_part_names_the_file_and_row_and_fails_the_job_writing_nothing(spec, population, tmp_path, change, problem):
    pop = copy_population(population, tmp_path / "pop")
    name = rewrite_part(pop, 2, change)
    with pytest.raises(BatchInputError) as err:
        batch.rescore_local(pop, tmp_path / "out", spec)
    assert str(err.value).startswith(f"{name}") and problem in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pop"]  # no output, no partial directory


def test_a_bad_part_fails_the_dask_job_with_its_name_and_leaves_nothing(spec, population, tmp_path, capsys):
    pop = copy_population(population, tmp_path / "pop")
    name = rewrite_part(pop, 4, lambda t: set_value(t, "traffic_violations", 11, -2.0))
    code = cli(["batch", "rescore", "--input", str(pop), "--out", str(tmp_path / "out"), "--workers", "2",
                "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"error: {name} row 11 column traffic_violations: -2.0 is not a finite non-negative number" in err
    assert "no result was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pop"]


def test_a_changed_or_missing_part_and_a_wrong_manifest_are_refused(spec, population, tmp_path):
    pop = copy_population(population, tmp_path / "pop")
    doc = batch.read_manifest(pop)
    path = pop / doc["parts"][1]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BatchInputError, match=f"{doc['parts'][1]['file']}: its SHA-256 does not match the manifest"):
        batch.rescore_local(pop, tmp_path / "out", spec)
    path.unlink()
    with pytest.raises(BatchInputError, match=f"{doc['parts'][1]['file']}: cannot read"):
        batch.rescore_local(pop, tmp_path / "out", spec)
    (pop / "manifest.json").write_text(json.dumps({**doc, "model_version": "1+000000000000"}))
    with pytest.raises(BatchError, match="derived for model 1\\+000000000000, not .*export again with --spec"):
        batch.rescore_local(pop, tmp_path / "out", spec)
    (pop / "manifest.json").write_text(json.dumps({**doc, "parts": [{**doc["parts"][0], "file": "../etc/passwd"}]}))
    with pytest.raises(BatchError, match="is not a part file name"):
        batch.rescore_local(pop, tmp_path / "out", spec)
    with pytest.raises(BatchError, match="no manifest"):
        batch.rescore_local(tmp_path, tmp_path / "out", spec)


def test_an_existing_output_is_refused_before_any_work_unless_overwrite(spec, population, local, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(BatchError, match="exists and is not empty"):
        batch.rescore_local(population, out, spec)
    assert (out / "keep").read_text() == "x"
    result = batch.rescore_local(population, out, spec, overwrite=True)
    assert result.digests == local.digests and not (out / "keep").exists()


# --- the store's population, and a batch calibration staged like any other --------------------------


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, spec):
    d = tmp_path_factory.mktemp("batch-store") / "data"
    d.mkdir()
    store = open_store(f"sqlite:///{d}/qianjiang.db")
    try:
        seed_store(store, spec, 3000, 9, load_keys(d))
    finally:
        store.close()
    return d


def test_export_gives_the_service_own_scores_and_calibration(spec, seeded, tmp_path, capsys):
    code = cli(["export", "--data-dir", str(seeded), "--out", str(tmp_path / "pop"), "--partitions", "3", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 3000 and summary["partitions"] == 3
    result = batch.rescore_local(tmp_path / "pop", tmp_path / "scores", spec)
    store = open_store(f"sqlite:///{seeded}/qianjiang.db")
    try:
        served = score_population(store, spec)  # what the service calibrates and serves at start
        ids = store.citizens().ids
    finally:
        store.close()
    assert result.calibration.calibration_version == served.calibration.calibration_version
    _, scores = batch.read_scores(tmp_path / "scores")
    row = {cid: i for i, cid in enumerate(ids)}
    rows = np.array([row[c] for c in scores.column("citizen_id").to_pylist()])
    assert np.array_equal(scores.column("score").to_numpy(), served.score[rows])
    assert np.array_equal(scores.column("level").to_numpy(), served.level[rows])
    doc = batch.read_manifest(tmp_path / "pop")
    assert doc["source"]["kind"] == "store" and "qianjiang.db" in doc["source"]["store"]


def test_a_batch_calibration_is_staged_like_any_other(spec, seeded, population, local, capsys):
    reg = ModelRegistry(seeded, audit_citizens=20_000)
    store = open_store(f"sqlite:///{seeded}/qianjiang.db")
    try:
        reg.bootstrap(spec, score_population(store, spec).calibration)
    finally:
        store.close()
    code = cli(["model", "stage", "--data-dir", str(seeded), "--calibration", str(local.out / "calibration.npz"),
                "--fairness-citizens", "20000", "--json"])
    assert code == 0
    staged = json.loads(capsys.readouterr().out)
    assert staged["release_id"] == f"{spec.model_version}~{local.calibration.calibration_version}"
    assert staged["report"]["psi_raw"] is not None


def test_export_and_batch_cli_refuse_bad_options(tmp_path, population, capsys):
    assert cli(["export", "--data-dir", str(tmp_path), "--out", str(tmp_path / "x"), "--partitions", "2"]) == 2
    assert "no store at" in capsys.readouterr().err
    assert cli(["batch", "rescore", "--input", str(population), "--out", str(tmp_path / "y"), "--local",
                "--workers", "2"]) == 2
    assert "--local runs in this process" in capsys.readouterr().err
    assert cli(["generate", "--citizens", "10", "--partitions", "2"]) == 2
    assert "give --out DIR" in capsys.readouterr().err


def test_outputs_are_private_and_their_parent_keeps_its_mode(spec, population, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    result = batch.rescore_local(population, shared / "scores", spec)
    assert oct(shared.stat().st_mode & 0o777) == "0o755"
    assert oct(result.out.stat().st_mode & 0o777) == "0o700"
    assert {oct(p.stat().st_mode & 0o777) for p in result.out.iterdir()} == {"0o600"}
