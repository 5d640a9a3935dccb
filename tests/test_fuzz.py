"""Fuzzing, the short variant (``python -m loadtest.fuzz`` is the long one, 100,000 inputs per rpc).

* Every rpc of the five qianjiang.v1 services, listed from the generated descriptors (an rpc
  without a fuzzing strategy fails :func:`test_every_rpc_has_a_fuzzing_strategy`), gets
  hypothesis-generated requests through the real client against a real server of its own
  (500 citizens, so the writes disturb no other test): structured messages (odd ids, empty,
  huge, unicode and NUL strings, wrong-length tokens, NaN/inf/negative numbers, odd dates, enum
  values the contract does not name, streams of them) and raw wire bytes (mutations of those
  messages) through a raw method. The property is :func:`loadtest.fuzz.judge`: never INTERNAL
  or UNKNOWN, a message on every error, no hang, an OK answer that parses; and the server still
  answers a known-good request after each input.
* The record parser (server/convert.py plus the service's record validation) and the spec
  parser (kernel/spec.py) only raise their own validation error, naming the field or key.
* Every input that once failed, in tests/fuzz_corpus/, is replayed (loadtest.fuzz.FIXED_BUGS
  says what they found). An input of a bug still open would be named ``...-known-Bn-...`` and
  expected to fail (strict xfail, the bug in loadtest.fuzz.KNOWN_BUGS); none is open.
* The bugs found, each shown directly by a test at the end of the module.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
from pathlib import Path

import grpc
import pytest
from conftest import Served
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loadtest import fuzz
from qianjiang.v1 import eligibility_pb2, records_pb2
from qianjiang.v1 import gate_pb2_grpc
from server.gate_snapshot import GatePublisher
from server.token_index import pack_gate

RPCS = fuzz.rpcs()
CORPUS = Path(__file__).with_name("fuzz_corpus")
FUZZ = settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)


class HypothesisChooser:
    """loadtest.fuzz's chooser interface over hypothesis's ``data.draw``: the same generators,
    hypothesis's search and shrinking."""

    def __init__(self, data):
        self.data = data

    def index(self, n: int) -> int:
        return self.data.draw(st.integers(0, n - 1))

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def weighted(self, weights) -> int:
        x = self.data.draw(st.integers(0, sum(weights) - 1))
        for i, w in enumerate(weights):
            if x < w:
                return i
            x -= w
        raise AssertionError("unreachable")

    def choice(self, seq):
        return seq[self.index(len(seq))]

    def raw_bytes(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))

    def double(self) -> float:
        return self.data.draw(st.floats())

    def text(self, max_size: int) -> str:
        return self.data.draw(st.text(max_size=min(max_size, 120)))


class Target:
    """A server of this module's own, the vocabulary the generators mix in, and probes."""

    def __init__(self, tmp_path_factory, n_citizens: int, seed: int):
        self.served = s = Served(tmp_path_factory, n_citizens=n_citizens, seed=seed)
        self.stopper: threading.Thread | None = None
        self.service = s.service
        self.channel = s.client.channel
        self.stubs = {"ScoreService": s.client.scores, "EligibilityService": s.client.eligibility,
                      "RecordsService": s.client.records, "AuditService": s.client.audit, "RightsService": s.client.rights,
                      "GateService": gate_pb2_grpc.GateServiceStub(s.client.channel)}
        # the offline gates' lists, published once (the server's timer is not running here)
        rt = s.runtime
        GatePublisher(rt.config.data_dir, rt.scenarios, rt.gate_key,
                      lambda: (rt.state, rt.spec.model_version, rt.calibration().calibration_version)).publish()
        self.probe_citizen, self.probe_token = fuzz.make_probe(s.client, f"t{seed}")
        rows = range(n_citizens)
        scenarios = s.service.scenarios
        self.vocab = fuzz.Vocab(
            citizens=[s.citizen(r) for r in rows], tokens=[s.token(r) for r in rows], scenarios=list(scenarios),
            pay_later=[x.name for x in scenarios.values() if x.pay_later], variables=[v.name for v in s.service.spec.variables],
            records=fuzz._seed_records(s.data_dir), as_of_day=s.runtime.state.as_of_day, run_tag=f"t{seed}",
        )

    def still_answers(self) -> None:
        """The known-good requests, about a citizen of the probes' own."""
        c = self.served.client
        assert c.get_score(self.probe_citizen).score > 0
        assert c.check(self.vocab.scenarios[0], self.probe_token).outcome != eligibility_pb2.UNKNOWN_CARD
        # Whatever the fuzzed writes changed, the checks' packed gate words follow the columns.
        state = self.served.runtime.state
        n = state.n_citizens
        packed = pack_gate(state.adult[:n], state.consent[:n], state.columns.score[:n], state.columns.flags[:n], state.defaults[:n],
                           consent_except=state.consent_except[:n])
        assert (state.gate[:n] == packed).all(), "a write left the checks' gate words stale"

    def stop(self, timeout: float = 30.0) -> bool:
        """Drain (once); False if it did not finish in ``timeout`` (the server is left behind)."""
        if self.stopper is None:
            self.stopper = threading.Thread(target=self.served.stop, daemon=True)
            self.stopper.start()
        self.stopper.join(timeout)
        return not self.stopper.is_alive()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    t = Target(tmp_path_factory, n_citizens=500, seed=2018)
    yield t
    t.stop()


