"""The qjscore command line (clients/cli.py), run as a real subprocess against real servers:
a user's mistake is one clear line and an exit status, never a traceback; ingest --file
answers every line; the gateways' batch and stream calls; and an explanation that adds up.

Citizens this file changes: rows 2900-2999 of the session's ``served`` city (no other test
uses them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: A port nothing listens on (the kernel does not hand out port 1 to a test's server).
NOBODY = "127.0.0.1:1"


def qj(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """``qjscore ARGS`` in a child process; its output and exit status."""
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          input=input, timeout=60, env=os.environ)


def qj_all(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """Several qjscore runs at once (each is a Python start-up)."""
    with ThreadPoolExecutor(len(argvs)) as pool:
        return list(pool.map(lambda argv: qj(*argv), argvs))


def refused(out: subprocess.CompletedProcess, says: str, status: int = 2) -> None:
    """The run failed with ``status`` and said ``says`` on stderr, with no traceback."""
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == status, (out.returncode, out.stdout, out.stderr)
    assert says in out.stderr, out.stderr


def json_lines(out: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in out.stdout.splitlines()]


def adult_rows(served, rows) -> list[int]:
    """Consenting adults among ``rows``."""
    s = served.runtime.state
    return [r for r in rows if s.consent[r] and s.adult[r]]


# --- explain adds up ------------------------------------------------------------------------


def test_explain_adds_up_by_hand(served):
    """A dimension's points are its variables' weighted points summed, raw points the
    dimensions' summed, and a reason's points lost is its variable's."""
    row = next(r for r in adult_rows(served, range(200)) if (served.runtime.state.columns.reasons[r] >= 0).sum() >= 2)
    table_out, json_out = qj_all(["explain", served.citizen(row), "--target", served.target],
                                 ["explain", served.citizen(row), "--target", served.target, "--json"])
    assert json_out.returncode == 0, json_out.stderr
    e = json.loads(json_out.stdout)
    score, variables = e["score"], e["variables"]
    assert len(score["reasons"]) >= 2
    for d in score["dimensions"]:
        mine = [v for v in variables if v["dimension"] == d["dimension"]]
        assert mine and d["weight"] > 0 and all(v["weight"] == d["weight"] for v in mine)
        assert sum(v["weighted_points"] for v in mine) == pytest.approx(d["points"], abs=1e-9)
    assert sum(d["points"] for d in score["dimensions"]) == pytest.approx(score["raw_points"], abs=1e-9)
    for v in variables:
        assert v["weighted_points"] == pytest.approx(v["weight"] * v["points"], abs=1e-12)
        assert v["points_lost"] == pytest.approx(v["weight"] * (v["best_points"] - v["points"]), abs=1e-12)
    lost = {v["variable"]: v["points_lost"] for v in variables}
    for r in score["reasons"]:
        assert r["points_lost"] == pytest.approx(lost[r["variable"]], abs=1e-12)
        assert r["points_lost"] > 0
    assert table_out.returncode == 0, table_out.stderr
    assert re.search(r"variable\s+dimension\s+weight\s+feature\s+points\s+weighted\s+best\s+lost\n", table_out.stdout)
    assert re.search(r"dimension\s+维度\s+weight\s+points\n", table_out.stdout)


# --- ingest --file: every line's result -----------------------------------------------------


