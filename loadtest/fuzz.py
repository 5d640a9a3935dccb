"""Fuzzing: every rpc's request messages, and the record and spec parsers.

    python -m loadtest.fuzz --inputs 100000      # at least 100,000 inputs per rpc
    python -m loadtest.fuzz --inputs 2000 --seed 7 --concurrency 16

Starts the real server (``qjscore serve`` on a loopback port with a fresh data directory, as
loadtest/crash_soak.py does) and sends every rpc of the four qianjiang.v1 services, listed
from the generated descriptors, at least ``--inputs`` requests each, several in flight:

* structured inputs: request messages built field by field (:data:`FIELD_KINDS` says what
  each field is): ids that exist and that do not, empty, huge, unicode, NUL bytes, tokens of
  the wrong length, negative/NaN/infinite numbers, dates out of range or in other forms, enum
  values the contract does not name; streams of such messages;
* raw inputs: the serialised bytes of those messages mutated (bits flipped, bytes inserted,
  deleted, truncated, fields appended) or plain random bytes, sent through a raw method with
  the identity serialiser, so malformed protobuf wire data reaches the server too.

The property (:func:`judge`): the status is never INTERNAL or UNKNOWN; every non-OK status has
a message; a small request never ends in DEADLINE_EXCEEDED (a hang) and no call outlives its
deadline; an OK answer parses as the rpc's response type (one per request on the streams);
and the server keeps answering known-good requests (a probe every second).

Then the parsers, in-process: server/convert.py's record parsing plus the service's record
validation (:func:`check_record`: only InvalidArgument naming a ``record.`` field, and an
accepted record always gives finite features), and kernel/spec.py (:func:`check_spec_bytes`:
only SpecError naming the key, and an accepted spec compiles to finite arrays) on mutations of
kernel/models/v1.toml.

Every failing input is saved under tests/fuzz_corpus/ (tests/test_fuzz.py replays them all).
Failures that one of :data:`KNOWN_BUGS` explains (each with its fix) are counted apart and
saved at most twice per rpc; ``--strict`` counts them as failures too. The server's own log
is read at the end: an exception there that no known bug explains is a failure as well.
Progress goes to stderr (and the figures so far to ``<work-dir>/progress.json``); the last
line is one JSON object with the per-rpc counts of inputs, statuses, failures and known-bug
hits, and the elapsed time. SIGTERM or SIGHUP stop the run early, still reporting. The exit
status is 1 on any failure (or an early stop).

On 2 cores the whole run (15 rpcs x 100,000 inputs, then 100,000 records and 50,000 specs)
takes about half an hour: the server answers about 800-1,100 inputs a second.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sqlite3
import string
import struct
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from qianjiang.v1 import audit_pb2, eligibility_pb2, records_pb2, rights_pb2, score_pb2
from qianjiang.v1 import gate_pb2  # offline gates (server/gate_snapshot.py)

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = ROOT / "tests" / "fuzz_corpus"
SPEC_TEXT = (ROOT / "kernel" / "models" / "v1.toml").read_bytes()

#: The modules whose services are fuzzed: every rpc of every service they declare.
SERVICE_MODULES = (score_pb2, eligibility_pb2, records_pb2, audit_pb2, rights_pb2, gate_pb2)


# --- the rpcs, from the descriptors ------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    service: str  # "ScoreService"
    method: str  # "GetScore"
    path: str  # "/qianjiang.v1.ScoreService/GetScore"
    request: type
    response: type
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        return f"{self.service}/{self.method}"

    @property
    def slug(self) -> str:
        """The rpc in a file name: ``ScoreService.GetScore``."""
        return f"{self.service}.{self.method}"


def rpcs() -> list[Rpc]:
    """Every rpc of the qianjiang.v1 services, in declaration order."""
    out = []
    for module in SERVICE_MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append(Rpc(
                    service.name, m.name, f"/{service.full_name}/{m.name}", GetMessageClass(m.input_type),
                    GetMessageClass(m.output_type), m.client_streaming, m.server_streaming,
                ))
    return out


def rpc_by_slug(slug: str) -> Rpc:
    for rpc in rpcs():
        if rpc.slug == slug:
            return rpc
    raise KeyError(f"no rpc {slug!r} in the qianjiang.v1 descriptors")


#: The fuzzing strategy of each rpc: what each field of its request is, which decides the
#: values generated for it. An rpc or a field missing here fails tests/test_fuzz.py and stops
#: the long run (:func:`missing_strategies`).
FIELD_KINDS: dict[str, dict[str, str]] = {
    "ScoreService/GetScore": {"citizen_id": "citizen_id", "purpose": "purpose"},
    "ScoreService/ExplainScore": {"citizen_id": "citizen_id", "purpose": "purpose"},
    "ScoreService/BatchGetScores": {"citizen_ids": "citizen_ids", "purpose": "purpose"},
    "ScoreService/SimulateScore": {"citizen_id": "citizen_id", "purpose": "purpose", "changes": "changes",
                                   "next_level": "bool"},
    "EligibilityService/Check": {"scenario": "scenario", "card_token": "token", "request_id": "uint64"},
    "EligibilityService/BatchCheck": {"scenario": "scenario", "card_tokens": "tokens"},
    "EligibilityService/StreamCheck": {"scenario": "scenario", "card_token": "token", "request_id": "uint64"},
    "EligibilityService/ListScenarios": {},
    "RecordsService/IngestRecords": {
        "record_id": "new_record_id", "citizen_id": "citizen_id", "variable": "variable", "date": "date",
        "value": "value", "source": "source", "scenario": "record_scenario",
    },
    "RecordsService/CorrectRecord": {"record_id": "record_id", "date": "date", "value": "value", "source": "source"},
    "RecordsService/WithdrawRecord": {"record_id": "record_id", "why": "enum", "source": "source"},
    "RecordsService/GetRecordHistory": {"record_id": "record_id", "source": "source"},
    "RecordsService/GrantConsent": {"citizen_id": "citizen_id", "purposes": "purposes", "expires": "date"},
    "RecordsService/RevokeConsent": {"citizen_id": "citizen_id", "purposes": "purposes", "expires": "date"},
    "RecordsService/GetConsent": {"citizen_id": "citizen_id", "purposes": "purposes", "expires": "date"},
    "RecordsService/UpsertCitizen": {"citizen_id": "new_citizen_id", "birth_date": "date"},
    "RecordsService/RegisterCard": {"citizen_id": "citizen_id", "card_token": "token"},
    "AuditService/ListChecks": {"citizen_id": "citizen_id", "limit": "uint32"},
    "AuditService/ReplayDecision": {"decision_id": "decision_id"},
    "RightsService/ListCitizenRecords": {"citizen_id": "citizen_id"},
    "RightsService/FileDispute": {"citizen_id": "citizen_id", "source": "source", "record_id": "record_id",
                                  "reason": "text"},
    "RightsService/ListDisputes": {"citizen_id": "citizen_id", "source": "source", "open_only": "bool",
                                   "limit": "uint32"},
    "RightsService/AnswerDispute": {"dispute_id": "text", "answer": "enum", "date": "date", "value": "value",
                                    "note": "text", "source": "source"},
    "RightsService/ApplyRepair": {"citizen_id": "citizen_id", "source": "source", "record_id": "record_id",
                                  "statement": "text"},
    "RightsService/ListRepairs": {"citizen_id": "citizen_id", "source": "source", "pending_only": "bool",
                                  "limit": "uint32"},
    "RightsService/DecideRepair": {"repair_id": "text", "decision": "enum", "reason": "text", "source": "source"},
    "RightsService/AdvanceTestClock": {"seconds": "int64"},
    "GateService/GetManifest": {"scenario": "scenario"},
    "GateService/GetSnapshot": {"scenario": "scenario"},
    "GateService/GetDeltas": {"scenario": "scenario", "since_sequence": "uint64"},
    "GateService/UploadOfflineDecisions": {"gate_id": "gate_id", "decisions": "offline_decisions"},
}

KINDS = frozenset({
    "citizen_id", "new_citizen_id", "citizen_ids", "record_id", "new_record_id", "text", "scenario",
    "record_scenario", "variable", "date", "value", "token", "tokens", "uint64", "uint32", "enum", "purpose",
    "source", "decision_id", "changes", "bool", "purposes", "int64", "gate_id", "offline_decisions",
})


def missing_strategies() -> list[str]:
    """What has no fuzzing strategy: rpcs without an entry, fields without a kind."""
    problems = []
    for rpc in rpcs():
        kinds = FIELD_KINDS.get(rpc.name)
        if kinds is None:
            problems.append(f"{rpc.name}: no entry in loadtest/fuzz.py FIELD_KINDS")
            continue
        fields = {f.name for f in rpc.request.DESCRIPTOR.fields}
        problems += [f"{rpc.name}: field {f!r} has no kind" for f in sorted(fields - set(kinds))]
        problems += [f"{rpc.name}: {f!r} is not a field of {rpc.request.DESCRIPTOR.name}" for f in sorted(set(kinds) - fields)]
        problems += [f"{rpc.name}: unknown kind {k!r}" for k in kinds.values() if k not in KINDS]
    return problems


# --- known bugs --------------------------------------------------------------------------------

#: Open bugs that explain a failure (:func:`known_bug`): counted apart, their inputs saved as
#: ``<rpc>-known-<id>-<hash>.bin`` (strict xfail in tests/test_fuzz.py). Empty: none is open.
KNOWN_BUGS: dict[str, str] = {}

#: What this fuzzer found, now fixed; the inputs are regression cases in tests/fuzz_corpus/.
FIXED_BUGS = {
    "B1": "a request that is not valid protobuf -> INTERNAL 'Exception deserializing request!' "
          "(threaded grpcio), UNKNOWN or INTERNAL (grpc.aio); now INVALID_ARGUMENT naming the message "
          "(server/interceptors.py: the request deserializer never raises; server/errors.py: DecodeError)",
    "B2": "a record value above float32's range (or one that overflows a feature sum) was stored, "
          "then the re-score raised -> INTERNAL, every later write to that citizen INTERNAL and the "
          "next start's load failing; now refused above 1e9 (server/convert.py, server/service.py)",
    "B3": "a score read's purpose was free text: 65,536 distinct ones filled the audit dictionary -> "
          "INTERNAL for every new one; then a short name, and a full dictionary RESOURCE_EXHAUSTED; now one "
          "of config/purposes.toml (server/purposes.py), anything else INVALID_ARGUMENT",
    "B4": "(grpcio's threaded server) malformed protobuf on a client stream could leave a call that "
          "never completed: SIGTERM never finished draining; gone with grpc.aio and the B1 fix",
    "spec": "kernel/spec.py raised UnicodeDecodeError, RecursionError, ValueError (4,300-digit "
            "integers), OverflowError (huge integers, int32 level bounds) instead of SpecError, and "
            "accepted specs that compile to inf/NaN (knots 5e-324 apart, points 1e308 apart)",
    "record-date": "parse_date took 20240101 and 2024-W01-1 as dates (contract: YYYY-MM-DD)",
    "echo": "an error message quoting a huge scenario or variable made the status headers too large "
            "for the client, which saw RESOURCE_EXHAUSTED instead of the answer; now capped at 400 chars",
}

AUDIT_DICTIONARY_SIZE = 1 << 16
SCORE_RPCS = ("ScoreService/GetScore", "ScoreService/ExplainScore", "ScoreService/BatchGetScores")
RESCORING_WRITES = ("RecordsService/IngestRecords", "RecordsService/CorrectRecord", "RecordsService/WithdrawRecord",
                    "RecordsService/UpsertCitizen")


# --- choosing values: random.Random here, hypothesis in tests/test_fuzz.py ---------------------


class RandomChooser:
    """The choices a generator makes, from a seeded random.Random. tests/test_fuzz.py has the
    same interface over hypothesis's ``data.draw``, so both drive the same generators."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def index(self, n: int) -> int:
        return self.rng.randrange(n)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def weighted(self, weights: tuple[int, ...]) -> int:
        return self.rng.choices(range(len(weights)), weights)[0]

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def raw_bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def double(self) -> float:
        return struct.unpack("<d", self.rng.randbytes(8))[0]

    def text(self, max_size: int) -> str:
        n = self.choice((0, 1, 2, 5, 8, 16, 40, 64, 65, max_size)) if self.rng.random() < 0.5 else self.integer(0, max_size)
        n = min(n, max_size)
        pools = TEXT_POOLS
        rng = self.rng
        if rng.random() < 0.5:  # one pool: an id-like, a Chinese, an emoji string...
            pool = pools[rng.randrange(len(pools))]
            return "".join(rng.choices(pool, k=n))
        return "".join(rng.choice(pools[rng.randrange(len(pools))]) for _ in range(n))


