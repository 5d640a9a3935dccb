"""A typed Python client for the Qianjiang Score service.

    >>> with QianjiangClient("127.0.0.1:50051") as qj:                       # doctest: +SKIP
    ...     qj.check("campus_fitness", card_token).allowed
    True

Every call carries a deadline (``timeout`` seconds, default 2 s; set per client or per
call). Calls are retried only on UNAVAILABLE (the server is starting, draining or
restarting), with exponential backoff, by grpc's own retry policy: retrying anything else
could repeat a write or hide a real answer.

Errors surface as :class:`QianjiangError`, a ``grpc.RpcError`` with the server's status code
and message (``code()``, ``details()``) and its structured details: ``reason`` (a stable
name such as NOT_AUTHORISED, UNDER_18, UNKNOWN_SCENARIO, STREAM_LIMIT; server/errors.py lists
them), ``domain`` (``qianjiang.v1``), ``metadata`` (e.g. ``field``) and ``field_violations``.
Branch on ``reason``, never on the message. A status grpc itself made (a dropped
connection, an overloaded worker) has no details: ``reason`` is None.

The channel sends keepalive pings (every 30 s, also without calls; the server permits
them) and follows the server's connection ageing: it reconnects by itself, and a stream
that the server ends with UNAVAILABLE must be reopened.
"""

from __future__ import annotations

import functools
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from qianjiang.v1 import (
    audit_pb2, audit_pb2_grpc, eligibility_pb2, eligibility_pb2_grpc, records_pb2, records_pb2_grpc, score_pb2, score_pb2_grpc,
)

from qianjiang.v1 import rights_pb2, rights_pb2_grpc  # disputes and credit repair

Outcome = eligibility_pb2.Outcome
Record = records_pb2.Record
Why = records_pb2.WithdrawRecordRequest.Why

#: grpc service config: retry UNAVAILABLE only, up to 4 attempts, 50 ms -> 1 s backoff.
RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [
                {"service": "qianjiang.v1.ScoreService"},
                {"service": "qianjiang.v1.EligibilityService"},
                {"service": "qianjiang.v1.RecordsService"},
                {"service": "qianjiang.v1.AuditService"},
                {"service": "qianjiang.v1.RightsService"},
                {"service": "grpc.health.v1.Health"},
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

MAX_MESSAGE_BYTES = 4 * 1024 * 1024

#: The most card tokens one BatchCheck may carry (proto/qianjiang/v1/eligibility.proto).
MAX_BATCH_TOKENS = 100_000

#: Keepalive pings: a dead server or a silently dropped connection (NAT, firewall) is found
#: in at most 40 s, not after the OS's TCP timeout. The server permits pings without calls
#: down to every 20 s (ServerConfig.min_client_ping_seconds); more often, it would GOAWAY.
KEEPALIVE_SECONDS = 30
KEEPALIVE_TIMEOUT_SECONDS = 10
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle connection
]


class CertsError(ValueError):
    """A client certificate directory that cannot be used: the message names the directory
    and what is missing in it."""


def caller_identities(cert_dir: Path) -> list[str]:
    """The caller identities whose certificate and key are in ``cert_dir``."""
    return sorted(p.stem for p in Path(cert_dir).glob("*.pem")
                  if p.stem not in ("ca", "server") and p.with_suffix(".key").exists())


def check_cert_dir(cert_dir: str | Path, caller: str | None) -> None:
    """CertsError unless ``cert_dir`` holds ca.pem and, for ``caller``, its .pem and .key: a
    sentence naming what is missing where, instead of a FileNotFoundError from deep inside."""
    from server.tls import check_caller_name

    d = Path(cert_dir)
    if not d.is_dir():
        raise CertsError(f"--certs {d}: directory missing" if not d.exists() else f"--certs {d}: not a directory")
    if not (d / "ca.pem").is_file():
        raise CertsError(f"--certs {d}: ca.pem missing (the CA that signed the server's certificate)")
    if caller is None:
        return
    try:
        check_caller_name(caller)
    except ValueError as exc:
        raise CertsError(f"--caller: {exc}") from None
    if not (d / f"{caller}.pem").is_file():
        known = caller_identities(d)
        there = f"the identities there: {', '.join(known)}" if known else "no caller identities there"
        raise CertsError(f"--certs {d}: {caller}.pem missing: no certificate for caller {caller!r} in {d} ({there})")
    if not (d / f"{caller}.key").is_file():
        raise CertsError(f"--certs {d}: {caller}.key missing (the private key of {caller}.pem)")


