"""How a server starts for an operator: no synthetic people unless asked, the production
stance, an empty store that serves an empty city and says so, the model's reference
calibration when there is nobody to calibrate on, and the city's calendar.

Through the real command (``qjscore serve`` as a subprocess) where the start itself is
what is tested, in-process otherwise."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from clients.client import QianjiangClient, QianjiangError
from conftest import ROOT, ServeProcess
from kernel.calibration import REFERENCE_CITIZENS, REFERENCE_SEED, reference_path, reference_table
from kernel.spec import load_spec
from qianjiang.v1 import eligibility_pb2
from server import tls
from server.city_time import city_zone, day_in
from server.end_user import key_dir, load_public_keys
from server.models import ModelRegistry
from server.state import iso_of

CARD = bytes.fromhex("5a" * 16)


def test_serve_seeds_nobody_unless_asked_and_an_empty_store_serves_an_empty_city(tmp_path):
    data = tmp_path / "data"
    server = ServeProcess(tmp_path, "--data-dir", str(data))
    try:
        with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
            server.wait_serving(qj)
            assert qj.check("campus_fitness", CARD).outcome == eligibility_pb2.UNKNOWN_CARD
            with pytest.raises(QianjiangError) as err:
                qj.get_score("c00000000")
            assert err.value.reason == "UNKNOWN_CITIZEN"
            # a person added later is scored with the model's reference calibration, not one of
            # synthetic people in the store (there are none)
            qj.upsert_citizen("p-1", "1990-05-01")
            qj.register_card("p-1", CARD)
            qj.grant_consent("p-1")
            score = qj.get_score("p-1")
            assert score.calibration_version == reference_table(load_spec()).calibration_version
            assert qj.check("campus_fitness", CARD).outcome != eligibility_pb2.UNKNOWN_CARD
    finally:
        assert server.stop() == 0
    out = server.output
    assert "has no citizens: serving an empty city" in out and "The store has no citizens" in out
    assert "--seed-citizens N seeds a synthetic" in out  # development: says how to get one
    assert "reference calibration" in out and "seeding" not in out
    with sqlite3.connect(data / "qianjiang.db") as db:
        assert db.execute("SELECT count(*) FROM citizens").fetchone() == (1,)  # only the one added
        assert db.execute("SELECT count(*) FROM records").fetchone() == (0,)
    assert ModelRegistry(data).active().endswith(reference_table(load_spec()).calibration_version)


def test_seeding_when_asked_logs_its_progress(tmp_path):
    server = ServeProcess(tmp_path, "--data-dir", str(tmp_path / "data"), "--seed-citizens", "400")
    try:
        with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
            server.wait_serving(qj)
            assert qj.check("campus_fitness", CARD).outcome == eligibility_pb2.UNKNOWN_CARD
    finally:
        server.stop()
    out = server.output
    assert "with a synthetic city of 400 people (development: --seed-citizens): generating" in out
    assert "seeding: writing 400 citizens" in out and "seeding: 400 of 400 people and" in out
    assert "seeded 400 citizens" in out and "calibrated model" in out and "reference calibration" not in out


@pytest.mark.parametrize("argv, message", [
    (["--production", "--seed-citizens", "50"], "--production never seeds a synthetic city: drop --seed-citizens 50"),
    (["--production"], "--production serves with mutual TLS (--security mtls --certs DIR), not --security insecure"),
    (["--city-timezone", "Mars/Olympus_Mons"], "city time zone 'Mars/Olympus_Mons': not an IANA time zone name"),
])
def test_what_the_production_stance_and_the_city_zone_refuse(tmp_path, argv, message):
    data = tmp_path / "data"
    out = subprocess.run([sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data), "--port", "0",
                          "--metrics-port", "0", *argv], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip() == f"error: {message}" or message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not (data / "qianjiang.db").exists()


def test_an_empty_production_store_on_postgresql_serves_an_empty_city_over_mtls(tmp_path, pg_url):
    certs = tmp_path / "certs"
    assert tls.main(["--out", str(certs), "--caller", "citizen_card_company", "--caller", "citizen_app",
                     "--caller", "campus_fitness_app"]) == 0
    argv = ["--production", "--store", pg_url, "--data-dir", str(tmp_path / "data"), "--security", "mtls",
            "--certs", str(certs)]
    # production never makes a citizen app's end-user key: the operator installs the app's public key
    out = subprocess.run([sys.executable, "-m", "clients.cli", "serve", "--port", "0", "--metrics-port", "0", *argv],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "end_user/citizen_app.pub: the Ed25519 public key" in out.stderr, out.stderr
    app_key = tmp_path / "citizen_app_end_user.key"  # the app's own, outside the service's data
    load_public_keys(tmp_path / "app", ["citizen_app"], create=True)
    (key_dir(tmp_path / "app") / "citizen_app.key").rename(app_key)
    key_dir(tmp_path / "data").mkdir(parents=True)
    (key_dir(tmp_path / "app") / "citizen_app.pub").rename(key_dir(tmp_path / "data") / "citizen_app.pub")
    # nor the offline gates' signing key (server/gate_snapshot.py): the operator installs it
    from server.gate_snapshot import load_signing_key

    load_signing_key(tmp_path / "data", create=True)
    server = ServeProcess(tmp_path, *argv)
    target = f"127.0.0.1:{server.port}"
    try:
        with QianjiangClient(target, timeout=5, cert_dir=certs, caller="citizen_card_company") as source, \
                QianjiangClient(target, timeout=5, cert_dir=certs, caller="citizen_app", end_user_key=app_key) as app, \
                QianjiangClient(target, timeout=5, cert_dir=certs, caller="campus_fitness_app") as gym:
            server.wait_serving(gym)
            assert gym.check("campus_fitness", CARD).outcome == eligibility_pb2.UNKNOWN_CARD
            source.upsert_citizen("p-7", "1985-01-31")
            source.register_card("p-7", CARD)
            app.grant_consent("p-7")
            assert app.get_score("p-7").citizen_id == "p-7"  # bound to p-7 by the app's signature
            assert gym.check("campus_fitness", CARD).outcome in (eligibility_pb2.ALLOW, eligibility_pb2.DENY_BELOW_THRESHOLD)
    finally:
        assert server.stop() == 0
    out = server.output
    assert "has no citizens: serving an empty city" in out and "The store has no citizens" in out
    assert "--seed-citizens" not in out  # production: no hint at synthetic people
    assert "password" not in out


@pytest.mark.parametrize("model", ["v1", "v2"])
def test_the_reference_calibration_is_reproducible_and_fits_the_model(model):
    """scripts/gen_reference_calibration.sh: the same population gives the same table, bit for
    bit, for every shipped model; a spec change without regenerating it fails here, naming
    the script. The default model is version 2."""
    import numpy as np

    from kernel.calibrate import calibrate
    from kernel.spec import DEFAULT_SPEC_PATH
    from kernel.synthetic import generate_features

    path = DEFAULT_SPEC_PATH.with_name(f"{model}.toml")
    spec = load_spec(path)
    shipped = reference_table(spec, path)
    people, features = generate_features(spec, REFERENCE_CITIZENS, seed=REFERENCE_SEED)
    again = calibrate(spec, features, people.adult, n_threads=2)
    assert again.calibration_version == shipped.calibration_version
    assert np.array_equal(again.counts, shipped.counts) and (again.raw_min, again.raw_max) == (shipped.raw_min, shipped.raw_max)
    assert reference_path(path).name == f"{model}.calibration.npz"
    assert reference_path().name == "v2.calibration.npz" and load_spec().version == 2


# --- the city's calendar ---------------------------------------------------------------------


def _zone_off_utc() -> tuple[str, int]:
    """A zone whose calendar day differs from UTC's right now, and that difference in days."""
    now = dt.datetime.now(dt.timezone.utc)
    for name in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11: one differs at any hour
        diff = day_in(city_zone(name), now) - day_in(city_zone("UTC"), now)
        if diff:
            return name, diff
    raise AssertionError("no zone differs from UTC")


