"""qjscore: the command-line tool of the Qianjiang Score service.

    qjscore serve                                  # the service on data/ (seeds a synthetic city once)
    qjscore check campus_fitness --card 3f2a...    # may this card use campus fitness?
    qjscore score c00000003                        # a citizen's score, level and reasons
    qjscore ingest --record-id r-1 --citizen c00000003 --variable utility_arrears_serious --date 2026-11-20
    qjscore consent revoke c00000003

Readable tables by default, one JSON object per answer with --json. Client commands talk to
--target (default 127.0.0.1:50051, or $QJ_TARGET).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from server.event_loop import EVENT_LOOPS

DEFAULT_TARGET = os.environ.get("QJ_TARGET", "127.0.0.1:50051")


# --- output -----------------------------------------------------------------------------------


def table(rows: list[tuple], headers: tuple[str, ...] | None = None) -> str:
    """Columns aligned on the widest cell (CJK characters count double)."""
    rows = [tuple(str(c) for c in r) for r in rows]
    all_rows = ([tuple(headers)] if headers else []) + rows

    def width(s: str) -> int:
        return sum(2 if ord(ch) > 0x2E80 else 1 for ch in s)

    widths = [max(width(r[i]) for r in all_rows) for i in range(len(all_rows[0]))] if all_rows else []
    lines = []
    for k, r in enumerate(all_rows):
        lines.append("  ".join(c + " " * (w - width(c)) for c, w in zip(r, widths)).rstrip())
        if headers and k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def as_dict(msg) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def emit(args, obj, text: str) -> None:
    print(json.dumps(obj, ensure_ascii=False) if args.json else text)


# --- client commands ---------------------------------------------------------------------------


def _client(args):
    from clients.client import QianjiangClient

    return QianjiangClient(
        args.target, timeout=args.timeout, token=args.token or os.environ.get("QJ_TOKEN"),
        cert_dir=args.certs, caller=args.caller,
    )


def _token(value: str) -> bytes:
    try:
        token = bytes.fromhex(value)
    except ValueError:
        raise SystemExit(f"--card: {value!r} is not hexadecimal") from None
    if len(token) != 16:
        raise SystemExit(f"--card: expected 16 bytes (32 hex digits), got {len(token)}")
    return token


def score_text(s) -> str:
    from qianjiang.v1 import common_pb2

    head = table([
        ("citizen", s.citizen_id),
        ("score", f"{s.score}  ({common_pb2.Level.Name(s.level).lower()}, {s.level_zh})"),
        ("percentile", f"{100 * s.percentile:.1f} %"),
        ("hard rule", "applied: an active serious record caps the score" if s.hard_rule_applied else "no"),
        ("model", f"{s.model_version}  calibration {s.calibration_version}"),
        ("computed", s.computed_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")),
    ])
    dims = table([(d.dimension, d.name_zh, f"{d.points:8.2f}") for d in s.dimensions] + [("total", "", f"{s.raw_points:8.2f}")],
                 ("dimension", "维度", "points"))
    reasons = table([(r.code, r.text_en, f"{r.points_lost:.2f}", r.improve_en) for r in s.reasons],
                    ("reason", "why", "lost", "how to improve")) if s.reasons else "no reasons: nothing to improve"
    return f"{head}\n\n{dims}\n\n{reasons}"


def cmd_score(args) -> int:
    with _client(args) as qj:
        s = qj.get_score(args.citizen, purpose=args.purpose)
    emit(args, as_dict(s), score_text(s))
    return 0


def cmd_explain(args) -> int:
    with _client(args) as qj:
        e = qj.explain(args.citizen, purpose=args.purpose)
    rows = [(v.variable, v.dimension, v.direction, f"{v.feature:.3f}", f"{v.points:.2f}", f"{v.best_points:.2f}") for v in e.variables]
    text = score_text(e.score) + "\n\n" + table(rows, ("variable", "dimension", "direction", "feature", "points", "best"))
    emit(args, as_dict(e), text)
    return 0


def cmd_check(args) -> int:
    from qianjiang.v1 import eligibility_pb2

    with _client(args) as qj:
        d = qj.check(args.scenario, _token(args.card))
    text = table([
        ("scenario", d.scenario),
        ("decision", f"{'ALLOW' if d.allowed else 'DENY'}  ({eligibility_pb2.Outcome.Name(d.outcome)})"),
        ("reasons", ", ".join(d.reason_codes) or "-"),
        ("decision id", d.decision_id),
        ("model", d.model_version),
    ])
    emit(args, as_dict(d), text)
    return 0


def cmd_scenarios(args) -> int:
    with _client(args) as qj:
        scenarios = qj.scenarios()
    rows = [(s.name, s.name_zh, s.min_score, "yes" if s.pay_later else "no") for s in scenarios]
    emit(args, [as_dict(s) for s in scenarios], table(rows, ("scenario", "名称", "min score", "pay later")))
    return 0


def cmd_ingest(args) -> int:
    from clients.client import Record
    from qianjiang.v1 import records_pb2

    if args.file:
        lines = Path(args.file).read_text().splitlines() if args.file != "-" else sys.stdin.read().splitlines()
        records = [Record(**json.loads(line)) for line in lines if line.strip()]
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("record_id", "citizen", "variable", "date") if not getattr(args, k)]
        if missing:
            raise SystemExit(f"ingest: give --file, or {', '.join(missing)}")
        records = [Record(record_id=args.record_id, citizen_id=args.citizen, variable=args.variable, date=args.date,
                          value=args.value, source=args.source, scenario=args.scenario or "")]
    with _client(args) as qj:
        acks = qj.ingest(records)
    status = records_pb2.RecordAck.Status.Name
    emit(args, [as_dict(a) for a in acks], table([(a.record_id, status(a.status)) for a in acks], ("record", "ack")))
    return 0


def cmd_consent(args) -> int:
    with _client(args) as qj:
        state = qj.grant_consent(args.citizen) if args.action == "grant" else qj.revoke_consent(args.citizen)
    emit(args, as_dict(state), f"{state.citizen_id}: authorisation {'granted' if state.granted else 'revoked'}")
    return 0


def cmd_withdraw(args) -> int:
    with _client(args) as qj:
        ack = qj.withdraw_record(args.record_id, repaired=args.repaired, source=args.source)
    emit(args, as_dict(ack), f"{ack.record_id} ({ack.source}): {'repaired' if args.repaired else 'withdrawn'} as version "
                             f"{ack.version}; the citizen was re-scored")
    return 0


def cmd_correct(args) -> int:
    with _client(args) as qj:
        ack = qj.correct_record(args.record_id, args.date, args.value, source=args.source)
    emit(args, as_dict(ack), f"{ack.record_id} ({ack.source}): corrected as version {ack.version}; the citizen was re-scored")
    return 0


def cmd_history(args) -> int:
    """Every version of one of the caller's records."""
    with _client(args) as qj:
        h = qj.record_history(args.record_id, source=args.source)
    rows = [(v.version, v.date, f"{v.value:g}", v.status, v.received_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
             v.sent_by, v.position) for v in h.versions]
    emit(args, as_dict(h), f"record {h.record_id} from {h.source}\n\n"
         + table(rows, ("version", "date", "value", "status", "received (UTC)", "sent by", "position")))
    return 0