def test_ingest_file_reports_every_line_and_goes_on_past_bad_ones(served, tmp_path):
    cid, other = served.citizen(2900), served.citizen(2901)
    tag = uuid.uuid4().hex[:8]

    def rec(rid, **kw):
        return json.dumps({"record_id": f"{tag}-{rid}", "citizen_id": cid, "variable": "volunteer_hours",
                           "date": "2024-03-01", "value": 2, **kw})

    lines = [
        rec("a"),                                       # 1 ACCEPTED
        rec("a"),                                       # 2 DUPLICATE
        "{not json",                                    # 3 local: not JSON
        rec("b", foo=1),                                # 4 local: unknown field
        json.dumps({"record_id": f"{tag}-c", "citizen_id": cid, "variable": "volunteer_hours"}),  # 5 missing date
        rec("d", value="many"),                         # 6 local: wrong type
        "",                                             # 7 blank: skipped
        rec("e", date="2999-01-01"),                    # 8 server: INVALID_ARGUMENT, the stream ends
        rec("f", citizen_id="c99999999"),               # 9 server: NOT_FOUND, the stream ends
        rec("g", citizen_id=other),                     # 10 ACCEPTED on a new stream
        rec("h", date="2024-02-30"),                    # 11 local: no such day
    ]
    f = tmp_path / "records.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = qj("ingest", "--file", str(f), "--json", "--target", served.target)
    refused(out, "7 of 10 records failed (lines 3, 4, 5, 6, 8, 9, 11)", status=1)
    results = {r["line"]: r for r in json_lines(out)}
    assert sorted(results) == [1, 2, 3, 4, 5, 6, 8, 9, 10, 11]
    assert [results[n]["status"] for n in (1, 2, 10)] == ["ACCEPTED", "DUPLICATE", "ACCEPTED"]
    assert results[10]["record_id"] == f"{tag}-g" and results[10]["ack"]["version"] == 1
    assert results[3]["status"] == "INVALID" and results[3]["detail"].startswith("not JSON")
    assert results[4]["detail"].startswith("unknown field 'foo'") and results[4]["record_id"] == f"{tag}-b"
    assert results[5]["detail"] == "missing field 'date'"
    assert results[6]["detail"] == 'field \'value\': expected a number, got "many"'
    assert "field 'date'" in results[11]["detail"] and "2024-02-30" in results[11]["detail"]
    assert (results[8]["status"], results[8]["reason"]) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT")
    assert "record.date" in results[8]["detail"]
    assert (results[9]["status"], results[9]["reason"]) == ("NOT_FOUND", "UNKNOWN_CITIZEN")

    again = qj("ingest", "--file", str(f), "--target", served.target)  # the table: resent, all duplicates now
    refused(again, "records failed", status=1)
    assert re.search(r"\n1\s+\S+-a\s+DUPLICATE\s*\n", again.stdout), again.stdout
    assert re.search(r"\n3\s+-\s+INVALID\s+not JSON", again.stdout), again.stdout
    assert re.search(r"\n9\s+\S+-f\s+NOT_FOUND\s+citizen not found", again.stdout), again.stdout


def test_ingest_file_keeps_the_per_line_picture_when_no_server_answers(tmp_path):
    f = tmp_path / "records.jsonl"
    good = {"record_id": "r-1", "citizen_id": "c00002902", "variable": "volunteer_hours", "date": "2024-03-01"}
    f.write_text(json.dumps(good) + "\n[1, 2]\n" + json.dumps({**good, "record_id": "r-2"}) + "\n")
    out = qj("ingest", "--file", str(f), "--target", NOBODY, "--timeout", "1")
    refused(out, "UNAVAILABLE")
    assert "not acknowledged: lines 1, 3 (resending is safe" in out.stderr
    assert re.search(r"\n2\s+-\s+INVALID\s+not a JSON object of record fields but list", out.stdout), out.stdout
    assert re.search(r"\n3\s+r-2\s+NOT_ACKNOWLEDGED", out.stdout), out.stdout


# --- certificates and mutual TLS ------------------------------------------------------------


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory):
    """A real server in the mtls mode; (its target, its certificate directory)."""
    from prometheus_client import CollectorRegistry

    from server import tls
    from server.app import Node, Runtime, ServerConfig
    from server.metrics import Metrics

    base = tmp_path_factory.mktemp("cli-mtls")
    tls.make_dev_pki(base / "certs", ["metro_gateway", "citizen_app"])
    runtime = Runtime.prepare(ServerConfig(data_dir=base / "data", seed_citizens=200, metrics_port=0, port=0,
                                           security="mtls", cert_dir=base / "certs"))
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry())).start()
    runtime.load()
    node.attach()
    yield f"localhost:{node.port}", base / "certs"
    node.drain(0)