def test_ages_and_the_scoring_day_are_days_in_the_city_zone_not_the_hosts(tmp_path):
    """The host runs on UTC; the city is a day ahead of it or behind. A person whose 18th
    birthday is the city's today (ahead) or the host's today (behind) is an adult exactly when
    the city's calendar says so."""
    from prometheus_client import CollectorRegistry

    from server.app import Node, Runtime, ServerConfig
    from server.metrics import Metrics

    zone, diff = _zone_off_utc()
    config = ServerConfig(data_dir=tmp_path / "data", seed_citizens=50, metrics_port=0, port=0, city_timezone=zone)
    runtime = Runtime.prepare(config)
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    runtime.load()
    node.attach()
    try:
        with QianjiangClient(f"127.0.0.1:{node.port}", timeout=5) as qj:
            city_today = dt.datetime.now(ZoneInfo(zone)).date()
            later = max(city_today, dt.datetime.now(dt.timezone.utc).date())
            qj.upsert_citizen("turns-18", later.replace(year=later.year - 18).isoformat())
            qj.grant_consent("turns-18")
            score = qj.get_score("c00000003")
            assert score.as_of_date == city_today.isoformat() == iso_of(runtime.state.as_of_day)
            if diff > 0:  # the city is ahead: 18 today in the city, not yet on the host's day
                assert qj.get_score("turns-18").score > 0
            else:  # the city is behind: 18 on the host's day, not yet in the city
                with pytest.raises(QianjiangError) as err:
                    qj.get_score("turns-18")
                assert err.value.reason == "UNDER_18"
    finally:
        node.drain(0)


