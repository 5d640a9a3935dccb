"""qjscore: the command-line tool of the Qianjiang Score service.

    qjscore serve                                  # the service on data/
    qjscore check campus_fitness --card 3f2a...    # may this card use campus fitness?
    qjscore check-stream metro_pay_later --cards - # a gateway's stream: a card token a line in, a decision out
    qjscore score c00000003                        # a citizen's score, level and reasons
    qjscore ingest --record-id r-1 --citizen c00000003 --variable utility_arrears_serious --date 2026-11-20
    qjscore consent revoke c00000003

Readable tables by default, one JSON object per answer with --json. Client commands talk to
--target (default 127.0.0.1:50051, or $QJ_TARGET).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from server.event_loop import EVENT_LOOPS

DEFAULT_TARGET = os.environ.get("QJ_TARGET", "127.0.0.1:50051")


class UsageError(Exception):
    """A mistake in what was asked, found by the command itself: one line on stderr
    ("error: ..."), exit status 2, never a traceback."""


# --- argument values: each parser's ValueError says what is wrong with the value ---------------

CARD_HEX_DIGITS = 32
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_card(text: str) -> bytes:
    """A card token from its 32 hex digits."""
    text = text.strip()
    bad = next((i for i, ch in enumerate(text) if ch not in _HEX_DIGITS), None)
    if bad is not None:
        raise ValueError(f"{text[bad]!r} (character {bad + 1}) is not a hex digit")
    if len(text) != CARD_HEX_DIGITS:
        raise ValueError(f"expected {CARD_HEX_DIGITS} hex digits, got {len(text)}")
    return bytes.fromhex(text)


def parse_date(text: str) -> str:
    """A YYYY-MM-DD date of the calendar, as given."""
    if not _DATE.fullmatch(text):
        raise ValueError(f"{text!r} is not a date (YYYY-MM-DD)")
    try:
        dt.date.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a date of the calendar ({exc})") from None
    return text


def check_record_value(value: float) -> float:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"must be a finite number >= 0, got {value:g}")
    return value


def parse_record_value(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    return check_record_value(value)


def parse_timeout(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"must be a finite number of seconds > 0, got {text}")
    return s


def parse_target(text: str) -> str:
    """host:port (grpc would wrap a port past 65535 around), or a grpc URI (dns:, unix:, ...)."""
    if text.startswith(("dns:", "unix:", "ipv4:", "ipv6:", "unix-abstract:", "vsock:")):
        return text
    host, _, port = text.rpartition(":")
    if not host or not port:
        raise ValueError(f"expected host:port, got {text!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{port!r} is not a port (1-65535)")
    return text


def parse_caller(text: str) -> str:
    from server.tls import check_caller_name

    return check_caller_name(text)


def _arg(parse):
    """An argparse type from a parser whose ValueError says what is wrong."""

    def typed(value: str):
        try:
            return parse(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    typed.__name__ = parse.__name__
    return typed


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
    from clients.client import CertsError, QianjiangClient

    if args.caller and not args.certs:
        raise UsageError(f"--caller {args.caller}: give --certs DIR too, the directory of ca.pem and {args.caller}.pem/.key")
    token = args.token or os.environ.get("QJ_TOKEN")
    if token and not all(0x21 <= ord(ch) <= 0x7E for ch in token):
        given = "--token" if args.token else "$QJ_TOKEN"
        raise UsageError(f"{given}: a bearer token is printable ASCII without spaces (it travels in a header)")
    try:
        key = args.end_user_key or os.environ.get("QJ_END_USER_KEY") or None
        return QianjiangClient(args.target, timeout=args.timeout, token=token, cert_dir=args.certs, caller=args.caller,
                               end_user_key=key, end_user_issuer=args.caller or args.end_user_issuer)
    except CertsError as exc:
        raise UsageError(str(exc)) from None


def connection_problem(args, error) -> str | None:
    """What a call that failed while connecting means, where grpc says only UNAVAILABLE
    ("Socket closed", a failed handshake): the server's transport, probed, against the
    credentials given. None when that is not it."""
    import grpc

    from clients.client import server_transport

    if error.code() != grpc.StatusCode.UNAVAILABLE or error.reason or not getattr(args, "target", None):
        return None  # a reason: the server itself answered
    transport = server_transport(args.target)
    if transport == "mtls" and not args.caller:
        return "the server requires a client certificate (mutual TLS): give --certs DIR --caller IDENTITY"
    if transport == "tls" and not args.certs:
        return "the server speaks TLS: give --certs DIR (the directory with ca.pem, the CA of its certificate)"
    if transport == "plaintext" and args.certs:
        return "the server speaks plain text, not TLS: leave out --certs and --caller"
    return None


def _read_lines(path: str, option: str) -> list[bytes]:
    """The lines of a file the user named ('-': stdin), as bytes: a line that is not UTF-8
    is that line's problem, not the whole file's."""
    try:
        return (sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()).splitlines()
    except OSError as exc:
        raise UsageError(f"{option} {path}: {exc.strerror}") from None


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
    dims = table([(d.dimension, d.name_zh, f"{d.weight:g}", f"{d.points:8.2f}") for d in s.dimensions]
                 + [("total", "", "", f"{s.raw_points:8.2f}")], ("dimension", "维度", "weight", "points"))
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
    rows = [(v.variable, v.dimension, f"{v.weight:g}", f"{v.feature:.3f}", f"{v.points:.2f}", f"{v.weighted_points:.2f}",
             f"{v.best_points:.2f}", f"{v.points_lost:.2f}") for v in e.variables]
    text = (score_text(e.score) + "\n\n"
            + table(rows, ("variable", "dimension", "weight", "feature", "points", "weighted", "best", "lost"))
            + "\n\nweighted = weight x points; a dimension's points are its variables' weighted points summed."
            + "\nlost = weight x (best - points): a reason's points lost is its variable's.")
    emit(args, as_dict(e), text)
    return 0


def parse_added(text: str) -> tuple[str, float, str]:
    """``VARIABLE=VALUE`` or ``VARIABLE=VALUE@YYYY-MM-DD`` (a what-if's hypothetical record)."""
    name, eq, rest = text.partition("=")
    value, at, date = rest.partition("@")
    if not eq or not name:
        raise ValueError(f"{text!r}: expected VARIABLE=VALUE, e.g. volunteer_hours=20 (or ...=20@2026-11-30)")
    return name, parse_record_value(value), parse_date(date) if at else ""


def parse_repaired(text: str) -> tuple[str, str]:
    """``RECORD_ID`` or ``SOURCE/RECORD_ID`` (record ids and sources have no '/')."""
    source, slash, record_id = text.rpartition("/")
    if not record_id or (slash and not source):
        raise ValueError(f"{text!r}: expected RECORD_ID or SOURCE/RECORD_ID")
    return record_id, source


def cmd_whatif(args) -> int:
    from clients.client import added, repaired, variable_repaired
    from qianjiang.v1 import common_pb2

    changes = ([repaired(rid, source) for rid, source in args.repair]
               + [variable_repaired(v) for v in args.repair_all]
               + [added(name, value, date) for name, value, date in args.add])
    with _client(args) as qj:
        sim = qj.simulate(args.citizen, changes, next_level=args.next_level, purpose=args.purpose)

    def line(s) -> str:
        return f"{s.score}  ({common_pb2.Level.Name(s.level).lower()}, {s.level_zh})"

    rows = [("now", line(sim.current)), ("if so", line(sim.simulated)), ("change", f"{sim.delta:+d}"),
            ("model", f"{sim.current.model_version}  calibration {sim.current.calibration_version}"),
            ("as of", sim.current.as_of_date)]
    text = table(rows) + "\n\nA what-if is computed, never stored, and shown to no one else."
    if sim.HasField("next_level"):
        nl = sim.next_level
        goal = f"{common_pb2.Level.Name(nl.level).lower()} (from {nl.min_score})"
        if not nl.reachable:
            text += f"\n\nnext level: {goal}: no set of up to 3 actions reaches it today ({nl.candidates_tried} tried)"
        else:
            acts = [(a.variable, f"repair record {a.source}/{a.record_id}" if a.repair else f"add {a.amount:g}",
                     a.improve_en) for a in nl.actions]
            text += (f"\n\nnext level: {goal}: {line(nl.score)} with\n"
                     + table(acts, ("variable", "action", "how")))
    emit(args, as_dict(sim), text)
    return 0


def cmd_check(args) -> int:
    from qianjiang.v1 import eligibility_pb2

    with _client(args) as qj:
        d = qj.check(args.scenario, args.card)
    text = table([
        ("scenario", d.scenario),
        ("decision", f"{'ALLOW' if d.allowed else 'DENY'}  ({eligibility_pb2.Outcome.Name(d.outcome)})"),
        ("reasons", ", ".join(d.reason_codes) or "-"),
        ("decision id", d.decision_id),
        ("model", d.model_version),
    ])
    emit(args, as_dict(d), text)
    return 0


def _outcome_name(outcome: int) -> str:
    from qianjiang.v1 import eligibility_pb2

    try:
        return eligibility_pb2.Outcome.Name(outcome)
    except ValueError:  # a newer server's outcome: no decision for this client (docs/partners.md)
        return str(outcome)


#: The outcomes that decide about a card (1-7): ALLOW, or a denial. Any other (StreamCheck's
#: answers to a message that asks nothing answerable, a newer server's) is no decision.
_ALLOW, _DENIALS = 1, frozenset(range(2, 8))


def _shown(text: str) -> str:
    """A card token's first digits: enough to find the line, not the whole token."""
    return text[:8] + "..." if len(text) > 8 else text


def _card_result(line: int, text: str, outcome: int | None, decision_id: str, error: str) -> dict:
    """One line's answer; ``outcome`` None: the line was not sent (``error`` says why)."""
    decision = "ALLOW" if outcome == _ALLOW else "DENY" if outcome in _DENIALS else "-"
    return {"line": line, "token": _shown(text), "decision": "-" if error else decision,
            "outcome": "INVALID" if outcome is None else _outcome_name(outcome), "decision_id": decision_id, "error": error}


def _card_row(r: dict) -> tuple:
    return r["line"], r["token"], r["decision"], r["outcome"], r["decision_id"] or "-", r["error"]


CARD_HEADERS = ("line", "token", "decision", "outcome", "decision id", "problem")


def cmd_check_batch(args) -> int:
    """BatchCheck for a file of card tokens, one a line: in requests of at most the
    contract's limit of tokens; a line that is no token is reported and not sent."""
    from clients.client import MAX_BATCH_TOKENS

    lines, tokens = [], []  # (line number, text, problem) of each line; (index into lines, token) to send
    for number, raw in enumerate(_read_lines(args.cards, "--cards"), 1):
        text = raw.decode("utf-8", "replace").strip()
        if not text:
            continue
        try:
            tokens.append((len(lines), parse_card(text)))
            lines.append((number, text, ""))
        except ValueError as exc:
            lines.append((number, text, str(exc)))
    answers: dict[int, tuple[int, str]] = {}
    if tokens:
        with _client(args) as qj:
            for start in range(0, len(tokens), MAX_BATCH_TOKENS):
                chunk = tokens[start:start + MAX_BATCH_TOKENS]
                batch = qj.check_batch(args.scenario, [t for _, t in chunk])
                for i, (k, _) in enumerate(chunk):
                    answers[k] = (batch.outcome(i), batch.decision_id(i))
    results = []
    for k, (number, text, problem) in enumerate(lines):
        outcome, decision_id = answers.get(k, (None, ""))
        results.append(_card_result(number, text, outcome, decision_id, problem))
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print(table([_card_row(r) for r in results], CARD_HEADERS) if results else f"no card tokens in {args.cards}")
    invalid = [r["line"] for r in results if r["error"]]
    if invalid:
        print(f"error: {len(invalid)} of {len(results)} lines are no card token (lines {_numbers(invalid)})", file=sys.stderr)
    return 1 if invalid else 0


def cmd_check_stream(args) -> int:
    """StreamCheck, a line of --cards at a time, each answer printed as it comes. A line that
    is no card token goes as an empty token, so the server answers it in its place (the
    stream goes on) and the line's own problem is shown."""
    sent: dict[int, tuple[int, str, str]] = {}  # request id -> (line number, text, problem)

    def requests(source):
        request_id = 0  # as the client numbers them
        for number, raw in enumerate(source, 1):
            text = raw.decode("utf-8", "replace").strip()
            if not text:
                continue
            try:
                token, problem = parse_card(text), ""
            except ValueError as exc:
                token, problem = b"", str(exc)
            request_id += 1
            sent[request_id] = (number, text, problem)  # before the request goes: its answer comes after
            yield args.scenario, token

    if args.cards != "-" and Path(args.cards).is_dir():
        raise UsageError(f"--cards {args.cards}: is a directory")
    try:
        source = sys.stdin.fileno() if args.cards == "-" else os.open(args.cards, os.O_RDONLY)
    except OSError as exc:
        raise UsageError(f"--cards {args.cards}: {exc.strerror}") from None
    invalid, answered = [], 0
    try:
        with _client(args) as qj:
            if not args.json:
                print("  ".join(CARD_HEADERS), flush=True)
            for d in qj.check_stream(requests(_lines_as_they_come(source))):
                number, text, problem = sent.pop(d.request_id)
                r = _card_result(number, text, d.outcome, d.decision_id, problem or d.detail)
                answered += 1
                if r["decision"] == "-":
                    invalid.append(number)
                print(json.dumps(r) if args.json else "  ".join(str(c) for c in _card_row(r)), flush=True)
    finally:
        if args.cards != "-":
            os.close(source)
    if invalid:
        print(f"error: {len(invalid)} of {answered} lines got no decision (lines {_numbers(invalid)})", file=sys.stderr)
    return 1 if invalid else 0


def _lines_as_they_come(fd: int):
    """The lines of a file descriptor as they arrive, read without a buffered reader: grpc
    reads the requests on a thread of its own, and one blocked in sys.stdin's reader holds
    its lock, which aborts the interpreter's exit when the stream ends with an error."""
    rest = b""
    while chunk := os.read(fd, 1 << 16):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def _numbers(lines: list[int], most: int = 10) -> str:
    shown = ", ".join(map(str, lines[:most]))
    return shown + (f" and {len(lines) - most} more" if len(lines) > most else "")


def cmd_scenarios(args) -> int:
    with _client(args) as qj:
        scenarios = qj.scenarios()
    rows = [(s.name, s.name_zh, s.min_score, "yes" if s.pay_later else "no") for s in scenarios]
    emit(args, [as_dict(s) for s in scenarios], table(rows, ("scenario", "名称", "min score", "pay later")))
    return 0


def cmd_gate(args) -> int:
    """An offline gate's list (docs/offline_gates.md): fetched and verified with the service's
    public gate key as a gateway would, then its state, and a card's local answer."""
    from clients.gate import Gate, GateError

    with _client(args) as qj:
        gate = Gate(args.public_key, [args.scenario], client=qj, online=False)
        try:
            gate.sync()
        except GateError as exc:
            raise UsageError(f"the list was refused: {exc}") from None
    lst = gate.lists[args.scenario]
    m = lst.manifest
    info = {"scenario": args.scenario, "sequence": lst.sequence, "snapshot_sequence": m["sequence"],
            "allowed": m["allowed"], "enrolled": m["universe"], "levels": len(m["levels"]), "bytes": m["bytes"],
            "expires": dt.datetime.fromtimestamp(lst.expires, dt.timezone.utc).isoformat(timespec="seconds"), "key_id": m["key_id"],
            "expired": gate.expired(args.scenario), "overlay": f"{len(lst.removed)} removed, {len(lst.added)} added"}
    if args.card is not None:
        info["card_allowed"] = gate.check_local(args.scenario, args.card)
    emit(args, info, table([(k, v) for k, v in info.items()]))
    return 0


#: A line of `ingest --file` (what `generate` writes): its required fields, and the optional
#: ones with their defaults (value as --value's).
RECORD_REQUIRED = ("record_id", "citizen_id", "variable", "date")
RECORD_OPTIONAL = {"value": 1.0, "source": "", "scenario": ""}
_RECORD_FIELDS = (*RECORD_REQUIRED, *RECORD_OPTIONAL)


class LineError(ValueError):
    """What is wrong with one line of records; ``record_id`` when the line names one."""

    def __init__(self, problem: str, record_id: str | None = None):
        super().__init__(problem)
        self.record_id = record_id


def _quoted(names) -> str:
    return ", ".join(repr(n) for n in names)


def record_of(line: bytes):
    """The Record of one JSON line; LineError saying what is wrong with it."""
    from clients.client import Record

    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise LineError(f"not UTF-8 text (byte {exc.start + 1})") from None
    except json.JSONDecodeError as exc:
        raise LineError(f"not JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise LineError(f"not a JSON object of record fields but {type(obj).__name__} {json.dumps(obj)[:40]}")
    rid = obj.get("record_id") if isinstance(obj.get("record_id"), str) else None
    unknown = [k for k in obj if k not in _RECORD_FIELDS]
    if unknown:
        raise LineError(f"unknown field{'s' if len(unknown) > 1 else ''} {_quoted(unknown)} "
                        f"(a record has {', '.join(_RECORD_FIELDS)})", rid)
    missing = [k for k in RECORD_REQUIRED if k not in obj]
    if missing:
        raise LineError(f"missing field{'s' if len(missing) > 1 else ''} {_quoted(missing)}", rid)
    fields = {**RECORD_OPTIONAL, **obj}
    for k in (*RECORD_REQUIRED, "source", "scenario"):
        if not isinstance(fields[k], str):
            raise LineError(f"field {k!r}: expected a string, got {json.dumps(fields[k])[:40]}", rid)
    value = fields["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LineError(f"field 'value': expected a number, got {json.dumps(value)[:40]}", rid)
    try:
        check_record_value(float(value))
    except ValueError as exc:
        raise LineError(f"field 'value': {exc}", rid) from None
    try:
        parse_date(fields["date"])
    except ValueError as exc:
        raise LineError(f"field 'date': {exc}", rid) from None
    return Record(**{**fields, "value": float(value)})


#: ErrorInfo reasons of a refused record: the server ends the stream with it
#: (proto/qianjiang/v1/records.proto), and the records after it go on a new stream.
RECORD_REFUSALS = frozenset({"INVALID_ARGUMENT", "UNKNOWN_CITIZEN", "RECORD_CONFLICT", "PERMISSION_DENIED", "STORE_REJECTED"})


def send_records(qj, pending: list[tuple[dict, object]]):
    """Stream ``pending`` ((result, Record)) in order, filling in each result: its ack, or
    the refusal of that one record. Returns the error that ended a stream for every record
    after it (an unreachable server, an unknown caller), or None."""
    from clients.client import QianjiangError
    from qianjiang.v1 import records_pb2

    status = records_pb2.RecordAck.Status.Name
    start = 0
    while start < len(pending):
        done = start
        try:
            for ack in qj.ingest_stream(pending[i][1] for i in range(start, len(pending))):
                pending[done][0].update(status=status(ack.status), detail="", ack=as_dict(ack))
                done += 1
            return None
        except QianjiangError as exc:
            if exc.reason not in RECORD_REFUSALS or done == len(pending):
                return exc
            pending[done][0].update(status=exc.code().name, reason=exc.reason, detail=exc.details())
            start = done + 1
    return None


def cmd_ingest(args) -> int:
    from clients.client import Record
    from qianjiang.v1 import records_pb2

    flags = [f"--{k.replace('_', '-')}" for k in ("record_id", "citizen", "variable", "date") if getattr(args, k)]
    if args.file:
        if flags:
            raise UsageError(f"ingest: give --file or {', '.join(flags)}, not both")
        return ingest_file(args)
    missing = [f"--{k.replace('_', '-')}" for k in ("record_id", "citizen", "variable", "date") if not getattr(args, k)]
    if missing:
        raise UsageError(f"ingest: give --file, or {', '.join(missing)}")
    records = [Record(record_id=args.record_id, citizen_id=args.citizen, variable=args.variable, date=args.date,
                      value=args.value, source=args.source, scenario=args.scenario or "")]
    with _client(args) as qj:
        acks = qj.ingest(records)
    status = records_pb2.RecordAck.Status.Name
    emit(args, [as_dict(a) for a in acks], table([(a.record_id, status(a.status)) for a in acks], ("record", "ack")))
    return 0


def ingest_file(args) -> int:
    """Every record line's result: its ack, or why it was not taken (a line that does not
    parse is not sent; one the server refuses does not stop the ones after it). Exit status
    1 if any record failed, 2 if the server could not be asked about some."""
    results, pending = [], []
    for number, line in enumerate(_read_lines(args.file, "--file"), 1):
        if not line.strip():
            continue
        try:
            record = record_of(line)
        except LineError as exc:
            results.append({"line": number, "record_id": exc.record_id, "status": "INVALID", "detail": str(exc)})
            continue
        results.append({"line": number, "record_id": record.record_id, "status": "NOT_ACKNOWLEDGED", "detail": ""})
        pending.append((results[-1], record))
    ended = None
    if pending:
        with _client(args) as qj:
            ended = send_records(qj, pending)
    if args.json:
        for r in results:
            print(json.dumps(r, ensure_ascii=False))
    else:
        rows = [(r["line"], r["record_id"] or "-", r["status"], r["detail"]) for r in results]
        print(table(rows, ("line", "record", "status", "detail")) if rows else f"no records in {args.file}")
    if ended is not None:
        unacked = [r["line"] for r in results if r["status"] == "NOT_ACKNOWLEDGED"]
        resend = f"; not acknowledged: lines {_numbers(unacked)} (resending is safe: a stored record is a DUPLICATE)"
        print(f"error: {connection_problem(args, ended) or ended}{resend if unacked else ''}", file=sys.stderr)
        return 2
    failed = [r["line"] for r in results if r["status"] not in ("ACCEPTED", "DUPLICATE")]
    if failed:
        print(f"error: {len(failed)} of {len(results)} records failed (lines {_numbers(failed)})", file=sys.stderr)
    return 1 if failed else 0


def cmd_consent(args) -> int:
    if args.until and args.action != "grant":
        raise UsageError("--until: only a grant expires")
    if args.until and not args.purpose:
        raise UsageError("--until: name the purposes it applies to (--purpose); the blanket stands until revoked")
    with _client(args) as qj:
        if args.action == "grant":
            state = qj.grant_consent(args.citizen, args.purpose, args.until or "")
        elif args.action == "revoke":
            state = qj.revoke_consent(args.citizen, args.purpose)
        else:
            state = qj.get_consent(args.citizen)
    rows = [(p.purpose, "yes" if p.authorised else "no", p.setting or "(blanket)", p.expires or "-") for p in state.purposes]
    text = (f"{state.citizen_id}: blanket authorisation {'granted' if state.granted else 'not granted'}\n\n"
            + table(rows, ("purpose", "authorised", "setting", "last day")))
    emit(args, as_dict(state), text)
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
        r = qj.replay_decision(args.decision_id, args.citizen)
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
    rows = [(e.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"), e.caller + (" (you asked)" if e.by_the_citizen else ""),
             e.method, e.scenario, e.result, e.decision_id) for e in entries]
    emit(args, [as_dict(e) for e in entries], table(rows, ("time (UTC)", "caller", "method", "scenario / purpose", "result", "decision id")) if rows else "nobody has checked this citizen")
    return 0


# --- the citizens' rights ------------------------------------------------------------------------


def _when(ts) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC") if ts.seconds or ts.nanos else "-"


def _dispute_text(d) -> str:
    from qianjiang.v1 import rights_pb2

    rows = [("dispute", d.dispute_id), ("citizen", d.citizen_id), ("record", f"{d.source} {d.record_id} ({d.variable})"),
            ("reason", d.reason), ("state", rights_pb2.Dispute.State.Name(d.state) + ("  OVERDUE" if d.overdue else "")),
            ("filed", _when(d.filed_at)), ("answer by", f"{d.due_date} (the end of the day, city time)")]
    if d.suspended_at.seconds:
        rows.append(("suspended", f"{_when(d.suspended_at)}: unanswered past the deadline, the record stopped counting"))
    if d.answered_at.seconds:
        rows += [("answered", f"{_when(d.answered_at)} by {d.answered_by}"), ("answer", d.note)]
    rows.append(("record now", f"{d.record_status}, version {d.record_version}"))
    if d.event_id:
        rows.append(("event id", d.event_id))
    return table(rows)


def _repair_text(r) -> str:
    from qianjiang.v1 import rights_pb2

    rows = [("application", r.repair_id), ("citizen", r.citizen_id),
            ("record", f"{r.source} {r.record_id} ({r.variable}, {r.tier})"), ("statement", r.statement),
            ("state", rights_pb2.RepairApplication.State.Name(r.state) + ("  OVERDUE" if r.overdue else "")),
            ("filed", _when(r.filed_at)), ("decide by", f"{r.due_date} (working days; the end of the day, city time)")]
    if r.escalated_at.seconds:
        rows.append(("escalated", f"{_when(r.escalated_at)}: undecided past the deadline (never approved by default)"))
    if r.decided_at.seconds:
        rows += [("decided", f"{_when(r.decided_at)} by {r.decided_by}"), ("reason", r.decision_reason or "-")]
    rows.append(("record now", f"{r.record_status}, version {r.record_version}"))
    if r.event_id:
        rows.append(("event id", r.event_id))
    return table(rows)


def cmd_records(args) -> int:
    """A citizen's records, with what may be done about each."""
    with _client(args) as qj:
        resp = qj.citizen_records(args.citizen)
    rows = [(r.source, r.record_id, r.variable, r.tier or "-", r.date, f"{r.value:g}", r.status,
             r.open_dispute_id or r.pending_repair_id or "-", r.counts_until or "-", r.repairable_from or "-")
            for r in resp.records]
    emit(args, as_dict(resp), table(rows, ("source", "record", "variable", "tier", "date", "value", "status",
                                           "open procedure", "counts until", "repairable from"))
         if rows else "no records")
    return 0


def cmd_dispute_file(args) -> int:
    with _client(args) as qj:
        d = qj.file_dispute(args.citizen, args.source, args.record_id, args.reason)
    emit(args, as_dict(d), _dispute_text(d))
    return 0


def cmd_dispute_list(args) -> int:
    from qianjiang.v1 import rights_pb2

    with _client(args) as qj:
        found = qj.list_disputes(args.citizen, args.source, args.open, args.limit)
    rows = [(d.dispute_id, d.citizen_id, d.source, d.record_id, d.variable,
             rights_pb2.Dispute.State.Name(d.state) + (" OVERDUE" if d.overdue else ""), d.due_date, d.record_status)
            for d in found]
    emit(args, [as_dict(d) for d in found],
         table(rows, ("dispute", "citizen", "source", "record", "variable", "state", "answer by", "record now"))
         if rows else "no disputes")
    return 0


def cmd_dispute_answer(args) -> int:
    if args.answer == "correct" and (not args.date or args.value is None):
        raise UsageError("correct: give --date and --value, the record's corrected date and value")
    if args.answer != "correct" and (args.date or args.value is not None):
        raise UsageError(f"{args.answer}: --date and --value are for correct only")
    with _client(args) as qj:
        d = qj.answer_dispute(args.dispute_id, args.answer, args.note, date=args.date or "", value=args.value or 0.0,
                              source=args.source)
    emit(args, as_dict(d), _dispute_text(d) + "\nthe citizen was re-scored")
    return 0


def cmd_repair_apply(args) -> int:
    with _client(args) as qj:
        r = qj.apply_repair(args.citizen, args.source, args.record_id, args.statement)
    emit(args, as_dict(r), _repair_text(r))
    return 0


def cmd_repair_list(args) -> int:
    from qianjiang.v1 import rights_pb2

    with _client(args) as qj:
        found = qj.list_repairs(args.citizen, args.source, args.pending, args.limit)
    rows = [(r.repair_id, r.citizen_id, r.source, r.record_id, r.variable, r.tier,
             rights_pb2.RepairApplication.State.Name(r.state) + (" OVERDUE" if r.overdue else ""), r.due_date)
            for r in found]
    emit(args, [as_dict(r) for r in found],
         table(rows, ("application", "citizen", "source", "record", "variable", "tier", "state", "decide by"))
         if rows else "no applications")
    return 0


def cmd_repair_decide(args) -> int:
    if args.decision == "reject" and not args.reason.strip():
        raise UsageError("reject: give --reason, the source's reason to the citizen")
    with _client(args) as qj:
        r = qj.decide_repair(args.repair_id, args.decision == "approve", args.reason, source=args.source)
    emit(args, as_dict(r), _repair_text(r) + "\nthe citizen was re-scored")
    return 0


def cmd_test_clock(args) -> int:
    seconds = args.days * 86_400 + args.seconds
    if seconds <= 0:
        raise UsageError("give --days or --seconds: how far forward to move the rights clock")
    with _client(args) as qj:
        c = qj.advance_test_clock(seconds)
    emit(args, as_dict(c), f"rights clock now {_when(c.now)} ({c.today} in the city), {c.offset_seconds} s ahead")
    return 0


def cmd_certs(args) -> int:
    from server import tls

    argv = ["--out", args.out] + (["--force"] if args.force else [])
    for caller in args.caller or []:
        argv += ["--caller", caller]
    try:
        return tls.main(argv)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: {exc.strerror}: {exc.filename}") from None


def cmd_health(args) -> int:
    import grpc

    from clients.client import QianjiangError

    with _client(args) as qj:
        try:
            status = qj.health(args.service)
        except QianjiangError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            raise UsageError(f"--service {args.service!r}: the server reports on no such service "
                             "(e.g. qianjiang.v1.EligibilityService; default: the whole server)") from None
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
        seed_citizens=args.seed_citizens, seed=args.seed, production=args.production, city_timezone=args.city_timezone,
        security=args.security, tokens_path=args.tokens, cert_dir=args.certs, policy_path=args.policy,
        audit=not args.no_audit, event_loop=args.event_loop, audit_max_pending=args.audit_max_pending,
        batch_tokens_per_second=args.batch_tokens_per_second, purposes_path=args.purposes,
        snapshot_seconds=args.snapshot_interval,
        gate_delta_seconds=args.gate_delta_interval, gate_valid_seconds=args.gate_valid, gate_dir=args.gate_dir,
        rights_path=args.rights_config, test_clock=args.test_clock,
        replica=args.replica, replica_max_lag_seconds=args.replica_max_lag, audit_dir=args.audit_dir,
    )


def _at_least(low: int, high: int | None = None):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        if high is not None and n > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {n}")
        return n

    return parse


def _rate(value: str) -> float:
    try:
        r = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (math.isfinite(r) and r >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return r


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
    from server.store import StoreError

    try:  # the example citizen and card only on a terminal, never into a log (server/app.py start_banner)
        serve(serve_config(args), on_ready=announce)
    except (ValueError, StoreError) as exc:  # configuration (each names its file, key or option) or an unreachable store
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


#: A synthetic citizen's id (server/app.py citizen_id), or just its row number.
_SYNTHETIC_CITIZEN = re.compile(r"c?([0-9]{1,9})")


def cmd_token(args) -> int:
    """The synthetic city's card token of a seeded citizen (for trying the service): the
    keyed hash of its synthetic card number, with the key of --data-dir. Only a token the
    store binds to that citizen: a key made here, or a citizen that is not there, would give
    a token of no card, and every check of it would say UNKNOWN_CARD."""
    import numpy as np

    from server.app import citizen_id
    from server.keys import card_token, existing_card_key, synthetic_card_number
    from server.store import NotFound, StoreError, open_store

    found = _SYNTHETIC_CITIZEN.fullmatch(args.citizen)
    if not found:
        raise UsageError(f"token: {args.citizen!r} is not a synthetic citizen id (c and 8 digits, e.g. c00000003)")
    row = int(found[1])
    cid = citizen_id(row)
    keys = Path(args.data_dir) / "keys"
    try:
        key = existing_card_key(Path(args.data_dir))
    except FileNotFoundError:
        raise UsageError(f"no keys in {keys}: start the server once on this data directory, or give --data-dir") from None
    except ValueError as exc:  # QJ_CARD_KEY, or a key file, that is not hex
        raise UsageError(f"the card-token key: {exc}") from None
    token = card_token(key, synthetic_card_number(row))
    db = Path(args.data_dir).resolve() / "qianjiang.db"
    if not args.store and not db.exists():
        raise UsageError(f"no store at {db}: start the server once on this data directory, or give --store")
    url = _store_url(args)
    try:
        store = open_store(url)
        try:
            owner = store.citizen_row(cid)
            cards = store.cards()
        finally:
            store.close()
    except NotFound:
        raise UsageError(f"no citizen {cid} in the store {url}") from None
    except StoreError as exc:
        raise UsageError(f"the store {url}: {exc}") from None
    holders = cards.citizen_row[(cards.tokens == np.frombuffer(token, np.uint8)).all(axis=1)]
    if owner not in holders:
        raise UsageError(f"{cid} holds no synthetic card keyed with {keys}: not seeded with this data directory's keys")
    emit(args, {"citizen_id": cid, "card_token": token.hex()}, token.hex())
    return 0


def cmd_generate(args) -> int:
    """Write a synthetic city's records as JSON lines (the format `ingest --file` reads), or
    with --partitions its features as a population directory for `batch rescore`."""
    from kernel.synthetic import generate_city
    from server.app import citizen_id
    from server.state import iso_of, today

    spec = _spec(args.spec)
    if args.partitions is not None:
        return _generate_partitions(args, spec)
    city = generate_city(spec, args.citizens, seed=args.seed, as_of_day=today(), progress=None)
    recs = city.records
    try:
        out = sys.stdout if args.out == "-" else open(args.out, "w")
    except OSError as exc:
        raise UsageError(f"--out {args.out}: {exc.strerror}") from None
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


def _generate_partitions(args, spec) -> int:
    from kernel.batch import BatchError
    from kernel.synthetic import generate_partitions

    if args.out == "-":
        raise UsageError("--partitions writes a directory: give --out DIR")
    try:
        manifest = generate_partitions(spec, args.citizens, args.out, args.partitions, seed=args.seed,
                                       overwrite=args.overwrite)
    except BatchError as exc:
        raise UsageError(str(exc)) from None
    emit(args, _population_summary(args.out, manifest),
         f"{manifest['rows']:,} people in {manifest['partitions']} parts at {args.out} (as of {manifest['as_of']}, "
         f"model {manifest['model_version']})")
    return 0


def _population_summary(out, manifest: dict) -> dict:
    return {"out": str(out), **{k: manifest[k] for k in ("rows", "partitions", "as_of", "as_of_day", "model_version")}}


def cmd_export(args) -> int:
    """The store's population as Parquet parts with a manifest (kernel/batch.py)."""
    from kernel.batch import BatchError
    from server.city_time import today
    from server.export import export_population
    from server.scenarios import load_scenarios
    from server.state import day_of
    from server.store import StoreError, open_store

    spec = _spec(args.spec)
    day = day_of(args.as_of) if args.as_of else today()
    if day > today():
        raise UsageError(f"--as-of {args.as_of}: in the future (the store knows nothing after today)")
    url = _store_url(args)
    try:
        store = open_store(url)
    except StoreError as exc:
        raise UsageError(f"the store {url}: {exc}") from None
    try:
        manifest = export_population(store, spec, args.out, args.partitions, load_scenarios(args.scenarios),
                                     as_of_day=day, overwrite=args.overwrite)
    except BatchError as exc:
        raise UsageError(str(exc)) from None
    finally:
        store.close()
    emit(args, _population_summary(args.out, manifest),
         f"exported {manifest['rows']:,} citizens in {manifest['partitions']} parts to {args.out} "
         f"(as of {manifest['as_of']}, model {manifest['model_version']}, store position {manifest['source']['position']})")
    return 0


def cmd_batch_rescore(args) -> int:
    """Score and calibrate a population directory on Dask (kernel/batch.py)."""
    from kernel.batch import BatchError, rescore, rescore_local
    from kernel.calibration import CalibrationError
    from server.models import load_calibration

    spec = _spec(args.spec)
    if args.scheduler and args.workers:
        raise UsageError("--workers sizes the local cluster: not with --scheduler")
    if args.local and (args.scheduler or args.workers):
        raise UsageError("--local runs in this process: not with --scheduler or --workers")
    log = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr))
    import distributed  # noqa: F401  (its import sets its loggers' levels: quieten them after it)

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO is a line per worker event
    try:
        table = load_calibration(args.calibration, spec) if args.calibration else None
        if args.local:
            result = rescore_local(args.input, args.out, spec, table, threads=args.threads, overwrite=args.overwrite)
        else:
            result = rescore(args.input, args.out, spec, table, scheduler=args.scheduler, workers=args.workers,
                             threads_per_worker=args.threads_per_worker, threads=args.threads,
                             progress=not args.no_progress and not args.json, overwrite=args.overwrite, log=log)
    except (BatchError, CalibrationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        print("no result was written (a job writes --out whole or not at all)", file=sys.stderr)
        return 1
    doc = result.manifest
    obj = {k: doc[k] for k in ("rows", "model_version", "calibration_version", "as_of_day", "levels", "cluster",
                               "workers_lost", "seconds") if k in doc}
    obj["out"] = str(args.out)
    obj["calibration_file"] = str(Path(args.out) / doc["calibration"]) if doc["calibration"] else None
    lines = [f"scored {doc['rows']:,} citizens in {len(doc['parts'])} parts in {result.seconds:.1f} s ({doc['cluster']})",
             f"model {doc['model_version']}, calibration {doc['calibration_version']} "
             f"({doc['calibration_total']:,} adults)"]
    lines += [f"  {code:<18} {count:>12,}" for code, count in doc["levels"].items()]
    if doc.get("workers_lost"):
        lines.append(f"{doc['workers_lost']} worker(s) lost during the run; their tasks were run again")
    if doc["calibration"]:
        lines.append(f"stage it with: qjscore model stage --calibration {obj['calibration_file']}"
                     + (f" {args.spec}" if args.spec else ""))
    emit(args, obj, "\n".join(lines))
    return 0


def _spec(path: str | None):
    """The model spec at --spec (default: the default model's, kernel/models/v2.toml)."""
    from kernel.spec import SpecError, load_spec

    try:
        return load_spec(path)
    except OSError as exc:
        raise UsageError(f"--spec {path}: {exc.strerror}") from None
    except SpecError as exc:
        raise UsageError(f"--spec {path}: {exc}") from None


def cmd_calibrate(args) -> int:
    from kernel import calibrate

    _spec(args.spec)  # a bad spec before a million synthetic people are made
    argv = ["--citizens", str(args.citizens), "--seed", str(args.seed)]
    for flag, value in (("--out", args.out), ("--png", args.png), ("--spec", args.spec)):
        if value:
            argv += [flag, value]
    if args.json:
        argv.append("--json")
    try:
        calibrate.main(argv)
    except OSError as exc:  # --out or --png
        raise UsageError(f"{exc.filename}: {exc.strerror}") from None
    return 0


# --- fairness (kernel/fairness.py) ----------------------------------------------------------------


def _fairness_city_options(p) -> None:
    p.add_argument("--fairness-citizens", type=_at_least(1), default=400_000, metavar="N",
                   help="people in the synthetic city of the release's fairness audit")
    p.add_argument("--fairness-seed", type=int, default=11, help="its random seed")


def cmd_fairness(args) -> int:
    """The fairness audit of a spec or a staged release; exit 1 when it fails the four-fifths rule."""
    from kernel.calibration import CalibrationError, reference_table
    from kernel.fairness import audit_city
    from server.models import RELEASE_ID_RE, ModelRegistry, RegistryError
    from server.scenarios import ScenarioConfigError, load_scenarios

    try:
        scenarios = load_scenarios(args.scenarios)
    except (OSError, ScenarioConfigError) as exc:
        raise UsageError(f"--scenarios {args.scenarios}: {exc}") from None
    if args.model is not None and RELEASE_ID_RE.match(args.model):
        try:
            spec, table = ModelRegistry(args.data_dir).release(args.model)
        except (RegistryError, CalibrationError, ValueError) as exc:
            raise UsageError(f"--model {args.model}: {exc}") from None
        where = f"release {args.model}"
    else:
        spec = _spec(args.model)
        try:
            table = reference_table(spec, args.model)
            where = "its reference calibration"
        except CalibrationError:
            table, where = None, "a calibration frozen from this city"
    report = audit_city(spec, table, scenarios, args.citizens, args.seed)
    text = report.format() + f"\n(scored with {where})"
    if args.out:
        try:
            paths = report.write(args.out)
        except OSError as exc:
            raise UsageError(f"--out {args.out}: {exc.strerror}") from None
        text += "\n" + "\n".join(f"{kind:<5} {path}" for kind, path in paths.items())
    emit(args, report.to_dict(), text)
    return 0 if report.passed else 1


# --- model releases (local: the registry in --data-dir) ------------------------------------------


def _store_url(args) -> str:
    if args.store:
        return args.store
    db = Path(args.data_dir).resolve() / "qianjiang.db"
    if not db.exists():
        raise UsageError(f"no store at {db}: start the server once on this data directory, or give --store")
    return f"sqlite:///{db}"


def _tell_server(args, registry, done: str) -> int:
    """SIGHUP the data directory's server and wait for its acknowledgement (models/SERVED):
    report the switch only when the server says it serves the active release. Exit 0 when it
    does (or no server runs: the next start serves it), 1 when it refused or did not answer."""
    from server.models import server_pid, signal_server, wait_for_served

    active = registry.active()
    before = registry.served()
    pid = server_pid(args.data_dir)
    signalled = pid is not None and signal_server(args.data_dir)
    ack = wait_for_served(registry, before["seq"] if before else 0, pid, args.wait) if signalled else None
    if not signalled:
        note, code = f"no running server on {args.data_dir}: the next start serves {active}", 0
    elif ack is None:
        note, code = (f"NOT CONFIRMED: the server (pid {pid}) did not acknowledge within {args.wait:g} s (a large city "
                      "takes longer to prepare: see `qjscore model status` and the server's log)"), 1
    elif ack["release"] == active:
        note, code = f"the server (pid {pid}) now serves {active}", 0
    else:
        note, code = (f"NOT SWITCHED: the server (pid {pid}) {ack['result']} the switch to {ack['requested']}: "
                      f"{ack.get('error') or 'see its log'}; it still serves {ack['release']}"), 1
    obj = {"active": active, "previous": registry.previous(), "server_pid": pid if signalled else None,
           "signalled": signalled, "acknowledged": ack, "serving": ack["release"] if ack else None}
    emit(args, obj, table([("done", done), ("active", active), ("previous", obj["previous"] or "-"), ("server", note)]))
    return code


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
    served = reg.served() if pid else None
    serving = served["release"] if served and served.get("pid") == pid else None
    obj = {"active": active, "previous": previous, "server_pid": pid, "serving": serving, "releases": releases,
           "history": reg.history(10)}
    text = table([("active", active or "- (none yet: the server registers one at first start)"),
                  ("previous", previous or "-"),
                  ("server", (f"pid {pid}, serving {serving or '(not acknowledged yet)'}"
                              + (" -- NOT the active release" if serving and serving != active else "")) if pid else "not running")])
    if rows:
        text += "\n\n" + table(rows, ("release", "", "staged (UTC)", "PSI raw", "level changes", "compared with"))
    emit(args, obj, text)
    return 0


def cmd_model_stage(args) -> int:
    from server.models import ModelRegistry
    from server.scenarios import load_scenarios
    from server.store import open_store

    reg = ModelRegistry(args.data_dir, args.fairness_citizens, args.fairness_seed)
    reg.adopt_legacy()  # a data directory from before the registry: its v1 calibration is the active release
    store = open_store(_store_url(args))
    try:
        rid, report = reg.stage(args.spec, args.calibration, store=store, scenarios=load_scenarios(args.scenarios))
    finally:
        store.close()
    fairness = reg.fairness(rid)
    obj = {"release_id": rid, "active": reg.active(), "report": report.to_dict() if report else None,
           "fairness": fairness.summary(), "fairness_report": str(reg.path(rid) / "fairness.html")}
    text = f"staged    {rid}\n" + (report.format() if report else "nothing is active yet: no comparison")
    text += f"\n\n{fairness.format()}\nfairness report: {reg.path(rid) / 'fairness.html'}"
    more = f" --data-dir {args.data_dir}" if args.data_dir != "data" else ""
    if not fairness.passed:
        more += " --reason TEXT  (it fails the four-fifths rule: activation needs a reason)"
    text += f"\n\nactivate with: qjscore model activate {rid}" + more
    emit(args, obj, text)
    return 0


def cmd_model_activate(args) -> int:
    from server.models import ModelRegistry

    reg = ModelRegistry(args.data_dir, args.fairness_citizens, args.fairness_seed)
    reg.adopt_legacy()
    before = reg.activate(args.release, reason=args.reason)
    done = f"{args.release} is already active" if before == args.release else f"activated {args.release}"
    if before != args.release and args.reason:
        done += f" (reason: {args.reason})"
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


class _Help(argparse.HelpFormatter):
    """Every option's help shows its default: the help says it (``%(default)s``), or it is
    added at the end."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "%(default)" not in text and default is not None and default is not False
                and default != "" and default is not argparse.SUPPRESS):
            text += " (default %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands' parsers (its own class) show defaults too."""

    def __init__(self, *args, formatter_class=_Help, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="qjscore", description="Qianjiang Score service: serve it, query it, feed it.")
    sub = ap.add_subparsers(dest="command", required=True)

    def client_cmd(name, fn, help, within=None):
        p = (within or sub).add_parser(name, help=help)
        p.add_argument("--target", type=_arg(parse_target), default=DEFAULT_TARGET,
                       help="host:port of the service ($QJ_TARGET sets the default)")
        p.add_argument("--timeout", type=_arg(parse_timeout), default=5.0, metavar="SECONDS",
                       help="deadline of each call (a stream's: 100 times it)")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.add_argument("--token", help="development bearer token (default: $QJ_TOKEN)")
        p.add_argument("--certs", metavar="DIR",
                       help="TLS: the directory with ca.pem (the server's CA) and the caller's <caller>.pem/.key "
                            "(default: plain text)")
        p.add_argument("--caller", type=_arg(parse_caller), metavar="IDENTITY",
                       help="mutual TLS: present the certificate DIR/<caller>.pem and its key (needs --certs)")
        p.add_argument("--end-user-key", metavar="PEM",
                       help="a citizen app's Ed25519 key (default: $QJ_END_USER_KEY): calls about a citizen are bound "
                            "to the citizen they name, signed for the app (development servers make one in "
                            "DATA/keys/end_user/)")
        p.add_argument("--end-user-issuer", default="citizen_app", metavar="IDENTITY",
                       help="the citizen app the end-user key signs for, when --caller does not say")
        p.set_defaults(fn=fn)
        return p

    citizen = "the citizen's id, e.g. c00000003"
    source = "the record's source (default: the caller's own identity)"
    purpose = "why the score is read (audited); config/purposes.toml lists them"
    cards = "card tokens, 32 hex digits a line ('-': stdin)"
    p = client_cmd("score", cmd_score, "a citizen's score, level, dimensions and reasons")
    p.add_argument("citizen", help=citizen)
    p.add_argument("--purpose", default="citizen_app_view", help=purpose)
    p = client_cmd("explain", cmd_explain, "the score with every variable's weight, feature and points")
    p.add_argument("citizen", help=citizen)
    p.add_argument("--purpose", default="citizen_app_view", help=purpose)
    p = client_cmd("whatif", cmd_whatif, "what if: the score after records repaired or added (never stored), "
                                         "and the fewest actions to the next level")
    p.add_argument("citizen", help=citizen)
    p.add_argument("--repair", action="append", default=[], type=_arg(parse_repaired), metavar="[SOURCE/]RECORD_ID",
                   help="as if this record of the citizen's were repaired (repeatable)")
    p.add_argument("--repair-all", action="append", default=[], metavar="VARIABLE",
                   help="as if every active record of this variable were repaired, e.g. tax_arrears (repeatable)")
    p.add_argument("--add", action="append", default=[], type=_arg(parse_added), metavar="VARIABLE=VALUE[@DATE]",
                   help="as if such a record had arrived (today by default), e.g. volunteer_hours=20 (repeatable)")
    p.add_argument("--next-level", action="store_true", help="also find the fewest actionable changes to the next level")
    p.add_argument("--purpose", default="citizen_app_view", help=purpose)
    p = client_cmd("check", cmd_check, "an eligibility decision for a card in a scenario")
    p.add_argument("scenario", help="e.g. campus_fitness (qjscore scenarios lists them)")
    p.add_argument("--card", required=True, type=_arg(parse_card), help="the card token, 32 hex digits")
    p = client_cmd("check-batch", cmd_check_batch, "a gateway's batch: a decision for every card token of a file (BatchCheck)")
    p.add_argument("scenario", help="the scenario of every token, e.g. metro_pay_later")
    p.add_argument("--cards", required=True, metavar="FILE", help=cards)
    p = client_cmd("check-stream", cmd_check_stream, "a gateway's stream: a decision for each card token line as it comes (StreamCheck)")
    p.add_argument("scenario", help="the scenario of every token, e.g. metro_pay_later")
    p.add_argument("--cards", required=True, metavar="FILE", help=cards)
    client_cmd("scenarios", cmd_scenarios, "the scenarios and their thresholds")
    p = client_cmd("gate", cmd_gate, "an offline gate's list of a pay-later scenario, fetched and verified (GateService)")
    p.add_argument("scenario", help="a pay-later scenario, e.g. metro_pay_later")
    p.add_argument("--public-key", required=True, metavar="PEM",
                   help="the service's public gate key (<data-dir>/keys/gate_signing.pub)")
    p.add_argument("--card", type=_arg(parse_card), help="also the list's answer for this card token, 32 hex digits")
    p = client_cmd("ingest", cmd_ingest, "send records (one by flags, or JSON lines with --file)")
    p.add_argument("--file", help="JSON lines of records ('-': stdin), each with record_id, citizen_id, variable, date and "
                                  "optionally value (default 1), source, scenario; every line's result is printed")
    p.add_argument("--record-id", help="the record's id, unique within its source")
    p.add_argument("--citizen", help=citizen)
    p.add_argument("--variable", help="a model variable, e.g. utility_arrears_serious")
    p.add_argument("--date", type=_arg(parse_date), help="the event's date, YYYY-MM-DD, not in the future")
    p.add_argument("--value", type=_arg(parse_record_value), default=1.0, help="amount (hours, months, ...): 1 for a plain event")
    p.add_argument("--source", default="", help=source)
    p.add_argument("--scenario", help="pay-later scenario of an unpaid default")
    p = client_cmd("consent", cmd_consent, "grant, revoke or show a citizen's authorisation, of everything or by purpose")
    p.add_argument("action", choices=("grant", "revoke", "show"), help="grant, revoke, or show it as it stands")
    p.add_argument("citizen", help=citizen)
    p.add_argument("--purpose", action="append", default=[], metavar="NAME",
                   help="a scenario or read purpose, e.g. metro_pay_later (repeatable; none: every purpose at once)")
    p.add_argument("--until", type=_arg(parse_date), metavar="YYYY-MM-DD",
                   help="a grant of the named purposes holds until this day (city calendar); default: until revoked")
    p = client_cmd("withdraw", cmd_withdraw, "withdraw a record, or mark it repaired (--repaired)")
    p.add_argument("record_id", help="the record's id")
    p.add_argument("--repaired", action="store_true", help="credit repair: the citizen remedied it (default: withdrawn as an error)")
    p.add_argument("--source", default="", help=source)
    p = client_cmd("correct", cmd_correct, "correct a record's date and value (a new version)")
    p.add_argument("record_id", help="the record's id")
    p.add_argument("--date", required=True, type=_arg(parse_date), help="the event's date, YYYY-MM-DD, not in the future")
    p.add_argument("--value", required=True, type=_arg(parse_record_value), help="the new amount, a finite number >= 0")
    p.add_argument("--source", default="", help=source)
    p = client_cmd("history", cmd_history, "every version of a record: when received, who sent it")
    p.add_argument("record_id", help="the record's id")
    p.add_argument("--source", default="", help=source)
    p = client_cmd("replay", cmd_replay, "an appeal: recompute a past decision from the record history (exit 1 if it differs)")
    p.add_argument("decision_id", help="a decision's or a score disclosure's id, e.g. d-4ac28e248e3f9eb40e54ceb86ad3b9a8")
    p.add_argument("--citizen", default="", help="the citizen the decision is about (a citizen app's call is bound to them)")
    p = client_cmd("checks", cmd_checks, "who checked a citizen: the audit log's disclosures about them")
    p.add_argument("citizen", help=citizen)
    p.add_argument("--limit", type=_at_least(0, 1000), default=100, help="the most entries to list, newest first (at most 1000)")
    # the citizens' rights: a citizen's records, disputes, credit repair (RightsService)
    p = client_cmd("records", cmd_records, "a citizen's records: status, open dispute or repair, when repairable")
    p.add_argument("citizen", help=citizen)
    group = sub.add_parser("dispute", help="disputes: a citizen files, a record's source answers within 20 days")
    dispute = group.add_subparsers(dest="dispute_command", required=True)
    p = client_cmd("file", cmd_dispute_file, "dispute one of a citizen's records (a citizen app)", dispute)
    p.add_argument("citizen", help=citizen)
    p.add_argument("--source", required=True, help="the record's source, e.g. police")
    p.add_argument("--record-id", required=True, help="the record's id at its source (qjscore records lists them)")
    p.add_argument("--reason", required=True, help="why the record is wrong (at most 500 characters)")
    p = client_cmd("list", cmd_dispute_list, "a citizen's disputes, or those of the caller's records (a source)", dispute)
    p.add_argument("--citizen", default="", help=citizen)
    p.add_argument("--source", default="", help="a source's records (a source: its own, the default)")
    p.add_argument("--open", action="store_true", help="only the disputes waiting for an answer")
    p.add_argument("--limit", type=_at_least(0, 1000), default=100, help="the most to list, newest first")
    p = client_cmd("answer", cmd_dispute_answer, "the record's source answers a dispute (once)", dispute)
    p.add_argument("dispute_id", help="the dispute, e.g. dsp-3f9c...")
    p.add_argument("answer", choices=("confirm", "correct", "withdraw"),
                   help="confirm: the record stands; correct: a new version (--date, --value); withdraw: it goes")
    p.add_argument("--note", required=True, help="the answer to the citizen (at most 500 characters)")
    p.add_argument("--date", type=_arg(parse_date), default=None, help="correct: the record's date, YYYY-MM-DD")
    p.add_argument("--value", type=_arg(parse_record_value), default=None, help="correct: the record's value")
    p.add_argument("--source", default="", help=source)
    group = sub.add_parser("repair", help="credit repair: a citizen applies, the record's source decides in 5 working days")
    repair = group.add_subparsers(dest="repair_command", required=True)
    p = client_cmd("apply", cmd_repair_apply, "apply to repair one of a citizen's negative records (a citizen app)", repair)
    p.add_argument("citizen", help=citizen)
    p.add_argument("--source", required=True, help="the record's source, e.g. tax_bureau")
    p.add_argument("--record-id", required=True, help="the record's id at its source (qjscore records lists them)")
    p.add_argument("--statement", required=True, help="how it was remedied, e.g. arrears paid (at most 1000 characters)")
    p = client_cmd("list", cmd_repair_list, "a citizen's applications, or those for the caller's records (a source)", repair)
    p.add_argument("--citizen", default="", help=citizen)
    p.add_argument("--source", default="", help="a source's records (a source: its own, the default)")
    p.add_argument("--pending", action="store_true", help="only the applications waiting for a decision")
    p.add_argument("--limit", type=_at_least(0, 1000), default=100, help="the most to list, newest first")
    p = client_cmd("decide", cmd_repair_decide, "the record's source decides an application (once)", repair)
    p.add_argument("repair_id", help="the application, e.g. rep-9a0b...")
    p.add_argument("decision", choices=("approve", "reject"), help="approve: the record is repaired; reject: --reason")
    p.add_argument("--reason", default="", help="why (required to reject; at most 500 characters)")
    p.add_argument("--source", default="", help=source)
    p = client_cmd("test-clock", cmd_test_clock, "development: move a --test-clock server's rights clock forward")
    p.add_argument("--days", type=_at_least(0, 1098), default=0, help="days forward")
    p.add_argument("--seconds", type=_at_least(0), default=0, help="and seconds forward")
    p = client_cmd("health", cmd_health, "the server's health status")
    p.add_argument("--service", default="", help="one service, e.g. qianjiang.v1.EligibilityService (default: the whole server)")

    p = sub.add_parser("serve", help="run the service")
    p.add_argument("--data-dir", default="data", help="where the server keeps its store, keys, audit log and model registry")
    p.add_argument("--store", default=None, help="store URL: sqlite:///path or postgresql://user@host/db (default sqlite:///<data-dir>/qianjiang.db)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (the insecure mode: loopback only)")
    p.add_argument("--port", type=_at_least(0, 65535), default=50051, help="port to listen on (0: any free one)")
    p.add_argument("--metrics-port", type=_at_least(0, 65535), default=9464, help="Prometheus endpoint (0: off)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address the Prometheus endpoint (plain HTTP, no authentication) listens on")
    p.add_argument("--workers", type=_at_least(1), default=1, help="processes sharing the port (SO_REUSEPORT)")
    p.add_argument("--threads", type=_at_least(1), default=16, help="handler threads per worker")
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
    p.add_argument("--production", action="store_true",
                   help="the production stance: never seeds a synthetic city, refuses --security insecure; "
                        "an empty store serves an empty city and says so")
    p.add_argument("--city-timezone", default="Asia/Shanghai", metavar="ZONE",
                   help="the city's time zone (IANA name): its calendar days are the days of ages, record ageing "
                        "and the daily refresh")
    p.add_argument("--seed-citizens", type=_at_least(0), default=0, metavar="N",
                   help="development only: seed an EMPTY store with a synthetic city of N people "
                        "(default %(default)s: never; `make run` asks for 100000)")
    p.add_argument("--seed", type=int, default=2018, help="the synthetic city's random seed")
    p.add_argument("--security", choices=("insecure", "token", "mtls"), default="insecure",
                   help="insecure: loopback only, no authentication (development); token: bearer tokens; mtls: client certificates")
    p.add_argument("--tokens", help="TOML file of development bearer tokens: '<token>' = '<caller identity>'")
    p.add_argument("--certs", help="directory of ca.pem, server.pem, server.key (qjscore certs makes one)")
    p.add_argument("--policy", help="caller policy (default config/policy.toml)")
    p.add_argument("--no-audit", action="store_true", help="turn the audit log off (only to measure its cost)")
    p.add_argument("--audit-max-pending", type=_at_least(1), default=1_000_000,
                   help="disclosures a worker may hold before they are on disk; past it they are refused with "
                        "UNAVAILABLE, never answered unaudited (default %(default)s)")
    p.add_argument("--batch-tokens-per-second", type=_rate, default=200_000.0,
                   help="card tokens a second one caller may send in batch checks, per worker; beyond it "
                        "RESOURCE_EXHAUSTED CALLER_QUOTA (0: no limit; not applied in the insecure mode; "
                        "default %(default)s)")
    p.add_argument("--purposes", help="the purposes a score may be read for (default config/purposes.toml)")
    p.add_argument("--rights-config", default=None, metavar="FILE",
                   help="disputes' and credit repair's deadlines, tier rules and working-day calendar "
                        "(default config/rights.toml)")
    p.add_argument("--test-clock", action="store_true",
                   help="development and tests only: let RightsService/AdvanceTestClock (qjscore test-clock) move the "
                        "rights clock forward; --production refuses it")
    p.add_argument("--gate-delta-interval", type=_seconds, default=300.0, metavar="SECONDS",
                   help="offline gates (docs/offline_gates.md): publish each pay-later scenario's signed delta of the "
                        "cards allowed this often (0: no offline lists; default %(default)s)")
    p.add_argument("--gate-valid", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="how long a gate may decide from a list after its newest snapshot or delta was made; past it "
                        "the gate fails closed (default %(default)s)")
    p.add_argument("--gate-dir", type=Path, default=None, metavar="DIR",
                   help="where offline gates' lists are published and served from (default DATA_DIR/gate); replicas "
                        "share one: one node publishes, the others run with --gate-delta-interval 0 and serve it")
    p.add_argument("--snapshot-interval", type=_seconds, default=600.0, metavar="SECONDS",
                   help="write the serving state's snapshot this often, and at every clean stop, so that a start "
                        "maps it instead of loading the whole city (0: only at a clean stop; default %(default)s)")
    p.add_argument("--replica", action="store_true",
                   help="one of several nodes serving one PostgreSQL store: follow its change log (LISTEN/NOTIFY) so "
                        "writes through any node reach this one's memory (docs/replicas.md; not with SQLite)")
    p.add_argument("--replica-max-lag", type=_seconds, default=1.0, metavar="SECONDS",
                   help="a replica not confirmed current for this long reports NOT_SERVING on grpc.health.v1, so the "
                        "front stops sending it checks (default %(default)s)")
    p.add_argument("--audit-dir", type=Path, default=None, metavar="DIR",
                   help="the audit log's directory (default DATA_DIR/audit); replicas on one host share one, so "
                        "'who checked me' is complete whichever node served the check")
    p.set_defaults(fn=cmd_serve)

    spec = "model spec TOML (default: the default model, kernel/models/v2.toml)"
    p = sub.add_parser("certs", help="make a development CA and certificates for the server and callers")
    p.add_argument("--out", default="data/certs", metavar="DIR", help="directory for ca, server and <caller> .pem/.key")
    p.add_argument("--caller", action="append", type=_arg(parse_caller), metavar="IDENTITY",
                   help="a caller identity (repeatable; default: the policy's examples)")
    p.add_argument("--force", action="store_true", help="replace an existing CA (every certificate it signed stops working)")
    p.set_defaults(fn=cmd_certs)

    p = sub.add_parser("token", help="the card token of a seeded synthetic citizen")
    p.add_argument("citizen", help="a seeded citizen's id, e.g. c00000003")
    p.add_argument("--data-dir", default="data", help="the server's data directory: its keys are <data-dir>/keys")
    p.add_argument("--store", default=None, help="store URL (default sqlite:///<data-dir>/qianjiang.db)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the token alone")
    p.set_defaults(fn=cmd_token)

    p = sub.add_parser("generate", help="write a synthetic city's records as JSON lines")
    p.add_argument("--citizens", type=_at_least(1), default=1000, metavar="N", help="people in the synthetic city")
    p.add_argument("--seed", type=int, default=2018, help="the synthetic city's random seed")
    p.add_argument("--spec", default=None, help=spec)
    p.add_argument("--out", default="-", metavar="FILE|DIR", help="where to write the lines ('-': stdout), or with "
                                                                   "--partitions the population directory")
    p.add_argument("--partitions", type=_at_least(1, 100_000), default=None, metavar="K",
                   help="write the city's features (as of its day, 2018-11-16) as K Parquet parts for `batch rescore` "
                        "instead of records, a chunk at a time (no store, no city in memory)")
    p.add_argument("--overwrite", action="store_true", help="with --partitions: replace --out if it exists")
    p.add_argument("--json", action="store_true", help="with --partitions: print the summary as JSON")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="the store's population (features as of a day) as Parquet parts with a manifest, "
                                      "for `batch rescore`: personal data, keep it on the operator's encrypted volume")
    p.add_argument("--out", required=True, metavar="DIR", help="the population directory to write (must not exist)")
    p.add_argument("--partitions", type=_at_least(1, 100_000), required=True, metavar="K",
                   help="parts, by a stable hash of the citizen id")
    p.add_argument("--as-of", type=_arg(parse_date), default=None, metavar="YYYY-MM-DD",
                   help="derive the features as of this day (default: today in the city)")
    p.add_argument("--spec", default=None, help=spec + " (the model whose features are derived)")
    p.add_argument("--scenarios", default=None, help="scenarios config (default config/scenarios.toml)")
    p.add_argument("--data-dir", default="data", help="the server's data directory (its store, unless --store)")
    p.add_argument("--store", default=None, help="store URL (default sqlite:///<data-dir>/qianjiang.db)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the export is done)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(fn=cmd_export)

    batch = sub.add_parser("batch", help="population batch jobs on Dask (dask.distributed)")
    bsub = batch.add_subparsers(dest="batch_command", required=True)
    p = bsub.add_parser("rescore", help="score a population directory and freeze its calibration, on a Dask cluster")
    p.add_argument("--input", required=True, metavar="DIR", help="a population directory (`export`, `generate --partitions`)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the scores directory: Parquet parts, calibration.npz, manifest.json (written whole or not at all)")
    p.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                   help="an existing Dask scheduler (default: a LocalCluster of worker processes on this machine)")
    p.add_argument("--workers", type=_at_least(1, 512), default=None, metavar="N",
                   help="worker processes of the local cluster (default: one per core)")
    p.add_argument("--threads-per-worker", type=_at_least(1, 64), default=1, metavar="N", help="tasks at once per worker")
    p.add_argument("--threads", type=_at_least(1, 64), default=1, metavar="N", help="kernel threads per task")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="score with this frozen calibration table (.npz) instead of freezing one from the population")
    p.add_argument("--spec", default=None, help=spec)
    p.add_argument("--local", action="store_true", help="run in this process without Dask (the same result, for checks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the job is done)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(fn=cmd_batch_rescore)

    p = sub.add_parser("calibrate", help="calibrate the model on a synthetic city and report")
    p.add_argument("--citizens", type=_at_least(1), default=1_000_000, metavar="N", help="people in the synthetic city")
    p.add_argument("--seed", type=int, default=2018, help="the synthetic city's random seed")
    p.add_argument("--spec", default=None, help=spec)
    p.add_argument("--out", default=None, metavar="FILE", help="save the calibration table here, .npz (default: not saved)")
    p.add_argument("--png", default=None, metavar="FILE", help="write the score histogram here (default: none)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("fairness", help="the fairness audit of a model on a synthetic city: approval rates and "
                                         "four-fifths ratios of every protected group, and the proxy check "
                                         "(exit 1 if a ratio is below 0.8)")
    p.add_argument("--citizens", type=_at_least(1), default=400_000, metavar="N", help="people in the synthetic city")
    p.add_argument("--seed", type=int, default=11, help="the synthetic city's random seed")
    p.add_argument("--model", default=None, metavar="SPEC|RELEASE",
                   help="a model spec TOML (scored with its reference calibration kernel/models/<name>.calibration.npz "
                        "if it has one, else one frozen from the city) or a staged release id (its own calibration; "
                        "see --data-dir) (default: the default model, kernel/models/v2.toml)")
    p.add_argument("--data-dir", default="data", help="the data directory whose registry holds --model RELEASE")
    p.add_argument("--scenarios", default=None, help="scenarios config (default config/scenarios.toml)")
    p.add_argument("--out", default=None, metavar="DIR", help="write fairness.json, fairness.png and fairness.html here "
                                                              "(default: print only)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(fn=cmd_fairness)

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
    _fairness_city_options(p)
    wait = "seconds to wait for the running server to confirm the switch (default %(default)s)"
    p = model_cmd("activate", cmd_model_activate, "make a staged release active and tell the running server to switch "
                                                  "(refused if its fairness audit fails the four-fifths rule, unless --reason)")
    p.add_argument("release", help="release id, as `model stage` or `model status` prints it")
    p.add_argument("--wait", type=_seconds, default=120.0, metavar="SECONDS", help=wait)
    p.add_argument("--reason", default=None, metavar="TEXT",
                   help="why a release with a four-fifths ratio below 0.8 is activated anyway (kept in the release "
                        "history with who activated it)")
    _fairness_city_options(p)
    p = model_cmd("restore", cmd_model_restore, "go back to the previous release and tell the running server to switch")
    p.add_argument("--wait", type=_seconds, default=120.0, metavar="SECONDS", help=wait)
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
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        from clients.client import QianjiangError

        error = QianjiangError.of(exc)
        print(f"error: {connection_problem(args, error) or error}", file=sys.stderr)  # CODE [REASON]: message
        return 2


if __name__ == "__main__":
    sys.exit(main())