@pytest.fixture(scope="module")
def replay_target(tmp_path_factory):
    """A second server for the corpus and the bugs the fuzzing found (a regression of some of
    them would break a citizen, B2)."""
    t = Target(tmp_path_factory, n_citizens=300, seed=2018)
    yield t
    t.stop(timeout=10)


def call_typed(target: Target, rpc: fuzz.Rpc, msg, deadline: float) -> fuzz.Outcome:
    """One call through the real client's stub (typed messages, the client's channel)."""
    method = getattr(target.stubs[rpc.service], rpc.method)
    t0 = time.monotonic()
    responses = []
    try:
        if rpc.server_streaming:
            responses = [r.SerializeToString() for r in method(iter(msg) if rpc.client_streaming else msg, timeout=deadline)]
        else:
            responses = [method(iter(msg) if rpc.client_streaming else msg, timeout=deadline).SerializeToString()]
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    return fuzz.Outcome(code, details, time.monotonic() - t0, deadline, responses)


# --- every rpc has a strategy ------------------------------------------------------------------


def test_every_rpc_has_a_fuzzing_strategy():
    assert {r.service for r in RPCS} == {"ScoreService", "EligibilityService", "RecordsService", "AuditService",
                                         "RightsService", "GateService"}
    assert len(RPCS) >= 15
    assert fuzz.missing_strategies() == []


def test_every_service_has_a_client_stub(target):
    assert {r.service for r in RPCS} <= set(target.stubs)


# --- the rpcs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
@FUZZ
@given(data=st.data())
def test_structured_requests(target, rpc, data):
    """Field-by-field requests through the typed client."""
    c, vocab = HypothesisChooser(data), target.vocab.copy()
    msg = fuzz.gen_structured(rpc, c, vocab)
    payload = [m.SerializeToString() for m in msg] if isinstance(msg, list) else msg.SerializeToString()
    inp = fuzz.Input(rpc, payload, True, msg)
    fuzz.note_sent(inp, vocab)
    out = call_typed(target, rpc, msg, fuzz.deadline_for(inp))
    assert fuzz.judge(inp, out) is None, (fuzz.judge(inp, out), msg)
    target.still_answers()


@pytest.mark.parametrize("rpc", RPCS, ids=[r.name for r in RPCS])
@FUZZ
@given(data=st.data())
def test_raw_wire_requests(target, rpc, data):
    """Mutated wire bytes through a raw method (identity serialisers): about half of them are
    not valid protobuf."""
    c, vocab = HypothesisChooser(data), target.vocab.copy()
    payload = fuzz.gen_raw(rpc, c, vocab)
    inp = fuzz.Input(rpc, payload, False, fuzz.parse_all(rpc, payload))
    out = fuzz.call(target.channel, inp)
    problem = fuzz.judge(inp, out)
    assert problem is None, (problem, payload)
    target.still_answers()


def test_server_drains_after_fuzzing(target):
    """No call left hanging by the inputs above: the server stops within its grace."""
    target.still_answers()
    assert target.stop(timeout=30), "the fuzzed server did not drain in 30 s"