def test_a_record_dated_after_today_does_not_stop_the_start_and_counts_from_its_day(tmp_path):
    """A stored record dated after the server's today (a host clock set back, a source in
    another zone) used to make the whole-population load raise."""
    from server.store import RecordIn, open_store

    data = tmp_path / "data"

    def features(*serve_args: str) -> tuple[dict, str]:
        server = ServeProcess(tmp_path, "--data-dir", str(data), *serve_args)
        try:
            with QianjiangClient(f"127.0.0.1:{server.port}", timeout=5) as qj:
                server.wait_serving(qj)
                return {v.variable: v.feature for v in qj.explain("c00000005").variables}, server.output
        finally:
            assert server.stop() == 0

    before, _ = features("--seed-citizens", "200")
    in_a_month = day_in(city_zone("Asia/Shanghai"), dt.datetime.now(dt.timezone.utc)) + 30
    with open_store(f"sqlite:///{data / 'qianjiang.db'}") as store:
        store.add_records([RecordIn("future-1", "c00000005", "tax_arrears", in_a_month, 1.0, "tax_bureau")], "tax_bureau")
    (data / "snapshot" / "state.qjsnap").unlink()  # the whole-population load is the one that raised
    after, output = features()
    assert after == before  # not in effect yet
    assert "1 stored records are dated after today" in output


# --- set-up ----------------------------------------------------------------------------------


def test_the_command_is_installed_quietly_and_runs_from_anywhere(tmp_path):
    """`make build` installs qjscore with scripts/install_command.py: no pip build, no
    setuptools warning box, idempotent; the launcher works from any directory."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "install_command.py")], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout == out.stderr == ""
    launcher = Path(sys.executable).with_name("qjscore")
    assert launcher.read_text().startswith(f"#!{sys.executable}\n")
    got = subprocess.run([str(launcher), "scenarios", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert got.returncode == 0 and "usage: qjscore scenarios" in got.stdout, got.stderr
    assert "pip install" not in (ROOT / "Makefile").read_text().split("$(VENV)/bin/qjscore:")[1].split("\n\n")[0]