TEXT_POOLS = (
    string.ascii_letters + string.digits, "_.:-", "\x00\x01\x08\x1b\x1f\x7f", " \t\r\n", "éüßÀÿ\u00a0",
    "钱江分信用杭州市民卡", "😀𝔘𐍈\U0010fffd", "\u200b\u200d\u202e\ufeff\u0301\ufffd", "'\"\\%;{}[]<>/`$",
)

EDGE_DOUBLES = (
    0.0, -0.0, 1.0, 0.5, 2.0, 40.0, -1.0, -1e-30, 5e-324, 1e-300, 65504.0, 2.0**53, 1e9, 1e9 + 1, 1e15,
    3.4028234663852886e38, 3.5e38, 1e300, 1.7976931348623157e308, -1.7976931348623157e308,
    math.nan, -math.nan, math.inf, -math.inf,
)
EDGE_UINT64 = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
EDGE_UINT32 = (0, 1, 99, 100, 999, 1000, 1001, 2**31 - 1, 2**31, 2**32 - 1)
EDGE_ENUM = (0, 1, 2, 3, 4, -1, 127, 2**31 - 1, -(2**31))
HUGE_TEXT = ("x" * 70_000, "钱" * 20_000, "\x00" * 10_000, "😀" * 5_000, "é\x00" * 40_000)
JUNK_TEXT = (
    "", " ", "\x00", "a\x00b", "-", "_", ".", ":", "a" * 64, "a" * 65, "A" * 1000, "é", "钱江分", "𝔘",
    "\u202e", "\ufeff", "\ufffd", "c00000000\x00", "c00000000 ", " c00000000", "C00000000", "c0000000",
    "c000000000", "../../etc/passwd", "%s%s%n", "' OR 1=1 --", "NaN", "null", "\n", "-1", "0",
    "Robert'); DROP TABLE citizens;--", "\\", '"', "{}", "[]", "\r\n",
)
EDGE_DATES = (
    "0001-01-01", "9999-12-31", "1970-01-01", "1969-12-31", "1900-02-28", "2000-02-29", "2024-02-29",
    "2023-02-29", "2024-13-01", "2024-00-10", "2024-01-00", "2024-01-32", "20240101", "2024-W01-1",
    "2024W011", "2024-1-1", " 2024-01-01", "2024-01-01 ", "2024-01-01\x00", "2024-01-01T00:00:00",
    "２０２４-０１-０１", "٢٠٢٤-٠١-٠١", "0000-01-01", "10000-01-01", "-2024-01-01", "yesterday", "",
)


# --- what the generators know about the city ----------------------------------------------------


@dataclass
class Vocab:
    """Existing names the generators mix with junk, and what the judge needs to classify."""

    citizens: list[str]  # existing citizen ids the fuzzer may use (the probes' citizen excluded)
    tokens: list[bytes]  # card tokens of existing citizens
    scenarios: list[str]
    pay_later: list[str]
    variables: list[str]
    records: dict[str, str]  # existing record id -> its citizen id
    as_of_day: int
    run_tag: str = "fz"
    created_citizens: list[str] = field(default_factory=list)
    poisoned: set[str] = field(default_factory=set)  # citizens a B2 value was sent for
    purposes: set[str] = field(default_factory=set)  # distinct purposes sent to score rpcs (B3)
    decision_ids: list[str] = field(default_factory=list)  # ids of decisions answered in this run
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fresh(self, prefix: str, c) -> str:
        """A new id (unique in practice), from the chooser so that hypothesis can replay it."""
        return f"{prefix}-{self.run_tag}-{c.integer(0, 10**12)}"

    def copy(self) -> Vocab:
        """An independent copy: what one hypothesis example may grow without changing what the
        next example's draws look like."""
        return Vocab(list(self.citizens), list(self.tokens), list(self.scenarios), list(self.pay_later),
                     list(self.variables), dict(self.records), self.as_of_day, self.run_tag,
                     list(self.created_citizens), set(self.poisoned), set(self.purposes), list(self.decision_ids))


def gen_text(c, max_size: int = 300) -> str:
    branch = c.weighted((6, 3, 1))
    if branch == 0:
        return c.text(max_size)
    if branch == 1:
        return c.choice(JUNK_TEXT)
    return c.choice(HUGE_TEXT)


def gen_id_like(c) -> str:
    """Matches the id pattern (or just misses it: 64/65 characters)."""
    n = c.choice((1, 2, 9, 20, 63, 64, 65))
    first = c.choice("aZ09")
    return first + "".join(c.choice("abcXYZ019_.:-") for _ in range(n - 1))