# --- the record parser --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_record_parser_only_names_a_field(replay_target, data):
    fields = fuzz.gen_record_fields(HypothesisChooser(data), replay_target.vocab.copy())
    assert fuzz.check_record(fields, replay_target.service) is None, fields


@settings(max_examples=200, deadline=None)
@given(value=st.floats(), date=st.one_of(st.dates().map(str), st.text(max_size=20)), variable=st.sampled_from(["volunteer_hours", "traffic_violations", "x"]))
def test_record_values_and_dates(replay_target, value, date, variable):
    fields = {"record_id": "r-1", "citizen_id": "c00000001", "variable": variable, "date": date, "value": value}
    assert fuzz.check_record(fields, replay_target.service) is None


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(max_size=30), st.dates().map(str), st.dates().map(lambda d: d.strftime("%Y%m%d"))))
def test_parse_date_takes_exactly_iso_dates(value):
    assert fuzz.check_date(value) is None


# --- the spec parser ----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_spec_parser_only_raises_spec_error(tmp_path_factory, data):
    spec_input = fuzz.gen_spec(HypothesisChooser(data))
    path = tmp_path_factory.getbasetemp() / "fuzz-spec.toml"
    assert fuzz.check_spec(spec_input, path) is None, fuzz.spec_bytes(spec_input)[:2000]


TOML_VALUES = st.recursive(
    st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | st.dates() | st.datetimes() | st.times(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), value=TOML_VALUES)
def test_spec_parser_any_value_at_any_key(data, value):
    doc = fuzz.spec_doc()
    paths = list(fuzz._paths(doc))
    parent, key = paths[data.draw(st.integers(0, len(paths) - 1))]
    parent[key] = value
    assert fuzz.check_spec_doc(doc) is None


def test_to_toml_round_trips_the_shipped_spec():
    doc = fuzz.spec_doc()
    assert tomllib.loads(fuzz.to_toml(doc)) == doc


def test_frames_round_trip():
    chunks = [b"", b"\x00", b"x" * 300, b"\xff" * 20000]
    assert fuzz.unframe(fuzz.frame(chunks)) == chunks


# --- the corpus of inputs that once failed -----------------------------------------------------


def _corpus_params():
    params = []
    for path in sorted(CORPUS.glob("*")):
        if path.name == "README.md":
            continue
        marks = []
        bug = path.name.split("-known-")[1].split("-")[0] if "-known-" in path.name else None
        if bug is not None:
            marks.append(pytest.mark.xfail(strict=True, reason=f"known bug {bug}: {fuzz.KNOWN_BUGS.get(bug, 'unknown id')}"))
        params.append(pytest.param(path, marks=marks, id=path.name))
    return params


@pytest.mark.parametrize("path", _corpus_params())
def test_corpus(replay_target, tmp_path, path):
    if path.suffix == ".bin":
        inp, _ = fuzz.load_input(path)
        out = fuzz.call(replay_target.channel, inp)
        problem = fuzz.judge(inp, out)
        replay_target.still_answers()
    elif path.name.startswith("record-") and path.suffix == ".json":
        problem = fuzz.check_record(json.loads(path.read_bytes()), replay_target.service)
    elif path.name.startswith("spec-") and path.suffix == ".toml":
        problem = fuzz.check_spec_bytes(path.read_bytes(), tmp_path / "spec.toml")
    else:
        pytest.fail(f"{path.name}: not <Service>.<Method>-...bin, record-...json or spec-...toml")
    assert problem is None, problem


def test_corpus_names_only_known_bugs():
    for path in CORPUS.glob("*-known-*"):
        _, bug = fuzz.load_input(path)
        assert bug in fuzz.KNOWN_BUGS, path.name


# --- the bugs the fuzzing found, each shown directly (loadtest.fuzz.FIXED_BUGS) ------------------