def cmd_replay(args) -> int:
    """An appeal: a past decision or score disclosure recomputed from the record history."""
    with _client(args) as qj:
        r = qj.replay_decision(args.decision_id)
    o = r.original
    text = table([
        ("decision id", o.decision_id),
        ("made", f"{o.time.ToDatetime().strftime('%Y-%m-%d %H:%M:%S UTC')} for {o.caller} ({o.method}, {o.scenario})"),
        ("with", f"model {o.model_version}, calibration {o.calibration_version}, rule {o.rules_version or '-'}"),
        ("records", f"as at position {o.records_position}, aged to {o.as_of_date}"),
        ("answer then", o.result),
        ("replayed", f"{r.replayed_result}  ({'matches' if r.matches else 'DIFFERS'})"),
        ("score", f"{r.score} ({r.level})" if r.level else "-"),
        ("reasons", ", ".join(r.reason_codes) or "-"),
    ])
    emit(args, as_dict(r), text)
    return 0 if r.matches else 1


def cmd_checks(args) -> int:
    """Who checked me: the audit log's disclosures about a citizen, newest first."""
    with _client(args) as qj:
        entries = qj.list_checks(args.citizen, limit=args.limit)
    rows = [(e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"), e.caller, e.method, e.scenario, e.result, e.decision_id) for e in entries]
    emit(args, [as_dict(e) for e in entries], table(rows, ("time (UTC)", "caller", "method", "scenario / purpose", "result", "decision id")) if rows else "nobody has checked this citizen")
    return 0


def cmd_certs(args) -> int:
    from server import tls

    argv = ["--out", args.out] + (["--force"] if args.force else [])
    for caller in args.caller or []:
        argv += ["--caller", caller]
    tls.main(argv)
    return 0


def cmd_health(args) -> int:
    with _client(args) as qj:
        status = qj.health(args.service)
    emit(args, {"service": args.service, "status": status}, status)
    return 0 if status == "SERVING" else 1


# --- local commands ------------------------------------------------------------------------------


def serve_config(args):
    """The server's configuration from ``qjscore serve``'s arguments."""
    from server.app import ServerConfig

    return ServerConfig(
        data_dir=Path(args.data_dir), store_url=args.store, host=args.host, port=args.port,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, workers=args.workers, threads=args.threads,
        max_concurrent_rpcs=args.max_concurrent_rpcs, max_pending_calls=args.max_pending_calls,
        max_streams=args.max_streams, max_calls_per_caller=args.max_calls_per_caller,
        max_streams_per_caller=args.max_streams_per_caller, call_timeout_seconds=args.call_timeout,
        stream_idle_seconds=args.stream_idle_timeout, max_open_service_streams=args.max_open_service_streams,
        max_streams_per_connection=args.max_streams_per_connection, keepalive_seconds=args.keepalive, keepalive_timeout_seconds=args.keepalive_timeout,
        max_connection_age_seconds=args.max_connection_age, max_connection_age_grace_seconds=args.max_connection_age_grace,
        max_connection_idle_seconds=args.max_connection_idle, min_client_ping_seconds=args.min_client_ping_interval,
        seed_citizens=args.seed_citizens, seed=args.seed,
        security=args.security, tokens_path=args.tokens, cert_dir=args.certs, policy_path=args.policy,
        audit=not args.no_audit, event_loop=args.event_loop, audit_max_pending=args.audit_max_pending,
        batch_tokens_per_second=args.batch_tokens_per_second, purposes_path=args.purposes,
    )


def _at_least(low: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n

    return parse


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not s >= 0 or s == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {value}")
    return s


def cmd_serve(args) -> int:
    from server.models import DataDirInUse, lock_data_dir

    try:  # first: a second server must not touch the running one's files (its metrics, pid file)
        lock_data_dir(args.data_dir)
    except DataDirInUse as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # prometheus_client picks multiprocess mode at import: set it before anything imports it
        mp = Path(args.data_dir) / "prometheus"
        mp.mkdir(parents=True, exist_ok=True)
        for f in mp.glob("*.db"):
            f.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mp)
    from server.app import announce, serve

    # the example citizen and card only on a terminal, never into a log (server/app.py start_banner)
    serve(serve_config(args), on_ready=announce)
    return 0


def cmd_token(args) -> int:
    """The synthetic city's card token of a seeded citizen (for trying the service): the
    keyed hash of its synthetic card number, with the key of --data-dir."""
    from server.keys import card_token, load_keys, synthetic_card_number

    row = int(args.citizen.lstrip("c")) if args.citizen.startswith("c") else int(args.citizen)
    token = card_token(load_keys(Path(args.data_dir)).card, synthetic_card_number(row)).hex()
    emit(args, {"citizen_id": args.citizen, "card_token": token}, token)
    return 0


def cmd_generate(args) -> int:
    """Write a synthetic city's records as JSON lines (the format `ingest --file` reads)."""
    from kernel.spec import load_spec
    from kernel.synthetic import generate_city
    from server.app import citizen_id
    from server.state import iso_of, today

    spec = load_spec(args.spec)
    city = generate_city(spec, args.citizens, seed=args.seed, as_of_day=today(), progress=None)
    recs = city.records
    out = sys.stdout if args.out == "-" else open(args.out, "w")
    try:
        for i in range(len(recs)):
            var = spec.variables[int(recs.variable[i])]
            out.write(json.dumps({
                "record_id": f"gen-{args.seed}-{i}", "citizen_id": citizen_id(int(recs.citizen[i])),
                "variable": var.name, "date": iso_of(int(recs.day[i])), "value": float(recs.value[i]),
                "source": var.source,
            }) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    print(f"{args.citizens:,} people, {len(recs):,} records, {int((city.people.age < 18).sum()):,} minors", file=sys.stderr)
    return 0


def cmd_calibrate(args) -> int:
    from kernel import calibrate

    argv = ["--citizens", str(args.citizens), "--seed", str(args.seed)]
    for flag, value in (("--out", args.out), ("--png", args.png), ("--spec", args.spec)):
        if value:
            argv += [flag, value]
    if args.json:
        argv.append("--json")
    calibrate.main(argv)
    return 0


# --- model releases (local: the registry in --data-dir) ------------------------------------------


def _store_url(args) -> str:
    if args.store:
        return args.store
    db = Path(args.data_dir).resolve() / "qianjiang.db"
    if not db.exists():
        raise SystemExit(f"model stage: no store at {db}: start the server once (it seeds one), or give --store")
    return f"sqlite:///{db}"


def _tell_server(args, registry, done: str) -> int:
    from server.models import server_pid, signal_server

    pid = server_pid(args.data_dir)
    signalled = signal_server(args.data_dir)
    note = (f"told the server (pid {pid}) to switch (SIGHUP)" if signalled else
            f"no running server found ({Path(args.data_dir) / 'qjscore.pid'}): served from the next start")
    obj = {"active": registry.active(), "previous": registry.previous(), "server_pid": pid if signalled else None,
           "signalled": signalled}
    emit(args, obj, table([("done", done), ("active", obj["active"]), ("previous", obj["previous"] or "-"), ("server", note)]))
    return 0


def cmd_model_status(args) -> int:
    from server.models import ModelRegistry, server_pid

    reg = ModelRegistry(args.data_dir)
    active, previous = reg.active(), reg.previous()
    rows, releases = [], []
    for rid in reg.releases():
        info = reg.info(rid)
        report = info.get("report") or {}
        mark = "active" if rid == active else "previous" if rid == previous else ""
        releases.append({**{k: info.get(k) for k in ("release_id", "model_version", "calibration_version", "staged_at",
                                                       "origin", "source_spec", "calibration")},
                         "state": mark or "staged", "report": report or None})
        rows.append((rid, mark, info.get("staged_at", "?"),
                     f"{report['psi_raw']:.4f}" if report else "-", f"{100 * report['changed_share']:.2f} %" if report else "-",
                     report.get("old_release", "-") if report else "-"))
    pid = server_pid(args.data_dir)
    obj = {"active": active, "previous": previous, "server_pid": pid, "releases": releases, "history": reg.history(10)}
    text = table([("active", active or "- (none yet: the server registers one at first start)"),
                  ("previous", previous or "-"), ("server", f"pid {pid}" if pid else "not running")])
    if rows:
        text += "\n\n" + table(rows, ("release", "", "staged (UTC)", "PSI raw", "level changes", "compared with"))
    emit(args, obj, text)
    return 0


def cmd_model_stage(args) -> int:
    from server.models import ModelRegistry
    from server.scenarios import load_scenarios
    from server.store import open_store

    reg = ModelRegistry(args.data_dir)
    reg.adopt_legacy()  # a data directory from before the registry: its v1 calibration is the active release
    store = open_store(_store_url(args))
    try:
        rid, report = reg.stage(args.spec, args.calibration, store=store, scenarios=load_scenarios(args.scenarios))
    finally:
        store.close()
    obj = {"release_id": rid, "active": reg.active(), "report": report.to_dict() if report else None}
    text = f"staged    {rid}\n" + (report.format() if report else "nothing is active yet: no comparison")
    text += f"\n\nactivate with: qjscore model activate {rid}" + (f" --data-dir {args.data_dir}" if args.data_dir != "data" else "")
    emit(args, obj, text)
    return 0


def cmd_model_activate(args) -> int:
    from server.models import ModelRegistry

    reg = ModelRegistry(args.data_dir)
    reg.adopt_legacy()
    before = reg.activate(args.release)
    done = f"{args.release} is already active" if before == args.release else f"activated {args.release}"
    return _tell_server(args, reg, done)


def cmd_model_restore(args) -> int:
    from server.models import ModelRegistry

    reg = ModelRegistry(args.data_dir)
    now = reg.restore()
    return _tell_server(args, reg, f"restored {now}")


def cmd_model(args) -> int:
    """Registry errors are the operator's to fix: one line on stderr, exit status 2."""
    from kernel.calibration import CalibrationError
    from kernel.spec import SpecError
    from server.models import RegistryError

    try:
        return args.model_fn(args)
    except (SpecError, CalibrationError, RegistryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# --- parser -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qjscore", description="Qianjiang Score service: serve it, query it, feed it.")
    sub = ap.add_subparsers(dest="command", required=True)

    def client_cmd(name, fn, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--target", default=DEFAULT_TARGET, help="host:port of the service (default %(default)s)")
        p.add_argument("--timeout", type=float, default=5.0, help="deadline of each call in seconds")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--token", help="development bearer token (or $QJ_TOKEN)")
        p.add_argument("--certs", help="directory with ca.pem and the caller's certificate (mutual TLS)")
        p.add_argument("--caller", help="the caller identity whose <caller>.pem/.key to present")
        p.set_defaults(fn=fn)
        return p

    p = client_cmd("score", cmd_score, "a citizen's score, level, dimensions and reasons")
    p.add_argument("citizen")
    p.add_argument("--purpose", default="citizen_app_view")
    p = client_cmd("explain", cmd_explain, "the score with every variable's feature and points")
    p.add_argument("citizen")
    p.add_argument("--purpose", default="citizen_app_view")
    p = client_cmd("check", cmd_check, "an eligibility decision for a card in a scenario")
    p.add_argument("scenario")
    p.add_argument("--card", required=True, help="the card token, 32 hex digits")
    client_cmd("scenarios", cmd_scenarios, "the scenarios and their thresholds")
    p = client_cmd("ingest", cmd_ingest, "send records (one by flags, or JSON lines with --file)")
    p.add_argument("--file", help="JSON lines of Record fields ('-': stdin)")
    p.add_argument("--record-id")
    p.add_argument("--citizen")
    p.add_argument("--variable")
    p.add_argument("--date", help="YYYY-MM-DD")
    p.add_argument("--value", type=float, default=1.0)
    p.add_argument("--source", default="", help="the record's source (default: the caller's own identity)")
    p.add_argument("--scenario", help="pay-later scenario of an unpaid default")
    p = client_cmd("consent", cmd_consent, "grant or revoke a citizen's authorisation")
    p.add_argument("action", choices=("grant", "revoke"))
    p.add_argument("citizen")
    p = client_cmd("withdraw", cmd_withdraw, "withdraw a record, or mark it repaired (--repaired)")
    p.add_argument("record_id")
    p.add_argument("--repaired", action="store_true", help="credit repair: the citizen remedied it (default: withdrawn as an error)")
    p.add_argument("--source", default="", help="the record's source (default: the caller's own identity)")
    p = client_cmd("correct", cmd_correct, "correct a record's date and value (a new version)")
    p.add_argument("record_id")
    p.add_argument("--date", required=True, help="YYYY-MM-DD")
    p.add_argument("--value", type=float, required=True)
    p.add_argument("--source", default="", help="the record's source (default: the caller's own identity)")
    p = client_cmd("history", cmd_history, "every version of a record: when received, who sent it")
    p.add_argument("record_id")
    p.add_argument("--source", default="", help="the record's source (default: the caller's own identity)")
    p = client_cmd("replay", cmd_replay, "an appeal: recompute a past decision from the record history (exit 1 if it differs)")
    p.add_argument("decision_id")
    p = client_cmd("checks", cmd_checks, "who checked a citizen: the audit log's disclosures about them")
    p.add_argument("citizen")
    p.add_argument("--limit", type=int, default=100)
    p = client_cmd("health", cmd_health, "the server's health status")
    p.add_argument("--service", default="")

    p = sub.add_parser("serve", help="run the service (seeds a synthetic city into an empty store)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--store", default=None, help="store URL: sqlite:///path or postgresql://user@host/db (default sqlite:///<data-dir>/qianjiang.db)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus endpoint (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the Prometheus endpoint (plain HTTP, no authentication) listens on; loopback by default")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--threads", type=int, default=16, help="handler threads per worker")
    p.add_argument("--max-concurrent-rpcs", type=_at_least(0), default=128, help="calls in flight per worker; beyond this, RESOURCE_EXHAUSTED (0: no limit)")
    p.add_argument("--max-pending-calls", type=_at_least(1), default=128,
                   help="calls waiting for a busy worker in grpc core; beyond this grpc refuses them (CANCELLED) at once")
    p.add_argument("--max-streams", type=_at_least(0), default=None, metavar="N",
                   help="StreamCheck/IngestRecords streams open at once per worker; beyond this a new one gets "
                        "RESOURCE_EXHAUSTED (reason STREAM_LIMIT) at once (default: half of --max-concurrent-rpcs; 0: no limit)")
    p.add_argument("--max-calls-per-caller", type=_at_least(0), default=None, metavar="N",
                   help="calls in flight per caller identity per worker (token, mtls); beyond this RESOURCE_EXHAUSTED "
                        "(reason CALLER_QUOTA) while other callers are served (default: a quarter of --max-concurrent-rpcs; 0: none)")
    p.add_argument("--max-streams-per-caller", type=_at_least(0), default=None, metavar="N",
                   help="streams open per caller identity per worker (default: a quarter of --max-streams; 0: none)")
    p.add_argument("--call-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="the server's deadline on a unary call that set none or a later one, including the wait for "
                        "its request message (DEADLINE_EXCEEDED, reason SERVER_DEADLINE; 0: none)")
    p.add_argument("--stream-idle-timeout", type=_seconds, default=120.0, metavar="SECONDS",
                   help="end a stream whose client sent no message for this long (reason STREAM_IDLE; 0: never)")
    p.add_argument("--max-open-service-streams", type=_at_least(0), default=16, metavar="N",
                   help="Health.Watch and reflection streams open per worker (they need no identity; 0: no limit)")
    p.add_argument("--max-streams-per-connection", type=_at_least(1), default=1000, metavar="N",
                   help="calls open at once on one HTTP/2 connection")
    p.add_argument("--keepalive", type=_seconds, default=60.0, metavar="SECONDS",
                   help="ping a connection idle this long, to find dead peers (0: never)")
    p.add_argument("--keepalive-timeout", type=_seconds, default=20.0, metavar="SECONDS",
                   help="drop a connection whose keepalive ping is unanswered this long")
    p.add_argument("--max-connection-age", type=_seconds, default=300.0, metavar="SECONDS",
                   help="close every connection after about this long (+-10%% jitter) so clients reconnect and "
                        "spread over the workers; open streams must be reopened (0: never)")
    p.add_argument("--max-connection-age-grace", type=_seconds, default=30.0, metavar="SECONDS",
                   help="how long calls in flight may finish on an aged connection before it is cut (0: no limit)")
    p.add_argument("--max-connection-idle", type=_seconds, default=120.0, metavar="SECONDS",
                   help="close a connection with no call for this long (0: never)")
    p.add_argument("--min-client-ping-interval", type=_seconds, default=20.0, metavar="SECONDS",
                   help="the most often a client may send keepalive pings without calls (the client library: every 30 s)")
    p.add_argument("--event-loop", choices=EVENT_LOOPS, default=EVENT_LOOPS[0],
                   help="the loop each worker serves grpc on (uvloop: more calls a second)")
    p.add_argument("--seed-citizens", type=int, default=100_000, help="size of the synthetic city for an empty store")
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--security", choices=("insecure", "token", "mtls"), default="insecure",
                   help="insecure: loopback only, no authentication (development); token: bearer tokens; mtls: client certificates")
    p.add_argument("--tokens", help="TOML file of development bearer tokens: '<token>' = '<caller identity>'")
    p.add_argument("--certs", help="directory of ca.pem, server.pem, server.key (qjscore certs makes one)")
    p.add_argument("--policy", help="caller policy (default config/policy.toml)")
    p.add_argument("--no-audit", action="store_true", help="turn the audit log off (only to measure its cost)")
    p.add_argument("--audit-max-pending", type=_at_least(1), default=1_000_000,
                   help="disclosures a worker may hold before they are on disk; past it they are refused with "
                        "UNAVAILABLE, never answered unaudited (default %(default)s)")
    p.add_argument("--batch-tokens-per-second", type=float, default=200_000.0,
                   help="card tokens a second one caller may send in batch checks, per worker; beyond it "
                        "RESOURCE_EXHAUSTED CALLER_QUOTA (0: no limit; not applied in the insecure mode; "
                        "default %(default)s)")
    p.add_argument("--purposes", help="the purposes a score may be read for (default config/purposes.toml)")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("certs", help="make a development CA and certificates for the server and callers")
    p.add_argument("--out", default="data/certs")
    p.add_argument("--caller", action="append", help="a caller identity (repeatable; default: the policy's examples)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(fn=cmd_certs)

    p = sub.add_parser("token", help="the card token of a seeded synthetic citizen")
    p.add_argument("citizen", help="e.g. c00000003")
    p.add_argument("--data-dir", default="data", help="where the server keeps its keys")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_token)

    p = sub.add_parser("generate", help="write a synthetic city's records as JSON lines")
    p.add_argument("--citizens", type=int, default=1000)
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--spec", default=None)
    p.add_argument("--out", default="-")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("calibrate", help="calibrate the model on a synthetic city and report")
    p.add_argument("--citizens", type=int, default=1_000_000)
    p.add_argument("--seed", type=int, default=2018)
    p.add_argument("--spec", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_calibrate)

    model = sub.add_parser("model", help="model releases: status, stage (with a rollout report), activate, restore")
    msub = model.add_subparsers(dest="model_command", required=True)

    def model_cmd(name, fn, help):
        p = msub.add_parser(name, help=help)
        p.add_argument("--data-dir", default="data", help="the server's data directory (the registry is <data-dir>/models)")
        p.add_argument("--store", default=None, help="store URL (default sqlite:///<data-dir>/qianjiang.db)")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(fn=cmd_model, model_fn=fn)
        return p

    model_cmd("status", cmd_model_status, "the active and previous releases, and every staged one")
    p = model_cmd("stage", cmd_model_stage, "validate a spec, calibrate it, and report PSI and level migration vs the active release")
    p.add_argument("spec", nargs="?", default=None, help="model spec TOML (default: the active release's, to recalibrate it)")
    p.add_argument("--calibration", default=None, help="a frozen calibration table (.npz) for the spec (default: freeze one on the store's population)")
    p.add_argument("--scenarios", default=None, help="scenarios config (default config/scenarios.toml)")
    p = model_cmd("activate", cmd_model_activate, "make a staged release active and tell the running server to switch")
    p.add_argument("release", help="release id, as `model stage` or `model status` prints it")
    model_cmd("restore", cmd_model_restore, "go back to the previous release and tell the running server to switch")
    return ap


def main(argv=None) -> int:
    import grpc

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # `qjscore ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except grpc.RpcError as exc:
        from clients.client import QianjiangError

        print(f"error: {QianjiangError.of(exc)}", file=sys.stderr)  # CODE [REASON]: message
        return 2


if __name__ == "__main__":
    sys.exit(main())