def test_a_mutual_tls_server_without_a_client_certificate_says_so(mtls_server, served):
    target, certs = mtls_server
    ca_only = certs.parent / "ca-only"
    ca_only.mkdir(exist_ok=True)
    (ca_only / "ca.pem").write_bytes((certs / "ca.pem").read_bytes())
    no_cert, plain, good, plain_server = qj_all(
        ["scenarios", "--target", target, "--certs", str(ca_only)],
        ["scenarios", "--target", target],
        ["scenarios", "--target", target, "--certs", str(certs), "--caller", "metro_gateway", "--json"],
        ["scenarios", "--target", served.target, "--certs", str(certs), "--caller", "metro_gateway"],
    )
    says = "error: the server requires a client certificate (mutual TLS): give --certs DIR --caller IDENTITY"
    for out in (no_cert, plain):
        refused(out, says)
        assert out.stderr.strip() == says
    assert good.returncode == 0 and {s["name"] for s in json.loads(good.stdout)} >= {"metro_pay_later"}, good.stderr
    refused(plain_server, "the server speaks plain text, not TLS: leave out --certs and --caller")


def test_a_certificate_directory_that_cannot_serve_is_named(mtls_server, tmp_path):
    target, certs = mtls_server
    missing = tmp_path / "nowhere"
    no_key = tmp_path / "no-key"
    no_key.mkdir()
    for name in ("ca.pem", "metro_gateway.pem"):
        (no_key / name).write_bytes((certs / name).read_bytes())
    no_ca = tmp_path / "no-ca"
    no_ca.mkdir()
    outs = qj_all(
        ["health", "--target", target, "--certs", str(missing), "--caller", "metro_gateway"],
        ["health", "--target", target, "--certs", str(no_ca)],
        ["health", "--target", target, "--certs", str(certs), "--caller", "nobody"],
        ["health", "--target", target, "--certs", str(no_key), "--caller", "metro_gateway"],
        ["health", "--target", target, "--caller", "metro_gateway"],
        ["health", "--target", target, "--certs", str(certs), "--caller", "../etc/passwd"],
    )
    refused(outs[0], f"error: --certs {missing}: directory missing")
    refused(outs[1], f"error: --certs {no_ca}: ca.pem missing")
    refused(outs[2], f"error: --certs {certs}: nobody.pem missing: no certificate for caller 'nobody' in {certs} "
                     "(the identities there: citizen_app, metro_gateway)")
    refused(outs[3], f"error: --certs {no_key}: metro_gateway.key missing")
    refused(outs[4], "--caller metro_gateway: give --certs DIR too")
    refused(outs[5], "bad caller name '../etc/passwd'")
    for out in outs[:5]:
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# --- token --------------------------------------------------------------------------------------


def test_token_refuses_what_would_print_a_token_of_no_card(served, tmp_path):
    keys_only = tmp_path / "keys-only"
    (keys_only / "keys").mkdir(parents=True)
    for f in (served.data_dir / "keys").iterdir():
        (keys_only / "keys" / f.name).write_bytes(f.read_bytes())
    row = adult_rows(served, range(2903, 2999))[0]
    empty, unknown, malformed, no_store, good, bare = qj_all(
        ["token", "c00000003", "--data-dir", str(tmp_path / "empty")],
        ["token", "c00099999", "--data-dir", str(served.data_dir)],
        ["token", "bob", "--data-dir", str(served.data_dir)],
        ["token", "c00000003", "--data-dir", str(keys_only)],
        ["token", served.citizen(row), "--data-dir", str(served.data_dir), "--json"],
        ["token", str(row), "--data-dir", str(served.data_dir)],
    )
    refused(empty, f"error: no keys in {tmp_path / 'empty' / 'keys'}: start the server once on this data directory, or give --data-dir")
    assert not (tmp_path / "empty").exists(), "no key was made"
    refused(unknown, "no citizen c00099999 in the store")
    refused(malformed, "'bob' is not a synthetic citizen id (c and 8 digits, e.g. c00000003)")
    refused(no_store, f"no store at {keys_only.resolve() / 'qianjiang.db'}")
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout) == {"citizen_id": served.citizen(row), "card_token": served.token(row).hex()}
    assert bare.stdout.strip() == served.token(row).hex()
    out = qj("check", "campus_fitness", "--card", served.token(row).hex(), "--json", "--target", served.target)
    assert json.loads(out.stdout)["outcome"] != "UNKNOWN_CARD"