def gen_citizen_id(c, v: Vocab) -> str:
    branch = c.weighted((40, 8, 12, 40))
    if branch == 0 and v.citizens:
        return c.choice(v.citizens)
    if branch == 1 and v.created_citizens:
        return c.choice(v.created_citizens)
    if branch == 2:
        return gen_id_like(c)
    return gen_text(c, 80)


def gen_new_citizen_id(c, v: Vocab) -> str:
    branch = c.weighted((30, 20, 50))
    if branch == 0:
        cid = v.fresh("fzc", c)
        v.created_citizens.append(cid)
        return cid
    return gen_citizen_id(c, v)


def gen_record_id(c, v: Vocab) -> str:
    branch = c.weighted((45, 15, 40))
    if branch == 0 and v.records:
        keys = list(v.records)
        return c.choice(keys)
    if branch == 1:
        return gen_id_like(c)
    return gen_text(c, 80)


def gen_new_record_id(c, v: Vocab) -> str:
    branch = c.weighted((50, 15, 35))
    if branch == 0:
        return v.fresh("fzr", c)
    if branch == 1 and v.records:
        return c.choice(list(v.records))  # a duplicate
    return gen_record_id(c, v)


def _name_like(c, names: list[str], weights: tuple[int, int, int], near) -> str:
    """A configured name, a near miss of one (``near(name)``: the variants to pick from), or
    random text."""
    branch = c.weighted(weights)
    if branch == 0:
        return c.choice(names)
    if branch == 1:
        return c.choice(near(c.choice(names)))
    return gen_text(c, 80)


def gen_scenario(c, v: Vocab) -> str:
    return _name_like(c, v.scenarios, (55, 10, 35),
                      lambda s: (s.upper(), s + " ", " " + s, s + "\x00", s[:-1], s + "_x", s.replace("_", "-")))


def gen_record_scenario(c, v: Vocab) -> str:
    branch = c.weighted((60, 25, 15))
    if branch == 0:
        return ""
    if branch == 1:
        return c.choice(v.pay_later + v.scenarios)
    return gen_scenario(c, v)


def gen_variable(c, v: Vocab) -> str:
    return _name_like(c, v.variables, (65, 10, 25),
                      lambda s: (s.upper(), s + " ", s + "\x00", s[:-1], "hukou", "health", s.replace("_", "-")))


def gen_date(c, v: Vocab) -> str:
    from server.state import iso_of

    branch = c.weighted((45, 8, 8, 24, 15))
    if branch == 0:
        return iso_of(v.as_of_day - c.integer(0, 4000))
    if branch == 1:
        return iso_of(v.as_of_day)
    if branch == 2:
        return iso_of(v.as_of_day + c.integer(1, 4000))
    if branch == 3:
        return c.choice(EDGE_DATES)
    return gen_text(c, 40)


def gen_value(c, v: Vocab) -> float:
    branch = c.weighted((40, 35, 25))
    if branch == 0:
        return c.choice(EDGE_DOUBLES)
    if branch == 1:
        return c.integer(0, 4000) / c.choice((1, 4, 10, 100))
    return c.double()


def gen_token(c, v: Vocab) -> bytes:
    branch = c.weighted((40, 25, 35))
    if branch == 0 and v.tokens:
        return c.choice(v.tokens)
    if branch == 1:
        return c.raw_bytes(16)
    n = c.choice((0, 1, 8, 15, 17, 31, 32, 33, 64, 1000))
    return c.raw_bytes(n)


def gen_tokens(c, v: Vocab) -> bytes:
    branch = c.weighted((700, 150, 146, 2, 2))  # the limits are rare: 1.6 MB each
    if branch == 0:
        return b"".join(gen_token16(c, v) for _ in range(c.integer(0, 40)))
    if branch == 1:  # not a whole number of tokens
        return b"".join(gen_token16(c, v) for _ in range(c.integer(0, 5))) + c.raw_bytes(c.integer(1, 15))
    if branch == 2:
        return c.raw_bytes(c.integer(0, 200))
    if branch == 3:  # exactly the limit of 100,000 tokens
        return (gen_token16(c, v) * 100_000)[: 16 * 100_000]
    return b"\x00" * (16 * 100_001)  # one over the limit


def gen_token16(c, v: Vocab) -> bytes:
    return c.choice(v.tokens) if v.tokens and c.index(2) == 0 else c.raw_bytes(16)


def gen_citizen_ids(c, v: Vocab) -> list[str]:
    branch = c.weighted((900, 96, 2, 2))  # the limits are rare: 1,000 score reads take a while
    if branch == 0:
        return [gen_citizen_id(c, v) for _ in range(c.integer(0, 8))]
    if branch == 1:
        return [c.choice(v.citizens)] * c.integer(2, 10) if v.citizens else []
    if branch == 2:  # the limit
        return [c.choice(v.citizens) if v.citizens else "x" for _ in range(1000)]
    return ["c00000000"] * 1001  # one over


def gen_purpose(c, v: Vocab) -> str:
    """Why a score is read: empty, a configured purpose, a near miss or another name, or junk."""
    branch = c.weighted((25, 15, 25, 35))
    if branch == 0:
        return ""
    if branch == 1:
        return c.choice(("citizen_app_view", "appeal_review", "service_verification", "unspecified",
                         "housing_application", "Citizen_app_view", "citizen_app_view "))
    if branch == 2:
        return gen_id_like(c)
    return gen_text(c)


def gen_source(c, v: Vocab) -> str:
    """A record's source namespace: mostly empty (the caller's own), else a name or junk."""
    branch = c.weighted((60, 20, 20))
    if branch == 0:
        return ""
    if branch == 1:
        return c.choice(("unspecified", "court", "police", "itest"))
    return gen_text(c)


def gen_decision_id(c, v: Vocab) -> str:
    """A decision id to replay: one this run received, a well-formed one nobody issued (a
    forgery), a batch item's, or junk."""
    branch = c.weighted((35, 25, 15, 25))
    if branch == 0 and v.decision_ids:
        return c.choice(v.decision_ids)
    if branch <= 1:
        return "d-" + c.raw_bytes(16).hex()
    if branch == 2:
        return f"d-{c.raw_bytes(16).hex()}-{c.integer(0, 2**40)}"
    return gen_text(c)


def gen_uint64(c, v: Vocab) -> int:
    return c.choice(EDGE_UINT64) if c.index(2) else c.integer(0, 2**64 - 1)


def gen_uint32(c, v: Vocab) -> int:
    return c.choice(EDGE_UINT32) if c.index(2) else c.integer(0, 2**32 - 1)


def gen_int64(c, v: Vocab) -> int:
    return c.choice((0, 1, -1, 86_400, 95_000_000, 2**31, 2**63 - 1, -(2**63))) if c.index(2) else c.integer(-(2**63), 2**63 - 1)


def gen_enum(c, v: Vocab) -> int:
    return c.choice(EDGE_ENUM) if c.index(3) else c.integer(-(2**31), 2**31 - 1)


def gen_bool(c, v: Vocab) -> bool:
    return c.index(2) == 0


def gen_purposes(c, v: Vocab) -> list[str]:
    """What a consent names: nothing (the blanket), scenarios and read purposes, near misses
    and junk, sometimes more than the limit."""
    branch = c.weighted((30, 50, 15, 5))
    if branch == 0:
        return []
    if branch == 1:
        return [gen_scenario(c, v) if c.index(2) else gen_purpose(c, v) for _ in range(c.integer(1, 4))]
    if branch == 2:
        return [c.choice(v.scenarios)] * c.integer(2, 40)
    return [gen_text(c, 80) for _ in range(c.integer(1, 50))]


def gen_changes(c, v: Vocab) -> list:
    """A what-if's changes (SimulateScore): repairs of the citizen's (or anyone's, or no)
    records, whole variables, hypothetical records with odd values, dates and counts, empty
    ones; sometimes more than the limit."""
    from qianjiang.v1 import score_pb2

    def one():
        branch = c.weighted((30, 20, 40, 10))
        if branch == 0:
            return score_pb2.SimulatedChange(remove_record=score_pb2.RecordRef(
                record_id=gen_record_id(c, v), source=gen_source(c, v)))
        if branch == 1:
            return score_pb2.SimulatedChange(remove_variable=gen_variable(c, v))
        if branch == 2:
            return score_pb2.SimulatedChange(add_record=score_pb2.HypotheticalRecord(
                variable=gen_variable(c, v), value=gen_value(c, v), date=gen_date(c, v) if c.index(2) else "",
                count=gen_uint32(c, v) if c.index(4) == 0 else c.integer(0, 3)))
        return score_pb2.SimulatedChange()

    n = c.choice((0, 1, 1, 2, 3, 5)) if c.weighted((19, 1)) == 0 else c.choice((50, 51, 200))
    return [one() for _ in range(n)]


