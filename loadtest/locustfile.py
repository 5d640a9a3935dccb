"""A day's traffic mix for Locust against a server seeded with the synthetic city.

    QJ_DATA_DIR=data QJ_CITIZENS=100000 locust -f loadtest/locustfile.py --host 127.0.0.1:50051
    loadtest/run_locust.sh 127.0.0.1:50051 30s 50          # the same, headless, CSV in data/locust/

* GatewayUser (most users, each sending ~20x an app user's requests): metro and bus gates
  ask Check for cards of the city, 2 % of them unknown cards. About 15 % of citizens have
  not authorised and about 16 % are minors, so NOT_AUTHORISED and UNDER_18 answers come in
  their real shares. Now and then a station gateway sends a BatchCheck of 1,000 cards.
* AppUser: a citizen app reads a score, its explanation or who checked the citizen.
  FAILED_PRECONDITION (not authorised, under 18) is the correct answer there, not a failure.
* SourceUser (always exactly one, whatever the user count): a utility company pushes one
  on-time payment record at a time.

Card tokens are keyed hashes, so the key is read from the server's data directory
(``QJ_DATA_DIR``, default ``data``, or ``QJ_CARD_KEY``); ``QJ_CITIZENS`` (default 100000)
is the size of the city the server was seeded with.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import random
import uuid
from pathlib import Path

import grpc
from locust import between, task

from loadtest.grpc_user import GrpcUser
from qianjiang.v1 import (
    audit_pb2, audit_pb2_grpc, eligibility_pb2, eligibility_pb2_grpc, records_pb2, records_pb2_grpc, score_pb2, score_pb2_grpc,
)
from server.keys import card_token, existing_card_key, synthetic_card_number

CITIZENS = int(os.environ.get("QJ_CITIZENS", "100000"))
UNKNOWN_CARD_SHARE = 0.02
GATES = ("metro_pay_later", "bus_pay_later")
#: Not authorised or under 18: the service's correct answer to a score read for them.
REFUSED = (grpc.StatusCode.FAILED_PRECONDITION,)


@functools.cache
def city_tokens() -> list[bytes]:
    data_dir = Path(os.environ.get("QJ_DATA_DIR", "data"))
    try:
        key = existing_card_key(data_dir)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{exc}: set QJ_DATA_DIR to the server's data directory") from None
    return [card_token(key, synthetic_card_number(row)) for row in range(CITIZENS)]


def a_card() -> bytes:
    return random.randbytes(16) if random.random() < UNKNOWN_CARD_SHARE else random.choice(city_tokens())


def a_citizen() -> str:
    return f"c{random.randrange(CITIZENS):08d}"


class GatewayUser(GrpcUser):
    weight = 85
    wait_time = between(0.01, 0.1)

    def on_start(self):
        self.stub = eligibility_pb2_grpc.EligibilityServiceStub(self.channel)
        city_tokens()  # before the first timed call

    @task(200)
    def check(self):
        self.call("Check", self.stub.Check, eligibility_pb2.CheckRequest(scenario=random.choice(GATES), card_token=a_card()))

    @task(1)
    def batch_check(self):
        tokens = b"".join(a_card() for _ in range(1000))
        self.call("BatchCheck", self.stub.BatchCheck, eligibility_pb2.BatchCheckRequest(scenario=random.choice(GATES), card_tokens=tokens))


class AppUser(GrpcUser):
    weight = 15
    wait_time = between(0.2, 1.0)

    def on_start(self):
        self.scores = score_pb2_grpc.ScoreServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)

    @task(5)
    def get_score(self):
        self.call("GetScore", self.scores.GetScore, score_pb2.GetScoreRequest(citizen_id=a_citizen(), purpose="citizen_app_view"), ok_codes=REFUSED)

    @task(3)
    def explain_score(self):
        self.call("ExplainScore", self.scores.ExplainScore, score_pb2.GetScoreRequest(citizen_id=a_citizen(), purpose="citizen_app_view"), ok_codes=REFUSED)

    @task(2)
    def list_checks(self):
        self.call("ListChecks", self.audit.ListChecks, audit_pb2.ListChecksRequest(citizen_id=a_citizen(), limit=20))


class SourceUser(GrpcUser):
    fixed_count = 1  # spawned first; by weight it would get no user below ~50 users
    wait_time = between(1.0, 3.0)

    def on_start(self):
        self.records = records_pb2_grpc.RecordsServiceStub(self.channel)

    @task
    def ingest(self):
        record = records_pb2.Record(
            record_id=f"locust-{uuid.uuid4().hex}", citizen_id=a_citizen(), variable="utility_on_time_months",
            date=dt.date.today().isoformat(), value=1.0, source="utilities",
        )
        self.call("IngestRecords", self.records.IngestRecords, iter([record]))