#: What an HTTP/2 client sends first (RFC 9113 3.4); a gRPC server answers it with SETTINGS.
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def server_transport(target: str, timeout: float = 2.0) -> str | None:
    """What the server at ``target`` (host:port) speaks, found with a TLS handshake of our
    own (grpc reports a refused handshake only as UNAVAILABLE "Socket closed"):
    ``"plaintext"``; ``"tls"`` (no client certificate asked for); ``"mtls"`` (it ends a
    connection that presents no client certificate); None: unreachable, or not host:port."""
    host, _, port = target.removeprefix("dns:///").rpartition(":")
    if not host or not port.isdigit():
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # only what it speaks, not whom we trust
    ctx.set_alpn_protocols(["h2"])
    try:
        raw = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError:
        return None
    with raw:
        try:
            conn = ctx.wrap_socket(raw, server_hostname=host.strip("[]"))
        except ssl.SSLError as exc:  # TLS 1.2 refuses in the handshake; plain HTTP/2 is no TLS record
            return "mtls" if "CERTIFICATE" in str(exc.reason) else "plaintext"
        except OSError:
            return "plaintext"
        with conn:
            try:
                # TLS 1.3 checks the client's certificate after our side of the handshake: the
                # server answers the HTTP/2 preface with its SETTINGS, or closes the connection
                conn.sendall(HTTP2_PREFACE)
                return "tls" if conn.recv(9) else "mtls"
            except ssl.SSLError:
                return "mtls"
            except OSError:
                return None


class QianjiangError(grpc.RpcError, grpc.Call):
    """A failed call: the grpc error (``code()``, ``details()``, metadata) plus the server's
    google.rpc details, parsed with ``grpc_status.rpc_status.from_call``.

    ``reason``/``domain``: the ErrorInfo's (None when the status has none); ``metadata``:
    its metadata (a dict, empty when absent); ``field_violations``: the BadRequest's
    ``(field, description)`` pairs (empty when absent)."""

    def __init__(self, error: grpc.RpcError):
        super().__init__(str(error))
        self.error = error
        self.reason: str | None = None
        self.domain: str | None = None
        self.metadata: dict[str, str] = {}
        self.field_violations: list[tuple[str, str]] = []
        try:
            status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
        except ValueError:  # details that contradict the status: not the server's
            status = None
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason, self.domain, self.metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.field_violations = [(v.field, v.description) for v in bad.field_violations]

    @classmethod
    def of(cls, error: grpc.RpcError) -> "QianjiangError":
        """``error`` typed (for errors from the raw stubs, e.g. ``client.eligibility``)."""
        return error if isinstance(error, cls) else cls(error)

    def code(self) -> grpc.StatusCode:
        return self.error.code()

    def details(self) -> str:
        return self.error.details()

    def initial_metadata(self):
        return self.error.initial_metadata()

    def trailing_metadata(self):
        return self.error.trailing_metadata()

    def is_active(self) -> bool:
        return False

    def time_remaining(self):
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback) -> bool:
        return False

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code().name}{reason}: {self.details()}"

    def __repr__(self) -> str:
        return f"QianjiangError({self.code().name}, reason={self.reason!r}, details={self.details()!r})"


def _typed(method):
    """Raise the call's grpc.RpcError as a QianjiangError."""

    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise QianjiangError.of(exc) from exc

    return call


class _TypedStream:
    """A response stream whose error is a QianjiangError; otherwise the grpc call itself
    (``cancel()``, ``code()``, ...)."""

    def __init__(self, call):
        self._call = call

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise QianjiangError.of(exc) from exc

    def __getattr__(self, name):
        return getattr(self._call, name)


@dataclass(frozen=True)
class BatchResult:
    """Outcomes of a BatchCheck, in request order."""

    outcomes: bytes  # one qianjiang.v1.Outcome value per token
    batch_id: str
    model_version: str
    allowed: int
    response: eligibility_pb2.BatchCheckResponse  # the whole answer (versions, records position, ...)

    def decision_id(self, i: int) -> str:
        return f"{self.batch_id}-{i}"

    def outcome(self, i: int) -> int:
        return self.outcomes[i]


