"""gRPC servicers: thin. Each method converts the request (server/convert.py), calls the
domain (server/service.py), and converts the result. Errors are raised, never set here:
server/interceptors.py maps them to status codes through server/errors.py's table."""

from __future__ import annotations

from qianjiang.v1 import (
    audit_pb2, audit_pb2_grpc, eligibility_pb2, eligibility_pb2_grpc, records_pb2, records_pb2_grpc, score_pb2, score_pb2_grpc,
)
from server import convert
from server.auth import current_caller
from server.service import CreditService

ScoreStatus = score_pb2.ScoreResult.Status
AckStatus = records_pb2.RecordAck.Status


class ScoreServicer(score_pb2_grpc.ScoreServiceServicer):
    def __init__(self, service: CreditService):
        self.service = service

    def GetScore(self, request, context):
        view = self.service.get_score(request.citizen_id, current_caller(), request.purpose)
        return convert.score_message(view, self.service.spec)

    def ExplainScore(self, request, context):
        view, contributions = self.service.explain(request.citizen_id, current_caller(), request.purpose)
        return convert.explanation_message(view, contributions, self.service.spec)

    def BatchGetScores(self, request, context):
        results = []
        for cid, (status, view) in zip(request.citizen_ids, self.service.batch_scores(list(request.citizen_ids), current_caller(), request.purpose)):
            result = score_pb2.ScoreResult(citizen_id=cid, status=ScoreStatus.Value(status))
            if view is not None:
                result.score.CopyFrom(convert.score_message(view, self.service.spec))
            results.append(result)
        return score_pb2.BatchGetScoresResponse(results=results)


class EligibilityServicer(eligibility_pb2_grpc.EligibilityServiceServicer):
    def __init__(self, service: CreditService):
        self.service = service

    def Check(self, request, context):
        decision = self.service.check(request.scenario, request.card_token, current_caller())
        return convert.decision_message(decision, request.request_id)

    def BatchCheck(self, request, context):
        return convert.batch_message(self.service.check_batch(request.scenario, request.card_tokens, current_caller()))

    def StreamCheck(self, request_iterator, context):
        caller = current_caller()
        for request in request_iterator:
            decision = self.service.check(request.scenario, request.card_token, caller, "EligibilityService/StreamCheck")
            yield convert.decision_message(decision, request.request_id)

    def ListScenarios(self, request, context):
        return eligibility_pb2.ListScenariosResponse(
            scenarios=[convert.scenario_message(s) for s in self.service.scenarios.values()]
        )


class RecordsServicer(records_pb2_grpc.RecordsServiceServicer):
    def __init__(self, service: CreditService):
        self.service = service

    def IngestRecords(self, request_iterator, context):
        caller = current_caller()
        for i, msg in enumerate(request_iterator):
            inserted = self.service.ingest(convert.record_in(msg, i), caller)
            yield records_pb2.RecordAck(record_id=msg.record_id, status=AckStatus.ACCEPTED if inserted else AckStatus.DUPLICATE)

    def CorrectRecord(self, request, context):
        day = convert.parse_date(request.date, "date")
        self.service.correct_record(request.record_id, day, request.value, current_caller())
        return records_pb2.RecordAck(record_id=request.record_id, status=AckStatus.UPDATED)

    def WithdrawRecord(self, request, context):
        self.service.withdraw_record(request.record_id, convert.withdraw_status(request.why), current_caller())
        return records_pb2.RecordAck(record_id=request.record_id, status=AckStatus.UPDATED)

    def GrantConsent(self, request, context):
        self.service.set_consent(request.citizen_id, True)
        return records_pb2.ConsentState(citizen_id=request.citizen_id, granted=True)

    def RevokeConsent(self, request, context):
        self.service.set_consent(request.citizen_id, False)
        return records_pb2.ConsentState(citizen_id=request.citizen_id, granted=False)

    def UpsertCitizen(self, request, context):
        created = self.service.upsert_citizen(request.citizen_id, convert.parse_date(request.birth_date, "birth_date"))
        return records_pb2.CitizenAck(citizen_id=request.citizen_id, created=created)

    def RegisterCard(self, request, context):
        created = self.service.register_card(request.citizen_id, request.card_token)
        return records_pb2.RegisterCardResponse(citizen_id=request.citizen_id, created=created)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, service: CreditService):
        self.service = service

    def ListChecks(self, request, context):
        entries = self.service.checks_of(request.citizen_id, request.limit)
        return audit_pb2.ListChecksResponse(entries=[convert.check_entry(e) for e in entries])