GENERATORS = {
    "citizen_id": gen_citizen_id, "new_citizen_id": gen_new_citizen_id, "citizen_ids": gen_citizen_ids,
    "record_id": gen_record_id, "new_record_id": gen_new_record_id, "text": lambda c, v: gen_text(c),
    "scenario": gen_scenario, "record_scenario": gen_record_scenario, "variable": gen_variable,
    "date": gen_date, "value": gen_value, "token": gen_token, "tokens": gen_tokens, "uint64": gen_uint64,
    "uint32": gen_uint32, "enum": gen_enum, "purpose": gen_purpose, "source": gen_source,
    "decision_id": gen_decision_id, "changes": gen_changes, "bool": gen_bool, "purposes": gen_purposes,
    "int64": gen_int64, "gate_id": lambda c, v: gen_id_like(c) if c.index(3) else gen_text(c, 80),
    "offline_decisions": lambda c, v: gen_offline_decisions(c, v),
}
assert set(GENERATORS) == KINDS


def gen_offline_decisions(c, v: Vocab) -> list:
    """A gate's upload (GateService/UploadOfflineDecisions): mostly well-formed decisions of
    known cards with increasing sequences, and what an attacker sends: any scenario, bad
    tokens, repeated or falling sequences, times far off, and now and then more than the
    limit of 10,000."""
    now = int(time.time())
    if c.weighted((995, 5)) == 1:
        return [gate_pb2.OfflineDecision(gate_sequence=i + 1, scenario=gen_scenario(c, v), card_token=gen_token16(c, v),
                                         decided_at_unix=now) for i in range(10_001)]
    out, seq = [], c.choice((0, 1, 2**63))
    for _ in range(c.integer(0, 8)):
        seq = seq + 1 if c.index(5) else c.choice((0, seq, seq - 1 if seq else 0, 2**64 - 1))
        at = now - c.integer(0, 86_400) if c.index(4) else c.choice((0, -1, now + 10**6, 2**62, -(2**62)))
        out.append(gate_pb2.OfflineDecision(
            gate_sequence=min(max(seq, 0), 2**64 - 1), scenario=gen_scenario(c, v), card_token=gen_token(c, v),
            allowed=gen_bool(c, v), list_sequence=gen_uint64(c, v), decided_at_unix=at))
    return out


def gen_message(rpc: Rpc, c, v: Vocab):
    """One request message of ``rpc``, field by field (a field is sometimes left unset)."""
    msg = rpc.request()
    for name, kind in FIELD_KINDS[rpc.name].items():
        if c.weighted((1, 12)) == 0:
            continue
        value = GENERATORS[kind](c, v)
        if isinstance(value, list):
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)
    return msg


def gen_structured(rpc: Rpc, c, v: Vocab):
    """A message, or for a client-streaming rpc a list of them (0 to 6, sometimes 40)."""
    if not rpc.client_streaming:
        return gen_message(rpc, c, v)
    n = c.choice((0, 1, 1, 2, 3, 6)) if c.weighted((9, 1)) == 0 else 40
    return [gen_message(rpc, c, v) for _ in range(n)]


# --- raw wire bytes -----------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mutate_bytes(data: bytes, c) -> bytes:
    """1-3 mutations of serialised protobuf: wire-level damage and odd but valid additions."""
    b = bytearray(data)
    for _ in range(c.choice((1, 1, 1, 2, 3))):
        # about half the results still parse: valid-but-odd wire data reaches the servicers
        op = c.choice((0, 1, 2, 3, 4, 5, 5, 5, 5, 6, 6, 6, 7, 8, 9, 10, 11, 11, 11, 11))
        pos = c.integer(0, len(b))
        if op == 0 and b:  # flip a bit
            i = c.index(len(b))
            b[i] ^= 1 << c.index(8)
        elif op == 1 and b:  # set a byte
            b[c.index(len(b))] = c.choice((0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x08, c.integer(0, 255)))
        elif op == 2:  # insert bytes
            b[pos:pos] = c.raw_bytes(c.integer(1, 8))
        elif op == 3 and b:  # delete a span
            b[pos:pos + c.integer(1, 8)] = b""
        elif op == 4:  # truncate
            del b[pos:]
        elif op == 5:  # append a field: any number, any wire type, any payload
            number = c.choice((1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 2047, 2**29 - 1, 0))
            wire = c.index(8)
            payload = {0: _varint(c.integer(0, 2**64 - 1)), 1: c.raw_bytes(8), 2: _varint(c.integer(0, 40)) + c.raw_bytes(c.integer(0, 40)),
                       5: c.raw_bytes(4)}.get(wire, c.raw_bytes(c.integer(0, 4)))
            b += _varint(number << 3 | wire) + payload
        elif op == 6:  # the message twice (a valid merge)
            b += bytes(b)
        elif op == 7:  # a length prefix that lies
            b += bytes((0x0A,)) + _varint(c.choice((1, 127, 128, 2**31, 2**63))) + c.raw_bytes(c.integer(0, 4))
        elif op == 8:  # an over-long varint
            b += bytes((0x08,)) + b"\xff" * c.integer(9, 12) + b"\x01"
        elif op == 9:  # a string field with invalid UTF-8
            b += bytes((0x0A,)) + _varint(2) + c.choice((b"\xff\xfe", b"\xc0\x80", b"\xed\xa0"))
        elif op == 10:  # unrelated bytes
            b = bytearray(c.raw_bytes(c.integer(0, 64)))
        else:  # a known field again, valid, with another value (the last one wins)
            number = c.integer(1, 8)
            wire = c.choice((0, 2))
            b += _varint(number << 3 | wire) + (_varint(c.integer(0, 2**64 - 1)) if wire == 0 else _varint(3) + b"abc")
    return bytes(b)


def gen_raw(rpc: Rpc, c, v: Vocab) -> bytes | list[bytes]:
    base = gen_structured(rpc, c, v)
    if not rpc.client_streaming:
        return mutate_bytes(base.SerializeToString(), c)
    chunks = [m.SerializeToString() for m in base] or [b""]
    for _ in range(c.integer(1, 2)):
        i = c.index(len(chunks))
        chunks[i] = mutate_bytes(chunks[i], c)
    return chunks


def parse_all(rpc: Rpc, payload: bytes | list[bytes]):
    """The request message(s) as the server will see them, or None if one does not parse."""
    chunks = payload if isinstance(payload, list) else [payload]
    try:
        msgs = [rpc.request.FromString(b) for b in chunks]
    except (DecodeError, ValueError, RuntimeError):
        return None
    return msgs if isinstance(payload, list) else msgs[0]


# --- one input ------------------------------------------------------------------------------------


SMALL_BYTES = 64 * 1024


@dataclass
class Input:
    rpc: Rpc
    payload: bytes | list[bytes]  # what goes on the wire
    structured: bool
    parsed: object  # the message(s) the server will see; None: does not deserialise

    @property
    def size(self) -> int:
        return sum(map(len, self.payload)) if isinstance(self.payload, list) else len(self.payload)

    @property
    def small(self) -> bool:
        return self.size <= SMALL_BYTES and (not isinstance(self.payload, list) or len(self.payload) <= 16)

    @property
    def n_requests(self) -> int:
        return len(self.payload) if isinstance(self.payload, list) else 1


def make_input(rpc: Rpc, c, v: Vocab, raw: bool) -> Input:
    if raw:
        payload = gen_raw(rpc, c, v)
        inp = Input(rpc, payload, False, parse_all(rpc, payload))
    else:
        msg = gen_structured(rpc, c, v)
        payload = [m.SerializeToString() for m in msg] if isinstance(msg, list) else msg.SerializeToString()
        inp = Input(rpc, payload, True, msg)
    note_sent(inp, v)
    return inp


def _messages(inp: Input) -> list:
    if inp.parsed is None:
        return []
    return inp.parsed if isinstance(inp.parsed, list) else [inp.parsed]


def touched_citizens(inp: Input, v: Vocab) -> set[str]:
    out = set()
    for m in _messages(inp):
        if inp.rpc.name in ("RecordsService/CorrectRecord", "RecordsService/WithdrawRecord"):
            cid = v.records.get(m.record_id)
            if cid:
                out.add(cid)
        elif hasattr(m, "citizen_id"):
            out.add(m.citizen_id)
    return out