# --- argument values ------------------------------------------------------------------------------


def test_bad_argument_values_say_what_is_wrong(served, tmp_path):
    t = ["--target", served.target]
    cases = [
        (["check", "campus_fitness", "--card", "0" * 31, *t], "argument --card: expected 32 hex digits, got 31"),
        (["check", "campus_fitness", "--card", "0123g" + "0" * 27, *t], "argument --card: 'g' (character 5) is not a hex digit"),
        (["ingest", "--record-id", "x", "--citizen", "c1", "--variable", "v", "--date", "2026/11/20", *t],
         "argument --date: '2026/11/20' is not a date (YYYY-MM-DD)"),
        (["correct", "r-1", "--date", "2026-02-30", "--value", "1", *t], "'2026-02-30' is not a date of the calendar"),
        (["correct", "r-1", "--date", "2026-01-30", "--value", "-1", *t], "argument --value: must be a finite number >= 0, got -1"),
        (["correct", "r-1", "--date", "2026-01-30", "--value", "lots", *t], "argument --value: 'lots' is not a number"),
        (["score", "c1", "--timeout", "0", *t], "argument --timeout: must be a finite number of seconds > 0, got 0"),
        (["checks", "c1", "--limit", "5000", *t], "argument --limit: must be at most 1000, got 5000"),
        (["serve", "--port", "70000"], "argument --port: must be at most 65535, got 70000"),
        (["ingest", "--citizen", "c1", *t], "ingest: give --file, or --record-id, --variable, --date"),
        (["ingest", "--file", str(tmp_path / "none.jsonl"), *t], f"--file {tmp_path / 'none.jsonl'}: No such file or directory"),
        (["check-batch", "campus_fitness", "--cards", str(tmp_path / "none"), *t], "No such file or directory"),
        (["generate", "--citizens", "1", "--out", str(tmp_path / "no" / "dir.jsonl")], "--out"),
    ]
    for (argv, says), out in zip(cases, qj_all(*(argv for argv, _ in cases))):
        refused(out, says)


def test_every_option_shows_its_default(monkeypatch):
    """Walks every subcommand's options as `--help` shows them."""
    import argparse

    from clients.cli import parser, serve_config

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    checked = 0

    def walk(p: argparse.ArgumentParser) -> None:
        nonlocal checked
        text = p.format_help()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    walk(child)
                continue
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{p.prog} {action.option_strings or action.dest}: no help"
            if not action.option_strings:
                continue
            lines = text.splitlines()
            invocation = re.compile("  " + re.escape(", ".join(action.option_strings)) + r"( |$)")
            first = next(i for i, x in enumerate(lines) if invocation.match(x))
            more = next((i for i in range(first + 1, len(lines)) if not lines[i].startswith("   ")), len(lines))
            line = " ".join(x.strip() for x in lines[first:more])  # a long option's help is on the next line
            d = action.default
            if d is not None and d is not False and d != "":
                assert f"default {d}" in line or f"default: {d}" in line, f"{p.prog}: {line.strip()}"
            checked += 1

    walk(parser())
    assert checked > 100
    config = serve_config(parser().parse_args(["serve", "--production", "--city-timezone", "Europe/Paris"]))
    assert (config.production, config.city_timezone, config.seed_citizens) == (True, "Europe/Paris", 0)
    assert serve_config(parser().parse_args(["serve"])).city_timezone == "Asia/Shanghai"
    assert re.search(r"\n\s+serve\s+run the service\n", parser().format_help())


# --- a gateway's batch and stream ---------------------------------------------------------------------