@pytest.mark.parametrize("slug, payload", [
    ("ScoreService.GetScore", b"\x0a\x02\xff\xfe"),  # citizen_id not UTF-8
    ("EligibilityService.Check", b"\xff"),  # a truncated varint
    ("RecordsService.IngestRecords", [b"\xff"]),
    ("EligibilityService.StreamCheck", [b"\x0a\x0ecampus_fitness", b"\x0a\x02\xff\xfe"]),
])
def test_B1_malformed_protobuf_is_invalid_argument(replay_target, slug, payload):
    rpc = fuzz.rpc_by_slug(slug)
    out = fuzz.call(replay_target.channel, fuzz.Input(rpc, payload, False, None))
    assert out.code == grpc.StatusCode.INVALID_ARGUMENT and out.details, (out.code, out.details)
    replay_target.still_answers()


def test_B2_record_values_beyond_float32_are_refused(replay_target):
    c = replay_target.served.client
    assert c.upsert_citizen("fz-b2", "1990-01-01").citizen_id == "fz-b2"
    (ack,) = c.ingest([records_pb2.Record(record_id="fz-b2-1", citizen_id="fz-b2", variable="volunteer_hours",
                                          date="2024-01-01", value=1.0)])
    assert ack.status == records_pb2.RecordAck.ACCEPTED
    for value in (1e308, 3.5e38, 1e9 + 1):
        with pytest.raises(grpc.RpcError) as info:
            c.correct_record("fz-b2-1", "2024-01-01", value)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
        with pytest.raises(grpc.RpcError) as info:
            c.ingest([records_pb2.Record(record_id="fz-b2-x", citizen_id="fz-b2", variable="volunteer_hours",
                                         date="2024-01-01", value=value)])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    # the citizen is not broken: later writes and reads work
    (ack,) = c.ingest([records_pb2.Record(record_id="fz-b2-2", citizen_id="fz-b2", variable="volunteer_hours",
                                          date="2024-01-01", value=1.0)])
    assert ack.status == records_pb2.RecordAck.ACCEPTED
    assert c.upsert_citizen("fz-b2", "1991-01-01").created is False


def test_B3_a_full_audit_dictionary_is_not_internal(tmp_path_factory):
    t = Target(tmp_path_factory, n_citizens=200, seed=7)
    try:
        audit = t.service.audit
        for i in range(2 * fuzz.AUDIT_DICTIONARY_SIZE):  # what 65,536 distinct purposes would leave
            try:
                audit._code("scenario", f"purpose-{i}")
            except Exception:  # noqa: BLE001 - the dictionary is full
                break
        else:
            pytest.fail("the audit dictionary never filled up")
        with pytest.raises(grpc.RpcError) as info:
            t.served.client.get_score(t.probe_citizen, purpose="one_more_purpose")
        assert info.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), info.value.details()
        assert info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            t.served.client.get_score(t.probe_citizen, purpose="x" * 70_000)  # not a short name
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        t.stop()


_B4_SCRIPT = textwrap.dedent("""
    import logging, os, random, sys, tempfile, threading
    from pathlib import Path
    logging.disable(logging.CRITICAL)
    sys.path[:0] = [{root!r}, {tests!r}]
    from conftest import Served
    from loadtest import fuzz

    class Factory:
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name))

    s = Served(Factory(), n_citizens=100)
    rpc = fuzz.rpc_by_slug("EligibilityService.StreamCheck")
    v = fuzz.Vocab(citizens=[], tokens=[], scenarios=["campus_fitness"], pay_later=[], variables=[], records={{}}, as_of_day=20000)
    c = fuzz.RandomChooser(random.Random(4))
    sent = 0
    while sent < 200:
        payload = fuzz.gen_raw(rpc, c, v)
        if fuzz.parse_all(rpc, payload) is None:
            fuzz.call(s.client.channel, fuzz.Input(rpc, payload, False, None), 5)
            sent += 1
    t = threading.Thread(target=s.stop, daemon=True)
    t.start()
    t.join(10)
    print("stuck" if t.is_alive() else "drained", flush=True)
    os._exit(0)
""")


def test_B4_the_server_drains_after_malformed_client_streams():
    """In a process of its own: a server that never drains would keep pytest from exiting."""
    here = Path(__file__).resolve().parent
    script = _B4_SCRIPT.format(root=str(here.parent), tests=str(here))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip().splitlines()[-1:] == ["drained"], done.stdout[-500:] + done.stderr[-2000:]