def note_sent(inp: Input, v: Vocab) -> None:
    """Bookkeeping before the call: what could trigger a known bug."""
    msgs = _messages(inp)
    if inp.rpc.name in SCORE_RPCS:
        with v.lock:
            v.purposes.update(m.purpose for m in msgs)
    if inp.rpc.name == "RecordsService/CorrectRecord":
        for m in msgs:
            if math.isfinite(m.value) and m.value > 1e9 and m.record_id in v.records:
                with v.lock:
                    v.poisoned.add(v.records[m.record_id])


#: How many decision ids a run remembers for ReplayDecision.
_DECISION_IDS = 256


def note_answer(inp: Input, out: Outcome, v: Vocab) -> None:
    """Bookkeeping after the call: records that now exist, decisions that can be replayed."""
    if inp.rpc.name == "EligibilityService/Check" and out.responses and len(v.decision_ids) < _DECISION_IDS:
        try:
            decision_id = eligibility_pb2.Decision.FromString(out.responses[0]).decision_id
        except DecodeError:
            return
        if decision_id:
            with v.lock:
                v.decision_ids.append(decision_id)
        return
    if inp.rpc.name != "RecordsService/IngestRecords" or not out.responses:
        return
    sent = {m.record_id: m.citizen_id for m in _messages(inp)}
    for raw in out.responses:
        try:
            ack = records_pb2.RecordAck.FromString(raw)
        except DecodeError:
            continue
        if ack.status == records_pb2.RecordAck.ACCEPTED and ack.record_id in sent:
            with v.lock:
                v.records[ack.record_id] = sent[ack.record_id]


# --- calling and judging --------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    elapsed: float
    deadline: float
    responses: list[bytes]


def deadline_for(inp: Input) -> float:
    return 10.0 if inp.small else 60.0


def call(channel: grpc.Channel, inp: Input, deadline: float | None = None) -> Outcome:
    """Send ``inp`` through a raw method (identity serialisers) and wait for the end."""
    rpc = inp.rpc
    deadline = deadline_for(inp) if deadline is None else deadline
    t0 = time.monotonic()
    responses: list[bytes] = []
    try:
        if rpc.client_streaming and rpc.server_streaming:
            responses.extend(channel.stream_stream(rpc.path)(iter(inp.payload), timeout=deadline))
        elif rpc.client_streaming:
            responses.append(channel.stream_unary(rpc.path)(iter(inp.payload), timeout=deadline))
        elif rpc.server_streaming:
            responses.extend(channel.unary_stream(rpc.path)(inp.payload, timeout=deadline))
        else:
            responses.append(channel.unary_unary(rpc.path)(inp.payload, timeout=deadline))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    return Outcome(code, details, time.monotonic() - t0, deadline, responses)


def judge(inp: Input, out: Outcome) -> str | None:
    """The property; None if it holds, else what went wrong."""
    code = out.code
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return f"{code.name}: {out.details[:200]}"
    if code != grpc.StatusCode.OK and not out.details.strip():
        return f"{code.name} without a message"
    if "metadata size exceeds" in out.details:
        return f"{code.name}: the server's answer did not reach the client ({out.details[:120]})"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and inp.small:
        return f"hang: DEADLINE_EXCEEDED after {out.elapsed:.1f} s on a small request ({inp.size} bytes)"
    if out.elapsed > out.deadline + 5:
        return f"hang: the call returned {out.elapsed:.1f} s after it started, deadline {out.deadline:.0f} s"
    if code == grpc.StatusCode.OK:
        for raw in out.responses:
            try:
                inp.rpc.response.FromString(raw)
            except DecodeError as exc:
                return f"OK with a response that does not parse: {exc}"
        if inp.rpc.client_streaming and inp.rpc.server_streaming and len(out.responses) != inp.n_requests:
            return f"OK with {len(out.responses)} answers to {inp.n_requests} requests"
    return None


FLOAT32_MAX = 3.4028234663852886e38


def overflowing_citizens(db_path: Path, inp: Input) -> set[str]:
    """Of the citizens ``inp`` writes to, those whose active records in the store overflow a
    float32 feature (bug B2: a value, or a variable's sum of values, above float32's range).
    Read-only, from the server's SQLite file."""
    msgs = _messages(inp)
    if not msgs or not db_path.exists():
        return set()
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        ids = set()
        for m in msgs:
            if inp.rpc.name in ("RecordsService/CorrectRecord", "RecordsService/WithdrawRecord"):
                row = db.execute("SELECT c.citizen_id FROM records r JOIN citizens c ON c.citizen_row = r.citizen_row"
                                 " WHERE r.record_id = ?", (m.record_id,)).fetchone()
                if row:
                    ids.add(row[0])
            elif hasattr(m, "citizen_id"):
                ids.add(m.citizen_id)
        out = set()
        for cid in ids:
            row = db.execute("SELECT MAX(total) FROM (SELECT SUM(ABS(r.value)) AS total FROM records r JOIN citizens c"
                             " ON c.citizen_row = r.citizen_row WHERE c.citizen_id = ? AND r.status = 'active'"
                             " GROUP BY r.variable)", (cid,)).fetchone()
            if row and row[0] is not None and row[0] > FLOAT32_MAX:
                out.add(cid)
        return out
    except sqlite3.Error:
        return set()
    finally:
        db.close()


def known_bug(inp: Input, out: Outcome, v: Vocab | None, db_path: Path | None = None) -> str | None:
    """Which open bug of :data:`KNOWN_BUGS` explains a failure, if one does."""
    bug = _classify(inp, out, v, db_path)
    return bug if bug in KNOWN_BUGS else None


def _classify(inp: Input, out: Outcome, v: Vocab | None, db_path: Path | None = None) -> str | None:
    """Which bug a failure looks like (``db_path``: the server's SQLite file, to tell a B2
    citizen when the vocabulary does not know it), open or fixed."""
    if inp.parsed is None and out.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        return "B1"  # what grpcio answers (threads: INTERNAL, grpc.aio: UNKNOWN) or the servicer raises
    if out.code != grpc.StatusCode.INTERNAL:
        return None
    if v is None or out.details != "internal error":
        return None
    name = inp.rpc.name
    if name == "RecordsService/CorrectRecord" and any(math.isfinite(m.value) and m.value > 1e9 for m in _messages(inp)):
        return "B2"
    if name in RESCORING_WRITES and (touched_citizens(inp, v) & v.poisoned or (db_path and overflowing_citizens(db_path, inp))):
        return "B2"
    if name in SCORE_RPCS and len(v.purposes) >= AUDIT_DICTIONARY_SIZE:
        return "B3"
    return None


# --- the corpus -----------------------------------------------------------------------------------


def frame(chunks: list[bytes]) -> bytes:
    """A client stream in one file: each message with a varint length prefix."""
    return b"".join(_varint(len(b)) + b for b in chunks)