def test_check_batch_answers_every_line(served, tmp_path):
    rows = list(range(5))
    lines = [served.token(rows[0]).hex(), "0" * 31, served.token(rows[1]).hex(), "", "xyz", served.token(rows[2]).hex()]
    f = tmp_path / "cards.txt"
    f.write_text("\n".join(lines) + "\n")
    from_file, from_stdin = qj_all(["check-batch", "campus_fitness", "--cards", str(f), "--json", "--target", served.target],
                                   ["check-batch", "campus_fitness", "--cards", str(f), "--target", served.target])
    refused(from_file, "2 of 5 lines are no card token (lines 2, 5)", status=1)
    results = json_lines(from_file)
    assert [r["line"] for r in results] == [1, 2, 3, 5, 6]
    expected = {n: served.client.check("campus_fitness", served.token(row)) for n, row in ((1, 0), (3, 1), (6, 2))}
    for r in results:
        if r["line"] in expected:
            d = expected[r["line"]]
            from qianjiang.v1 import eligibility_pb2

            assert r["outcome"] == eligibility_pb2.Outcome.Name(d.outcome) and r["error"] == ""
            assert r["decision"] == ("ALLOW" if d.allowed else "DENY") and r["decision_id"]
            assert r["token"] == lines[r["line"] - 1][:8] + "..."
    bad = {r["line"]: r for r in results if r["error"]}
    assert bad[2]["error"] == "expected 32 hex digits, got 31" and bad[2]["decision"] == "-"
    assert bad[5]["error"] == "'x' (character 1) is not a hex digit"
    assert re.search(r"line\s+token\s+decision\s+outcome\s+decision id", from_stdin.stdout)


def test_check_batch_sends_large_inputs_in_chunks(served, tmp_path, monkeypatch, capsys):
    """At most the contract's tokens in one BatchCheck (here 2 instead of 100,000)."""
    import clients.client
    from clients.cli import main

    monkeypatch.setattr(clients.client, "MAX_BATCH_TOKENS", 2)
    f = tmp_path / "cards.txt"
    f.write_text("".join(served.token(r).hex() + "\n" for r in range(5)))
    assert main(["check-batch", "metro_pay_later", "--cards", str(f), "--json", "--target", served.target]) == 0
    ids = [json.loads(line)["decision_id"] for line in capsys.readouterr().out.splitlines()]
    batches = [i.rsplit("-", 1) for i in ids]
    assert [int(i) for _, i in batches] == [0, 1, 0, 1, 0]
    assert batches[0][0] == batches[1][0] != batches[2][0] == batches[3][0] != batches[4][0]


def test_check_stream_answers_each_line_as_it_comes(served):
    """One answer per line, printed before the next line is even written; bad lines are
    answered in their place and the stream goes on."""
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "check-stream", "campus_fitness", "--cards", "-",
                             "--json", "--target", served.target],
                            cwd=ROOT, env=os.environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    killer = threading.Timer(30, proc.kill)  # a CLI that waits for the end of its input would hang here
    killer.start()
    try:
        answers = []
        for line in (served.token(0).hex(), "not-a-token", "", served.token(1).hex(), "0" * 30):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            if line:
                got = proc.stdout.readline()
                assert got, proc.stderr.read()
                answers.append(json.loads(got))
        proc.stdin.close()
        assert proc.wait(timeout=30) == 1
        err = proc.stderr.read()
    finally:
        killer.cancel()
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert "Traceback" not in err and "2 of 4 lines got no decision (lines 2, 5)" in err, err
    assert [a["line"] for a in answers] == [1, 2, 4, 5]
    assert answers[0]["outcome"] != "INVALID_REQUEST" and answers[0]["decision_id"]
    assert answers[2]["outcome"] != "INVALID_REQUEST" and answers[2]["decision"] in ("ALLOW", "DENY")
    assert (answers[1]["outcome"], answers[1]["decision"]) == ("INVALID_REQUEST", "-")
    assert answers[1]["error"] == "'n' (character 1) is not a hex digit"
    assert answers[3]["error"] == "expected 32 hex digits, got 30"