class QianjiangClient:
    """One channel to the service, with stubs for its services and health.

    Credentials: ``cert_dir`` + ``caller`` present that caller's client certificate (mutual
    TLS, production); ``token`` sends a development bearer token; neither: plain text to a
    server in its insecure loopback mode. A ``cert_dir`` without what it needs is a CertsError.
    """

    def __init__(self, target: str, timeout: float = 2.0, channel: grpc.Channel | None = None,
                 token: str | None = None, cert_dir: str | None = None, caller: str | None = None,
                 end_user_key=None, end_user_issuer: str | None = None):
        """``end_user_key``: a citizen app's Ed25519 signing key (or its PEM file): every
        call about a citizen then carries that citizen as the end user, signed for
        ``end_user_issuer`` (default: ``caller``), as the server requires of a citizen app in
        token and mTLS modes (server/end_user.py)."""
        self.timeout = timeout
        self._end_user = None
        if end_user_key is not None:
            from server.end_user import load_private_key

            issuer = end_user_issuer or caller
            if not issuer:
                raise CertsError("an end-user key signs for a citizen app: give its caller identity too")
            if isinstance(end_user_key, (str, Path)):
                try:
                    end_user_key = load_private_key(end_user_key)
                except (OSError, ValueError) as exc:
                    raise CertsError(f"end-user key {end_user_key}: {getattr(exc, 'strerror', None) or exc}") from None
            self._end_user = (issuer, end_user_key)
        options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(RETRY_POLICY)),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *KEEPALIVE_OPTIONS,
        ]
        if channel is None:
            if cert_dir:
                from server.tls import channel_credentials

                check_cert_dir(cert_dir, caller)
                try:
                    creds = channel_credentials(Path(cert_dir), caller)
                except OSError as exc:
                    raise CertsError(f"--certs {cert_dir}: {Path(exc.filename or '').name} unreadable: {exc.strerror}") from None
                if token:
                    creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
                channel = grpc.secure_channel(target, creds, options=options)
            else:
                channel = grpc.insecure_channel(target, options=options)
                if token:
                    channel = grpc.intercept_channel(channel, _BearerToken(token))
        self.channel = channel
        self.scores = score_pb2_grpc.ScoreServiceStub(self.channel)
        self.eligibility = eligibility_pb2_grpc.EligibilityServiceStub(self.channel)
        self.records = records_pb2_grpc.RecordsServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.rights = rights_pb2_grpc.RightsServiceStub(self.channel)

    def __enter__(self) -> "QianjiangClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _for(self, citizen_id: str):
        """The call's metadata binding it to ``citizen_id`` (None without an end-user key)."""
        if self._end_user is None or not citizen_id:
            return None
        from server.end_user import METADATA_KEY, sign_assertion

        issuer, key = self._end_user
        return ((METADATA_KEY, sign_assertion(key, issuer, citizen_id)),)

    # --- scores -------------------------------------------------------------------------

    @_typed
    def get_score(self, citizen_id: str, purpose: str = "", timeout: float | None = None) -> score_pb2.Score:
        return self.scores.GetScore(score_pb2.GetScoreRequest(citizen_id=citizen_id, purpose=purpose), timeout=self._t(timeout),
                                    metadata=self._for(citizen_id))

    @_typed
    def explain(self, citizen_id: str, purpose: str = "", timeout: float | None = None) -> score_pb2.Explanation:
        return self.scores.ExplainScore(score_pb2.GetScoreRequest(citizen_id=citizen_id, purpose=purpose), timeout=self._t(timeout),
                                        metadata=self._for(citizen_id))

    @_typed
    def simulate(self, citizen_id: str, changes: Iterable[score_pb2.SimulatedChange] = (), next_level: bool = False,
                 purpose: str = "", timeout: float | None = None) -> score_pb2.Simulation:
        """What if: the score after hypothetical ``changes`` (:func:`repaired`,
        :func:`added`, :func:`variable_repaired`), and with ``next_level`` the smallest set of
        actionable changes to the next level. Nothing is stored."""
        req = score_pb2.SimulateScoreRequest(citizen_id=citizen_id, purpose=purpose, changes=list(changes),
                                             next_level=next_level)
        return self.scores.SimulateScore(req, timeout=self._t(timeout), metadata=self._for(citizen_id))

    @_typed
    def batch_scores(self, citizen_ids: Iterable[str], purpose: str = "", timeout: float | None = None) -> list[score_pb2.ScoreResult]:
        req = score_pb2.BatchGetScoresRequest(citizen_ids=list(citizen_ids), purpose=purpose)
        return list(self.scores.BatchGetScores(req, timeout=self._t(timeout)).results)

    # --- eligibility --------------------------------------------------------------------

    @_typed
    def check(self, scenario: str, card_token: bytes, timeout: float | None = None) -> eligibility_pb2.Decision:
        return self.eligibility.Check(eligibility_pb2.CheckRequest(scenario=scenario, card_token=card_token), timeout=self._t(timeout))

    @_typed
    def check_batch(self, scenario: str, card_tokens: bytes | Iterable[bytes], timeout: float | None = None) -> BatchResult:
        """``card_tokens``: packed 16-byte tokens, or an iterable of tokens to pack."""
        packed = card_tokens if isinstance(card_tokens, (bytes, bytearray)) else b"".join(card_tokens)
        resp = self.eligibility.BatchCheck(eligibility_pb2.BatchCheckRequest(scenario=scenario, card_tokens=bytes(packed)), timeout=self._t(timeout))
        return BatchResult(resp.outcomes, resp.batch_id, resp.model_version, resp.allowed, resp)

    def check_stream(self, requests: Iterable[tuple[str, bytes]], timeout: float | None = None) -> Iterator[eligibility_pb2.Decision]:
        """A gateway's long-lived stream: (scenario, token) in, one Decision each out, in order.
        ``timeout`` bounds the whole stream (None: the client's default times 100)."""
        msgs = (eligibility_pb2.CheckRequest(scenario=s, card_token=t, request_id=i) for i, (s, t) in enumerate(requests, 1))
        return _TypedStream(self.eligibility.StreamCheck(msgs, timeout=self.timeout * 100 if timeout is None else timeout))

    @_typed
    def scenarios(self, timeout: float | None = None) -> list[eligibility_pb2.Scenario]:
        return list(self.eligibility.ListScenarios(eligibility_pb2.ListScenariosRequest(), timeout=self._t(timeout)).scenarios)

    # --- records and consent --------------------------------------------------------------

    @_typed
    def ingest(self, records: Iterable[records_pb2.Record], timeout: float | None = None) -> list[records_pb2.RecordAck]:
        """Stream records; returns the acknowledgements (each one durable on the server)."""
        return list(self.records.IngestRecords(iter(records), timeout=self.timeout * 100 if timeout is None else timeout))

    def ingest_stream(self, records: Iterable[records_pb2.Record], timeout: float | None = None) -> Iterator[records_pb2.RecordAck]:
        """Stream records; the acknowledgements as they come, in order. A refused record ends
        the stream with its error (a QianjiangError) after the acknowledgements of the
        records before it: the i-th record sent failed when i acknowledgements came."""
        return _TypedStream(self.records.IngestRecords(iter(records), timeout=self.timeout * 100 if timeout is None else timeout))

    @_typed
    def correct_record(self, record_id: str, date: str, value: float, source: str = "",
                       timeout: float | None = None) -> records_pb2.RecordAck:
        """A new version of one of the caller's records (``source``: empty is the caller's own)."""
        req = records_pb2.CorrectRecordRequest(record_id=record_id, date=date, value=value, source=source)
        return self.records.CorrectRecord(req, timeout=self._t(timeout))

    @_typed
    def withdraw_record(self, record_id: str, repaired: bool = False, source: str = "",
                        timeout: float | None = None) -> records_pb2.RecordAck:
        why = Why.REPAIRED if repaired else Why.WITHDRAWN
        req = records_pb2.WithdrawRecordRequest(record_id=record_id, why=why, source=source)
        return self.records.WithdrawRecord(req, timeout=self._t(timeout))

    @_typed
    def record_history(self, record_id: str, source: str = "", timeout: float | None = None) -> records_pb2.RecordHistory:
        """Every version of one of the caller's records, oldest first."""
        req = records_pb2.RecordHistoryRequest(record_id=record_id, source=source)
        return self.records.GetRecordHistory(req, timeout=self._t(timeout))

    @_typed
    def grant_consent(self, citizen_id: str, purposes: Iterable[str] = (), expires: str = "",
                      timeout: float | None = None) -> records_pb2.ConsentState:
        """Every purpose (none named), or each of ``purposes`` alone, until ``expires``
        (YYYY-MM-DD, a grant of purposes only) or revocation."""
        req = records_pb2.ConsentRequest(citizen_id=citizen_id, purposes=list(purposes), expires=expires)
        return self.records.GrantConsent(req, timeout=self._t(timeout), metadata=self._for(citizen_id))

    @_typed
    def revoke_consent(self, citizen_id: str, purposes: Iterable[str] = (), timeout: float | None = None) -> records_pb2.ConsentState:
        """Everything (none named), or each of ``purposes`` alone."""
        req = records_pb2.ConsentRequest(citizen_id=citizen_id, purposes=list(purposes))
        return self.records.RevokeConsent(req, timeout=self._t(timeout), metadata=self._for(citizen_id))

    @_typed
    def get_consent(self, citizen_id: str, timeout: float | None = None) -> records_pb2.ConsentState:
        """The citizen's consent as it stands, purpose by purpose."""
        return self.records.GetConsent(records_pb2.ConsentRequest(citizen_id=citizen_id), timeout=self._t(timeout),
                                       metadata=self._for(citizen_id))

    @_typed
    def upsert_citizen(self, citizen_id: str, birth_date: str, timeout: float | None = None) -> records_pb2.CitizenAck:
        return self.records.UpsertCitizen(records_pb2.Citizen(citizen_id=citizen_id, birth_date=birth_date), timeout=self._t(timeout))

    @_typed
    def register_card(self, citizen_id: str, card_token: bytes, timeout: float | None = None) -> records_pb2.RegisterCardResponse:
        req = records_pb2.RegisterCardRequest(citizen_id=citizen_id, card_token=card_token)
        return self.records.RegisterCard(req, timeout=self._t(timeout))

    # --- audit --------------------------------------------------------------------------------

    @_typed
    def list_checks(self, citizen_id: str, limit: int = 100, timeout: float | None = None) -> list[audit_pb2.CheckEntry]:
        """Who checked this citizen, newest first."""
        req = audit_pb2.ListChecksRequest(citizen_id=citizen_id, limit=limit)
        return list(self.audit.ListChecks(req, timeout=self._t(timeout), metadata=self._for(citizen_id)).entries)

    @_typed
    def replay_decision(self, decision_id: str, citizen_id: str = "", timeout: float | None = None) -> audit_pb2.Replay:
        """An appeal: the decision (or score disclosure) recomputed from the record history.
        ``citizen_id``: the citizen a citizen app asks for (the decision must be about them)."""
        req = audit_pb2.ReplayDecisionRequest(decision_id=decision_id)
        return self.audit.ReplayDecision(req, timeout=self._t(timeout), metadata=self._for(citizen_id))

    # --- the citizens' rights: disputes and credit repair (proto/qianjiang/v1/rights.proto) ------
    #
    # A step that failed UNAVAILABLE is retried like any call; if it had committed before the
    # failure, its retry answers DISPUTE_OPEN, REPAIR_PENDING or ALREADY_ANSWERED: list to see it.

    @_typed
    def citizen_records(self, citizen_id: str, timeout: float | None = None) -> rights_pb2.ListCitizenRecordsResponse:
        """A citizen's records (every status), with their open dispute or repair application."""
        req = rights_pb2.ListCitizenRecordsRequest(citizen_id=citizen_id)
        return self.rights.ListCitizenRecords(req, timeout=self._t(timeout), metadata=self._for(citizen_id))

    @_typed
    def file_dispute(self, citizen_id: str, source: str, record_id: str, reason: str,
                     timeout: float | None = None) -> rights_pb2.Dispute:
        """The citizen disputes one of their records (a citizen app)."""
        req = rights_pb2.FileDisputeRequest(citizen_id=citizen_id, source=source, record_id=record_id, reason=reason)
        return self.rights.FileDispute(req, timeout=self._t(timeout), metadata=self._for(citizen_id))

    @_typed
    def list_disputes(self, citizen_id: str = "", source: str = "", open_only: bool = False, limit: int = 0,
                      timeout: float | None = None) -> list[rights_pb2.Dispute]:
        """A citizen's disputes (a citizen app), or those of the caller's records (a source)."""
        req = rights_pb2.ListDisputesRequest(citizen_id=citizen_id, source=source, open_only=open_only, limit=limit)
        return list(self.rights.ListDisputes(req, timeout=self._t(timeout), metadata=self._for(citizen_id)).disputes)

    @_typed
    def answer_dispute(self, dispute_id: str, answer: str | int, note: str, date: str = "", value: float = 0.0,
                       source: str = "", timeout: float | None = None) -> rights_pb2.Dispute:
        """The record's source answers: ``answer`` "confirm", "correct" (with ``date`` and
        ``value``) or "withdraw" (or the AnswerDisputeRequest.Answer value)."""
        if isinstance(answer, str):
            answer = rights_pb2.AnswerDisputeRequest.Answer.Value(answer.upper())
        req = rights_pb2.AnswerDisputeRequest(dispute_id=dispute_id, answer=answer, note=note, date=date, value=value,
                                              source=source)
        return self.rights.AnswerDispute(req, timeout=self._t(timeout))

    @_typed
    def apply_repair(self, citizen_id: str, source: str, record_id: str, statement: str,
                     timeout: float | None = None) -> rights_pb2.RepairApplication:
        """The citizen applies to repair one of their negative records (a citizen app)."""
        req = rights_pb2.ApplyRepairRequest(citizen_id=citizen_id, source=source, record_id=record_id,
                                            statement=statement)
        return self.rights.ApplyRepair(req, timeout=self._t(timeout), metadata=self._for(citizen_id))

    @_typed
    def list_repairs(self, citizen_id: str = "", source: str = "", pending_only: bool = False, limit: int = 0,
                     timeout: float | None = None) -> list[rights_pb2.RepairApplication]:
        """A citizen's repair applications (a citizen app), or those for the caller's records (a source)."""
        req = rights_pb2.ListRepairsRequest(citizen_id=citizen_id, source=source, pending_only=pending_only, limit=limit)
        return list(self.rights.ListRepairs(req, timeout=self._t(timeout), metadata=self._for(citizen_id)).applications)

    @_typed
    def decide_repair(self, repair_id: str, approve: bool, reason: str = "", source: str = "",
                      timeout: float | None = None) -> rights_pb2.RepairApplication:
        """The record's source decides: approve (the record is repaired) or reject (with a reason)."""
        decision = rights_pb2.DecideRepairRequest.APPROVE if approve else rights_pb2.DecideRepairRequest.REJECT
        req = rights_pb2.DecideRepairRequest(repair_id=repair_id, decision=decision, reason=reason, source=source)
        return self.rights.DecideRepair(req, timeout=self._t(timeout))

    @_typed
    def advance_test_clock(self, seconds: int, timeout: float | None = None) -> rights_pb2.TestClock:
        """Development and tests: move a --test-clock server's rights clock forward."""
        return self.rights.AdvanceTestClock(rights_pb2.AdvanceTestClockRequest(seconds=seconds), timeout=self._t(timeout))

    # --- health -------------------------------------------------------------------------------

    @_typed
    def health(self, service: str = "", timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... for the whole server ("") or one service."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._t(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on a plain-text channel (grpc's
    own call credentials need TLS; development tokens on loopback do not)."""

    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def _details(self, details):
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


# --- what-if changes (QianjiangClient.simulate) --------------------------------------------

def repaired(record_id: str, source: str = "") -> score_pb2.SimulatedChange:
    """As if this record of the citizen's were repaired."""
    return score_pb2.SimulatedChange(remove_record=score_pb2.RecordRef(record_id=record_id, source=source))


def variable_repaired(variable: str) -> score_pb2.SimulatedChange:
    """As if every active record of ``variable`` were repaired (e.g. "tax_arrears")."""
    return score_pb2.SimulatedChange(remove_variable=variable)


def added(variable: str, value: float = 1.0, date: str = "", count: int = 1) -> score_pb2.SimulatedChange:
    """As if ``count`` records of ``variable`` with ``value`` had arrived on ``date`` (today)."""
    return score_pb2.SimulatedChange(add_record=score_pb2.HypotheticalRecord(variable=variable, value=value, date=date,
                                                                             count=count))