def unframe(data: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = shift = 0
        while True:
            byte = data[i]
            i += 1
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append(data[i:i + n])
        i += n
    return out


def corpus_name(rpc_slug: str, data: bytes, tag: str = "", ext: str = "bin") -> str:
    digest = hashlib.sha256(data).hexdigest()[:10]
    return f"{rpc_slug}-{tag + '-' if tag else ''}{digest}.{ext}"


def save_input(inp: Input, directory: Path, tag: str = "") -> Path:
    data = frame(inp.payload) if isinstance(inp.payload, list) else inp.payload
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / corpus_name(inp.rpc.slug, data, tag)
    path.write_bytes(data)
    return path


_CORPUS_RE = re.compile(r"^(?P<slug>[A-Za-z]+\.[A-Za-z]+)-(?:known-(?P<bug>B\d+)-)?[0-9a-f]{10}\.bin$")


def load_input(path: Path) -> tuple[Input, str | None]:
    """A saved rpc input and the known bug its name says it shows (or None)."""
    m = _CORPUS_RE.match(path.name)
    if not m:
        raise ValueError(f"{path.name}: not <Service>.<Method>-[known-Bn-]<10 hex>.bin")
    rpc = rpc_by_slug(m["slug"])
    data = path.read_bytes()
    payload = unframe(data) if rpc.client_streaming else data
    return Input(rpc, payload, False, parse_all(rpc, payload)), m["bug"]


# --- the record parser ----------------------------------------------------------------------------


def check_record(fields: dict, service) -> str | None:
    """Parse one Record as IngestRecords does (server/convert.py, then the service's
    validation). Only InvalidArgument naming a ``record.`` field may come out; a record that
    passes has an ISO date that round-trips and gives finite features, even 10,000 times over."""
    from kernel.features import Records, build_features
    from server import convert
    from server.errors import InvalidArgument
    from server.state import iso_of

    try:
        msg = records_pb2.Record(**fields)
    except (TypeError, ValueError):  # a value protobuf itself refuses: never reaches the parser
        return None
    try:
        rec = convert.record_in(msg, 0)
        service._check_record(rec)
    except InvalidArgument as exc:
        if not exc.field.startswith("record.") or not str(exc).startswith(exc.field + ": ") or len(str(exc)) <= len(exc.field) + 2:
            return f"InvalidArgument without a record field and a message: {str(exc)[:200]!r}"
        return None
    except Exception as exc:  # noqa: BLE001 - the property: nothing else
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if iso_of(rec.day) != msg.date:
        return f"date {msg.date!r} accepted as day {rec.day} = {iso_of(rec.day)}"
    spec = service.spec
    k = 10_000
    records = Records(np.zeros(k, np.int64), np.full(k, spec.variable_index(rec.variable), np.int16),
                      np.full(k, rec.day, np.int32), np.full(k, rec.value, np.float32))
    try:
        feats = build_features(spec, records, 1, service.state.as_of_day)
    except Exception as exc:  # noqa: BLE001
        return f"accepted record breaks the features: {type(exc).__name__}: {str(exc)[:200]}"
    if not np.isfinite(feats).all():
        return f"accepted record (value {rec.value!r}) gives non-finite features"
    return None


def gen_record_fields(c, v: Vocab) -> dict:
    rpc = rpc_by_slug("RecordsService.IngestRecords")
    return {name: GENERATORS[kind](c, v) for name, kind in FIELD_KINDS[rpc.name].items() if c.weighted((1, 12))}


def check_date(value: str) -> str | None:
    """parse_date: an int for exactly the YYYY-MM-DD dates, else InvalidArgument naming the field."""
    from server.convert import parse_date
    from server.errors import InvalidArgument
    from server.state import iso_of

    try:
        day = parse_date(value, "date")
    except InvalidArgument as exc:
        return None if str(exc).startswith("date: ") and exc.field == "date" else f"InvalidArgument {str(exc)[:120]!r}"
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    if not isinstance(day, int) or iso_of(day) != value:
        return f"{value!r} accepted as day {day!r}"
    return None


# --- the spec parser ------------------------------------------------------------------------------


def to_toml(doc: dict) -> str:
    """TOML text for a parsed document (the subset of shapes a spec has, and mutations of it):
    top-level values, [tables] and [[arrays of tables]], deeper tables inline."""
    lines = []
    scalars = {k: v for k, v in doc.items() if not _is_table(v) and not _is_table_array(v)}
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in doc.items():
        if _is_table(v):
            lines.append(f"\n[{_key(k)}]")
            lines += [f"{_key(kk)} = {_value(vv)}" for kk, vv in v.items()]
        elif _is_table_array(v):
            for item in v:
                lines.append(f"\n[[{_key(k)}]]")
                lines += [f"{_key(kk)} = {_value(vv)}" for kk, vv in item.items()]
    return "\n".join(lines) + "\n"


def _is_table(v) -> bool:
    return isinstance(v, dict)


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _string(k)


def _string(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}")


WEIRD_VALUES = (
    "", " ", "x", "hukou", "health_records", "钱江", "\x00", "a" * 5000, 0, -1, 1, 2, 549, 550, 1000, 32767, 32768,
    2**31, 2**63 - 1, -(2**63), 10**30, 0.0, -0.0, 1e-300, 5e-324, 1e308, -1e308, math.nan, math.inf, -math.inf,
    True, False, [], [1], [0.0, 1.0], [1.0, 0.0], ["a"], [[1.0]], {}, {"x": 1}, {"kind": "knots"},
    _dt.datetime(1979, 5, 27, 7, 32, tzinfo=_dt.UTC), _dt.date(2024, 1, 1), _dt.time(7, 32),
)


def _paths(node, prefix=()):
    """Every (container, key) in a document, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for k, v in list(items):
        yield node, k
        if isinstance(v, (dict, list)):
            yield from _paths(v, prefix + (k,))


def mutate_doc(doc: dict, c) -> dict:
    """1-3 structural mutations of a parsed spec document (in place; returned)."""
    for _ in range(c.integer(1, 3)):
        paths = list(_paths(doc))
        if not paths:
            break
        parent, key = c.choice(paths)
        value = parent[key]
        op = c.index(9)
        if op == 0:  # drop it
            del parent[key]
        elif op == 1:  # another type or an edge value
            parent[key] = c.choice(WEIRD_VALUES)
        elif op == 2 and isinstance(value, (int, float)) and not isinstance(value, bool):
            parent[key] = c.choice((value * 2, value + 1, -value, value * 1e300, value / 3, value + 1e-12, int(value) if math.isfinite(value) else 0))
        elif op == 3 and isinstance(value, list) and value:  # duplicate, drop or reorder elements
            which = c.index(3)
            if which == 0:
                value.append(json.loads(json.dumps(c.choice(value), default=str)) if isinstance(value[0], (dict, list)) else c.choice(value))
            elif which == 1:
                del value[c.index(len(value))]
            else:
                value.reverse()
        elif op == 4 and isinstance(parent, dict):  # an unknown key beside it
            parent[c.choice(("weigth", "extra", "", "x y", "名"))] = c.choice(WEIRD_VALUES)
        elif op == 5 and isinstance(parent, dict):  # renamed
            parent[c.choice(("Name", key + "_", key.upper() if isinstance(key, str) else "k"))] = parent.pop(key)
        elif op == 6 and isinstance(value, str):
            parent[key] = c.choice((value + " ", value.upper(), value[:-1], value + "\x00", "", value * 2, "hukou_" + value))
        elif op == 7 and isinstance(value, dict) and value:  # swap two values
            k1, k2 = c.choice(list(value)), c.choice(list(value))
            value[k1], value[k2] = value[k2], value[k1]
        else:  # a list of many
            parent[key] = [value] * c.choice((2, 9, 200))
    return doc


def mutate_text(data: bytes, c) -> bytes:
    """Line- and byte-level mutations of spec text (what a hand edit or a bad copy does)."""
    lines = data.split(b"\n")
    for _ in range(c.integer(1, 3)):
        op = c.index(8)
        i = c.index(len(lines)) if lines else 0
        if op == 0 and lines:
            del lines[i]
        elif op == 1 and lines:
            lines.insert(i, lines[c.index(len(lines))])
        elif op == 2 and lines:
            j = c.index(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3 and lines:  # a number becomes something else
            lines[i] = re.sub(rb"-?[0-9]+(\.[0-9]+)?", lambda m: c.choice(
                (b"nan", b"inf", b"-inf", b"1e999", b"-0.0", b"0x" + b"f" * 4000, b"1" + b"0" * 5000, b"99999999999999999999", b"1_000", b"0o777", b"true", b'"1"')), lines[i], count=1)
        elif op == 4 and lines:
            lines[i] = mutate_bytes(lines[i], c)
        elif op == 5:
            lines.insert(i, c.choice((b"x = " + b"[" * 3000 + b"]" * 3000, b"[model]", b"[[variables]]", b"\xff\xfe", b"a = 1\x00",
                                      b"levels = 3", b"[dimensions.wealth]", b'"" = 1', b"x = { a = { b = { c = 1 } } }")))
        elif op == 6:
            del lines[i:]
        else:
            lines[i:i] = [b"[[levels]]", b'code = "x"', b"min = %d" % c.integer(-5, 2000), b'zh = "x"', b'en = "x"']
    return b"\n".join(lines)


_SPEC_DOC = tomllib.loads(SPEC_TEXT.decode())


def spec_doc() -> dict:
    """A fresh copy of the parsed kernel/models/v1.toml."""
    return json.loads(json.dumps(_SPEC_DOC))


def gen_spec(c) -> dict | bytes:
    """A mutated kernel/models/v1.toml: a parsed document mutated structurally, or the text
    mutated (bytes)."""
    if c.index(2) == 0:
        return mutate_doc(spec_doc(), c)
    return mutate_text(SPEC_TEXT, c)


def spec_bytes(spec_input: dict | bytes) -> bytes:
    return spec_input if isinstance(spec_input, bytes) else to_toml(spec_input).encode()


def check_spec(spec_input: dict | bytes, path: Path) -> str | None:
    """:func:`check_spec_bytes` for text, :func:`check_spec_doc` for a parsed document."""
    return check_spec_bytes(spec_input, path) if isinstance(spec_input, bytes) else check_spec_doc(spec_input)


def check_spec_doc(doc: dict) -> str | None:
    """kernel.spec.parse_spec on a parsed document: a ModelSpec or a SpecError naming the key."""
    from kernel.spec import SpecError, parse_spec

    try:
        spec = parse_spec(doc)
    except SpecError as exc:
        return None if _SPEC_MESSAGE.match(str(exc)) else f"SpecError that names no key: {str(exc)[:200]!r}"
    except Exception as exc:  # noqa: BLE001 - the property: nothing else
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return check_loaded_spec(spec)


_SPEC_MESSAGE = re.compile(r"^(spec|model|levels|dimensions|variables)(\.|\[|:)")


def check_spec_bytes(data: bytes, path: Path) -> str | None:
    """Load spec text the way the server does (kernel.spec.load_spec on a file): a ModelSpec or
    a SpecError naming the key (or the file), nothing else; an accepted spec compiles to
    arrays the kernel can use (finite, in the ranges of its column types)."""
    from kernel.features import variable_tables
    from kernel.spec import SpecError, load_spec

    path.write_bytes(data)
    try:
        spec = load_spec(path)
    except SpecError as exc:
        text = str(exc)
        if not (text.startswith(f"{path}: ") or _SPEC_MESSAGE.match(text)):
            return f"SpecError that names no key: {text[:200]!r}"
        return None
    except Exception as exc:  # noqa: BLE001 - the property: nothing else
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return check_loaded_spec(spec, variable_tables)


def check_loaded_spec(spec, variable_tables=None) -> str | None:
    if variable_tables is None:
        from kernel.features import variable_tables
    c = spec.compiled
    for name in ("y0", "term_x", "term_inv_width", "term_delta", "best", "loss_weight", "weights"):
        if not np.isfinite(getattr(c, name)).all():
            return f"accepted spec compiles to non-finite {name}"
    if not (math.isfinite(c.raw_min) and math.isfinite(c.raw_max) and c.raw_min <= c.raw_max):
        return f"accepted spec has raw range [{c.raw_min}, {c.raw_max}]"
    if not (0 <= spec.scale_min < spec.scale_max <= 32767 and len(spec.levels) <= 127):
        return f"accepted spec's scale [{spec.scale_min}, {spec.scale_max}] or {len(spec.levels)} levels do not fit the score columns"
    try:
        variable_tables(spec)
        spec.model_version.encode()
    except Exception as exc:  # noqa: BLE001
        return f"accepted spec breaks the feature tables: {type(exc).__name__}: {str(exc)[:200]}"
    return None


# --- the long run ---------------------------------------------------------------------------------


@dataclass
class Tally:
    inputs: int = 0
    structured: int = 0
    raw: int = 0
    statuses: Counter = field(default_factory=Counter)
    failures: int = 0
    known: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)
    max_seconds: float = 0.0


class Fuzzer:
    def __init__(self, target: str, vocab: Vocab, inputs: int, seed: int, concurrency: int, raw_share: float,
                 corpus: Path | None, strict: bool, log):
        from clients.client import QianjiangClient

        self.client = QianjiangClient(target, timeout=10)
        self.channel = self.client.channel
        self.vocab = vocab
        self.rpcs = rpcs()
        self.inputs, self.seed, self.concurrency, self.raw_share = inputs, seed, concurrency, raw_share
        self.corpus, self.strict, self.log = corpus, strict, log
        self.tally = {rpc.name: Tally() for rpc in self.rpcs}
        self.lock = threading.Lock()
        self.next_job = 0
        self.saved: list[str] = []
        self.saved_per: Counter = Counter()
        self.probes = 0
        self.probe_failures: list[str] = []
        self.stop = threading.Event()
        self.db_path: Path | None = None

    def _job(self) -> int | None:
        with self.lock:
            if self.next_job >= self.inputs * len(self.rpcs):
                return None
            self.next_job += 1
            return self.next_job - 1

    def worker(self, wid: int) -> None:
        c = RandomChooser(random.Random(self.seed * 1_000_003 + wid))
        while not self.stop.is_set():
            job = self._job()
            if job is None:
                return
            rpc = self.rpcs[job % len(self.rpcs)]
            raw = c.rng.random() < self.raw_share
            inp = make_input(rpc, c, self.vocab, raw)
            out = call(self.channel, inp)
            note_answer(inp, out, self.vocab)
            self.record(inp, out)

    def record(self, inp: Input, out: Outcome) -> None:
        problem = judge(inp, out)
        bug = known_bug(inp, out, self.vocab, self.db_path) if problem else None
        t = self.tally[inp.rpc.name]
        with self.lock:
            t.inputs += 1
            t.structured += inp.structured
            t.raw += not inp.structured
            t.statuses[out.code.name] += 1
            t.max_seconds = max(t.max_seconds, out.elapsed)
            if problem is None:
                return
            if bug is not None:  # saved under its bug's name, also with --strict
                t.known[bug] += 1
                key, cap, tag = (inp.rpc.name, bug), 2, f"known-{bug}"
            else:
                key, cap, tag = (inp.rpc.name, out.code.name, out.details[:40]), 5, ""
            if bug is None or self.strict:
                t.failures += 1
                if len(t.examples) < 5:
                    t.examples.append(problem)
            save = self.corpus is not None and self.saved_per[key] < cap
            if save:
                self.saved_per[key] += 1
        if save:
            path = save_input(inp, self.corpus, tag)
            with self.lock:
                self.saved.append(path.name)

    def probe(self) -> str | None:
        """The known-good requests: the server must still answer them."""
        qj = self.client
        try:
            if qj.health() != "SERVING":
                return "health is not SERVING"
            qj.get_score(self.probe_citizen)
            if qj.check(self.vocab.scenarios[0], self.probe_token).outcome == eligibility_pb2.UNKNOWN_CARD:
                return "the probe citizen's card is unknown"
            if not qj.scenarios():
                return "ListScenarios is empty"
        except grpc.RpcError as exc:
            return f"known-good request failed: {exc.code().name}: {exc.details()}"
        self.probes += 1
        return None

    def prober(self) -> None:
        while not self.stop.wait(1.0):
            problem = self.probe()
            if problem:
                with self.lock:
                    self.probe_failures.append(problem)

    def figures(self) -> dict:
        with self.lock:
            return {
                name: {"inputs": t.inputs, "structured": t.structured, "raw": t.raw, "statuses": dict(t.statuses.most_common()),
                       "failures": t.failures, "known_bug_hits": dict(t.known), "max_call_seconds": round(t.max_seconds, 3),
                       **({"examples": list(t.examples)} if t.examples else {})}
                for name, t in self.tally.items()
            }

    def run(self, checkpoint: Path | None = None) -> float:
        """Fuzz until done or ``self.stop``; every 10 s, progress to stderr and the figures so
        far to ``checkpoint`` (what is left of a run that was killed)."""
        t0 = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(i,), daemon=True) for i in range(self.concurrency)]
        prober = threading.Thread(target=self.prober, daemon=True)
        for t in threads:
            t.start()
        prober.start()
        total = self.inputs * len(self.rpcs)
        last = 0.0
        while any(t.is_alive() for t in threads):
            time.sleep(0.5)
            now = time.monotonic()
            if now - last >= 10:
                last = now
                done = sum(t.inputs for t in self.tally.values())
                rate = done / max(now - t0, 1e-9)
                fails = sum(t.failures for t in self.tally.values())
                known = sum(sum(t.known.values()) for t in self.tally.values())
                self.log(f"{done}/{total} inputs ({rate:.0f}/s, eta {(total - done) / max(rate, 1e-9):.0f} s), "
                         f"{fails} failures, {known} known-bug hits, {len(self.probe_failures)} failed probes")
                if checkpoint is not None:
                    checkpoint.write_text(json.dumps({"seconds": round(now - t0, 1), "inputs": done, "probes": self.probes,
                                                      "probe_failures": self.probe_failures[:5], "rpcs": self.figures()}))
        self.stop.set()
        prober.join()
        final = self.probe()
        if final:
            self.probe_failures.append(final)
        return time.monotonic() - t0


def make_probe(client, tag: str) -> tuple[str, bytes]:
    """A citizen of the probes' own (an adult who consents, with a card), whose id and token
    no generator uses and no few mutations of theirs reach: what the fuzzing does to the city
    (revoked consents, changed birth dates) never touches it."""
    cid = f"zz-probe-{tag}-{os.urandom(4).hex()}"
    token = os.urandom(16)
    client.upsert_citizen(cid, "1980-06-15")
    client.grant_consent(cid)
    client.register_card(cid, token)
    client.get_score(cid)
    return cid, token


def _seed_records(data_dir: Path, limit: int = 300) -> dict[str, str]:
    db = sqlite3.connect(f"file:{data_dir / 'qianjiang.db'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT r.record_id, c.citizen_id FROM records r JOIN citizens c ON c.citizen_row = r.citizen_row"
                          " ORDER BY r.id LIMIT ?", (limit,)).fetchall()
    except sqlite3.Error:
        rows = []
    finally:
        db.close()
    return dict(rows)


def server_exceptions(log_path: Path) -> Counter:
    """The server's logged exceptions: the last line of each traceback, numbers masked."""
    out: Counter = Counter()
    if not log_path or not log_path.exists():
        return out
    in_tb = False
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("Traceback"):
            in_tb = True
            continue
        if in_tb and line and not line.startswith((" ", "\t")):
            in_tb = False
            out[re.sub(r"\d+", "N", line)[:160]] += 1
    return out


def _known_server_exception(line: str) -> str | None:
    if "DecodeError" in line or "Error parsing message" in line or "UnicodeDecodeError" in line:
        return "B1"
    if re.search(r"records\[N\]\.value: inf is not a finite number|features\[N, N\].*(inf|nan)", line):
        return "B2"
    if "too many distinct scenario values" in line:
        return "B3"
    return None


def fuzz_parsers(n_records: int, n_specs: int, seed: int, work: Path, corpus: Path | None, log) -> dict:
    """The record and spec parsers in-process: a small city of our own for the service."""
    from prometheus_client import CollectorRegistry

    from server.app import Node, Runtime, ServerConfig
    from server.metrics import Metrics

    config = ServerConfig(data_dir=work / "parser-data", seed_citizens=300, seed=seed, metrics_port=0, port=0)
    runtime = Runtime.prepare(config)
    node = Node(runtime, port=0, metrics=Metrics(CollectorRegistry()))
    runtime.load()
    service = node.attach()
    rng = random.Random(seed)
    c = RandomChooser(rng)
    v = Vocab(citizens=[f"c{r:08d}" for r in range(300)], tokens=[], scenarios=list(service.scenarios),
              pay_later=[s.name for s in service.scenarios.values() if s.pay_later],
              variables=[x.name for x in service.spec.variables], records={}, as_of_day=runtime.state.as_of_day, run_tag="p")
    out = {}
    t0 = time.monotonic()
    fails, examples, accepted = 0, [], 0
    for i in range(n_records):
        fields = gen_record_fields(c, v) if i % 4 else {"date": gen_date(c, v)}
        problem = check_record(fields, service) if i % 4 else check_date(fields["date"])
        if problem is None and i % 4:
            accepted += 1
        if problem:
            fails += 1
            examples = (examples + [problem])[:5]
            if corpus is not None:
                data = json.dumps(fields, ensure_ascii=False, default=repr).encode()
                corpus.mkdir(parents=True, exist_ok=True)
                (corpus / f"record-{hashlib.sha256(data).hexdigest()[:10]}.json").write_bytes(data)
    out["record"] = {"inputs": n_records, "failures": fails, "examples": examples, "seconds": round(time.monotonic() - t0, 1)}
    log(f"record parser: {n_records} inputs, {fails} failures")
    node.drain(0)

    t0 = time.monotonic()
    fails, examples = 0, []
    path = work / "spec-under-test.toml"
    for i in range(n_specs):
        spec_input = gen_spec(c)
        problem = check_spec(spec_input, path)
        if problem:
            fails += 1
            examples = (examples + [problem])[:5]
            if corpus is not None:
                data = spec_bytes(spec_input)
                corpus.mkdir(parents=True, exist_ok=True)
                (corpus / f"spec-{hashlib.sha256(data).hexdigest()[:10]}.toml").write_bytes(data)
        if i and i % 5000 == 0:
            log(f"spec parser: {i}/{n_specs}, {fails} failures")
    out["spec"] = {"inputs": n_specs, "failures": fails, "examples": examples, "seconds": round(time.monotonic() - t0, 1)}
    log(f"spec parser: {n_specs} inputs, {fails} failures")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", type=int, default=100_000, help="inputs per rpc (default %(default)s)")
    p.add_argument("--parser-inputs", type=int, default=None, help="inputs per parser (default: --inputs, at most 50,000 for the spec)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=24, help="calls in flight (default %(default)s)")
    p.add_argument("--raw-share", type=float, default=0.4, help="share of raw-bytes inputs (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--corpus", default=str(CORPUS_DIR), help="where failing inputs go ('' : nowhere)")
    p.add_argument("--strict", action="store_true", help="count known-bug hits as failures")
    p.add_argument("--work-dir", default=None, help="data and logs (default: a temporary directory, kept on failure)")
    args = p.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)

    missing = missing_strategies()
    if missing:
        log("rpcs without a fuzzing strategy:\n  " + "\n  ".join(missing))
        return 2
    from loadtest.crash_soak import N_CITIZENS, ServerProcess, _free_port, citizen_id
    from server.keys import card_token, load_keys, synthetic_card_number

    corpus = Path(args.corpus) if args.corpus else None
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="qj-fuzz-"))
    data_dir, log_dir = work / "data", work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(data_dir, log_dir, _free_port(), args.workers)
    t_start = time.monotonic()
    log(f"starting the server ({N_CITIZENS} citizens) in {work}")
    server.start()
    ok = False
    try:
        keys = load_keys(data_dir)
        tokens = [card_token(keys.card, synthetic_card_number(row)) for row in range(N_CITIZENS)]
        from kernel.spec import load_spec
        from server.scenarios import load_scenarios
        from server.state import today

        scenarios = load_scenarios()
        spec = load_spec()
        vocab = Vocab(
            citizens=[citizen_id(r) for r in range(N_CITIZENS)], tokens=tokens,
            scenarios=list(scenarios), pay_later=[s.name for s in scenarios.values() if s.pay_later],
            variables=[x.name for x in spec.variables], records=_seed_records(data_dir), as_of_day=today(),
            run_tag=f"s{args.seed}",
        )
        fz = Fuzzer(server.target, vocab, args.inputs, args.seed, args.concurrency, args.raw_share, corpus, args.strict, log)
        fz.target = server.target
        fz.probe_citizen, fz.probe_token = make_probe(fz.client, f"s{args.seed}")
        fz.db_path = data_dir / "qianjiang.db"
        log(f"fuzzing {len(fz.rpcs)} rpcs x {args.inputs} inputs, {args.concurrency} in flight")
        interrupted = []
        for signum in (signal.SIGTERM, signal.SIGHUP):  # stop early, still report
            signal.signal(signum, lambda signum, frame: (interrupted.append(signum), fz.stop.set()))
        rpc_seconds = fz.run(work / "progress.json")
        fz.client.close()
        drained = True
        try:
            code = server.stop(timeout=20)
        except RuntimeError as exc:  # did not drain: a hang (bug B4 once)
            log(str(exc).splitlines()[0])
            drained, code = False, None
            server.kill()
        exceptions = server_exceptions(server.log_path)
        n_parser = 0 if interrupted else args.parser_inputs if args.parser_inputs is not None else args.inputs
        parsers = fuzz_parsers(n_parser, min(n_parser, 50_000) if args.parser_inputs is None else n_parser,
                               args.seed, work, corpus, log)
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()

    unexplained = {line: n for line, n in exceptions.items() if _known_server_exception(line) not in KNOWN_BUGS}
    known_hits = Counter()
    for t in fz.tally.values():
        known_hits.update(t.known)
    failures = (sum(t.failures for t in fz.tally.values()) + len(fz.probe_failures) + sum(unexplained.values())
                + parsers["record"]["failures"] + parsers["spec"]["failures"] + (not drained))
    figures = {
        "inputs_per_rpc": args.inputs,
        "rpcs": fz.figures(),
        "parsers": parsers,
        "probes": fz.probes,
        "probe_failures": fz.probe_failures[:5],
        "server_exceptions": dict(exceptions.most_common()),
        "server_unexplained_exceptions": unexplained,
        "server_exit_code": code,
        "server_drained": drained,
        "failures": failures,
        "known_bug_hits": dict(known_hits),
        "known_bugs": {k: KNOWN_BUGS[k] for k in sorted(known_hits)},
        "corpus_saved": fz.saved,
        "rpc_seconds": round(rpc_seconds, 1),
        "rpc_inputs_per_second": round(sum(t.inputs for t in fz.tally.values()) / max(rpc_seconds, 1e-9), 1),
        "elapsed_seconds": round(time.monotonic() - t_start, 1),
        "seed": args.seed,
        "strict": args.strict,
        **({"interrupted_by_signal": interrupted[0]} if interrupted else {}),
    }
    ok = failures == 0 and code == 0 and not interrupted
    if ok and not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    else:
        figures["work_dir"] = str(work)
        (work / "result.json").write_text(json.dumps(figures, ensure_ascii=False))
    print(json.dumps(figures, ensure_ascii=False))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
