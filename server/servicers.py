"""gRPC servicers: thin. Each method converts the request (server/convert.py), calls the
domain (server/service.py), and converts the result. Errors are raised, never set here:
server/interceptors.py maps them to status codes through server/errors.py's table.

The server is grpc.aio: every call runs on the worker's one event loop. What only reads the
shared state (eligibility checks, the hot path) runs inline, in microseconds; whatever may
touch the store or the disk (score reads may look a citizen id up, writes, the audit log's
files) runs on the node's small thread pool through :meth:`Offload.run`, so a slow database
never stalls the checks.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from concurrent.futures import Executor

from qianjiang.v1 import (
    audit_pb2, audit_pb2_grpc, eligibility_pb2, eligibility_pb2_grpc, records_pb2, records_pb2_grpc, score_pb2, score_pb2_grpc,
)
from server import convert
from server.auth import current_caller
from server.errors import NotReady
from server.service import CreditService, StaleGeneration

ScoreStatus = score_pb2.ScoreResult.Status


class Offload:
    """Runs blocking domain calls on the node's thread pool, in the calling task's context
    (the authenticated caller travels with it). ``refresh()`` brings ``service`` up to the
    active model generation: a write that raced a rollout's switch wrote nothing and is
    retried on the new service (server/rollout.py)."""

    service: CreditService | None = None

    def __init__(self, pool: Executor | None, refresh=lambda: True):
        self.pool = pool
        self.refresh = refresh

    async def run(self, method: str, *args):
        loop = asyncio.get_running_loop()
        for _ in range(3):
            ctx = contextvars.copy_context()
            fn = getattr(self.service, method)
            try:
                return await loop.run_in_executor(self.pool, functools.partial(ctx.run, fn, *args))
            except StaleGeneration:
                self.refresh()
        raise NotReady()


class ScoreServicer(Offload, score_pb2_grpc.ScoreServiceServicer):
    async def GetScore(self, request, context):
        view = await self.run("get_score", request.citizen_id, current_caller(), request.purpose)
        return convert.score_message(view, self.service.spec)

    async def ExplainScore(self, request, context):
        view, contributions = await self.run("explain", request.citizen_id, current_caller(), request.purpose)
        return convert.explanation_message(view, contributions, self.service.spec)

    async def BatchGetScores(self, request, context):
        ids = list(request.citizen_ids)
        results = []
        for cid, (status, view) in zip(ids, await self.run("batch_scores", ids, current_caller(), request.purpose)):
            result = score_pb2.ScoreResult(citizen_id=cid, status=ScoreStatus.Value(status))
            if view is not None:
                result.score.CopyFrom(convert.score_message(view, self.service.spec))
            results.append(result)
        return score_pb2.BatchGetScoresResponse(results=results)


class EligibilityServicer(Offload, eligibility_pb2_grpc.EligibilityServiceServicer):
    """In memory only: inline on the event loop."""

    async def Check(self, request, context):
        decision = self.service.check(request.scenario, request.card_token, current_caller())
        return convert.decision_message(decision, request.request_id)

    async def BatchCheck(self, request, context):
        return convert.batch_message(self.service.check_batch(request.scenario, request.card_tokens, current_caller()))

    async def StreamCheck(self, request_iterator, context):
        caller = current_caller()
        async for request in request_iterator:
            # a bad message is answered for itself; the stream goes on (check_in_stream)
            decision = self.service.check_in_stream(request.scenario, request.card_token, caller)
            yield convert.decision_message(decision, request.request_id)

    async def ListScenarios(self, request, context):
        return eligibility_pb2.ListScenariosResponse(
            scenarios=[convert.scenario_message(s) for s in self.service.scenarios.values()]
        )


class RecordsServicer(Offload, records_pb2_grpc.RecordsServiceServicer):
    """Writes: store first, then the shared state, on the thread pool."""

    async def IngestRecords(self, request_iterator, context):
        caller = current_caller()
        i = 0
        async for msg in request_iterator:
            ack = await self.run("ingest", convert.record_in(msg, i), caller)
            i += 1
            yield convert.record_ack(msg.record_id, ack)

    async def CorrectRecord(self, request, context):
        day = convert.parse_date(request.date, "date")
        row = await self.run("correct_record", request.record_id, day, request.value, current_caller(), request.source)
        return convert.updated_ack(row)

    async def WithdrawRecord(self, request, context):
        why = convert.withdraw_status(request.why)
        row = await self.run("withdraw_record", request.record_id, why, current_caller(), request.source)
        return convert.updated_ack(row)

    async def GetRecordHistory(self, request, context):
        record, versions = await self.run("record_history", request.record_id, current_caller(), request.source)
        return convert.record_history(record, versions)

    async def GrantConsent(self, request, context):
        await self.run("set_consent", request.citizen_id, True)
        return records_pb2.ConsentState(citizen_id=request.citizen_id, granted=True)

    async def RevokeConsent(self, request, context):
        await self.run("set_consent", request.citizen_id, False)
        return records_pb2.ConsentState(citizen_id=request.citizen_id, granted=False)

    async def UpsertCitizen(self, request, context):
        birth_day = convert.parse_date(request.birth_date, "birth_date")
        created = await self.run("upsert_citizen", request.citizen_id, birth_day)
        return records_pb2.CitizenAck(citizen_id=request.citizen_id, created=created)

    async def RegisterCard(self, request, context):
        created = await self.run("register_card", request.citizen_id, request.card_token)
        return records_pb2.RegisterCardResponse(citizen_id=request.citizen_id, created=created)


class AuditServicer(Offload, audit_pb2_grpc.AuditServiceServicer):
    async def ListChecks(self, request, context):
        entries = await self.run("checks_of", request.citizen_id, request.limit)
        return audit_pb2.ListChecksResponse(entries=[convert.check_entry(e) for e in entries])

    async def ReplayDecision(self, request, context):
        entry, replayed, spec = await self.run("replay", request.decision_id, current_caller())
        return convert.replay_message(entry, replayed, spec)
