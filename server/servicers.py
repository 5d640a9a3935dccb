"""gRPC servicers: thin. Each method converts the request (server/convert.py), calls the
domain (server/service.py), and converts the result. Errors are raised, never set here:
server/interceptors.py maps them to status codes through server/errors.py's table.

The server is grpc.aio: every call runs on the worker's one event loop. What only reads the
shared state (eligibility checks, the hot path) runs inline, in microseconds; whatever may
touch the store or the disk runs on a thread pool through :meth:`Offload.run`, so a slow
database never stalls the checks. Writes use the node's pool; reads (scores, explanations,
the audit log's files, replays) use a pool of their own (:func:`read_pool`), so they are
answered while every write thread waits on a store that does not answer.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from concurrent.futures import Executor, ThreadPoolExecutor

from qianjiang.v1 import (
    audit_pb2, audit_pb2_grpc, eligibility_pb2, eligibility_pb2_grpc, records_pb2, records_pb2_grpc, score_pb2, score_pb2_grpc,
)
from qianjiang.v1 import rights_pb2, rights_pb2_grpc
from qianjiang.v1 import gate_pb2, gate_pb2_grpc
from server import convert
from server.auth import current_caller
from server.errors import NotReady
from server.service import CreditService, StaleGeneration

ScoreStatus = score_pb2.ScoreResult.Status

#: Threads of the reads' pool (per process): reads are microseconds in memory, or a disk or
#: a bounded store read (ListChecks, ReplayDecision).
READ_THREADS = 8

_reads: tuple[int, ThreadPoolExecutor] | None = None
_reads_lock = threading.Lock()


def read_pool() -> ThreadPoolExecutor:
    """The process's pool for reads, shared by every node of the process and made on first
    use (a worker makes its own after fork): never the pool writes wait in."""
    global _reads
    with _reads_lock:
        if _reads is None or _reads[0] != os.getpid():
            _reads = (os.getpid(), ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="qj-read"))
        return _reads[1]


class Offload:
    """Runs blocking domain calls on a thread pool, in the calling task's context (the
    authenticated caller travels with it). ``refresh()`` brings ``service`` up to the active
    model generation: a write that raced a rollout's switch is retried on the new service,
    or, if its store write had already committed, applied to the new service's state
    (server/rollout.py, ``StaleGeneration``). ``pool`` runs writes; ``reads`` runs the
    methods a servicer lists in ``READS`` (default: :func:`read_pool`)."""

    service: CreditService | None = None

    #: Methods that only read (memory, the audit files, bounded store reads).
    READS: frozenset[str] = frozenset()

    def __init__(self, pool: Executor | None, refresh=lambda: True, reads: Executor | None = None):
        self.pool = pool
        self.refresh = refresh
        self.reads = reads

    async def run(self, method: str, *args):
        loop = asyncio.get_running_loop()
        pool = (self.reads or read_pool()) if method in self.READS else self.pool
        for _ in range(3):
            ctx = contextvars.copy_context()
            fn = getattr(self.service, method)
            try:
                return await loop.run_in_executor(pool, functools.partial(ctx.run, fn, *args))
            except StaleGeneration as stale:
                self.refresh()
                if stale.update is not None:  # committed already: apply it on the new service
                    method, args = "reapply", (stale.update,)
        raise NotReady()


class ScoreServicer(Offload, score_pb2_grpc.ScoreServiceServicer):
    READS = frozenset({"get_score", "explain", "batch_scores", "simulate"})

    async def GetScore(self, request, context):
        view = await self.run("get_score", request.citizen_id, current_caller(), request.purpose)
        return convert.score_message(view, self.service.spec)

    #: The citizens' dispute marks (server/rights.py RightsShared), shown in explanations.
    rights_marks = None

    async def ExplainScore(self, request, context):
        view, contributions = await self.run("explain", request.citizen_id, current_caller(), request.purpose)
        # from memory: the variables of the citizen's disputed and suspended records
        marks = None if self.rights_marks is None else self.rights_marks.marked(self.service.row_of(request.citizen_id))
        return convert.explanation_message(view, contributions, self.service.spec, marks)

    async def SimulateScore(self, request, context):
        changes = convert.changes_in(request.changes)
        sim = await self.run("simulate", request.citizen_id, changes, current_caller(), request.purpose, request.next_level)
        return convert.simulation_message(sim, self.service.spec)

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

    READS = frozenset({"get_consent"})

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
        return await self._consent(request, True)

    async def RevokeConsent(self, request, context):
        return await self._consent(request, False)

    async def _consent(self, request, granted: bool):
        expires = convert.parse_date(request.expires, "expires") if request.expires else None
        view = await self.run("set_consent", request.citizen_id, granted, current_caller(), list(request.purposes), expires)
        return convert.consent_state(request.citizen_id, view)

    async def GetConsent(self, request, context):
        view = await self.run("get_consent", request.citizen_id, current_caller())
        return convert.consent_state(request.citizen_id, view)

    async def UpsertCitizen(self, request, context):
        birth_day = convert.parse_date(request.birth_date, "birth_date")
        created = await self.run("upsert_citizen", request.citizen_id, birth_day)
        return records_pb2.CitizenAck(citizen_id=request.citizen_id, created=created)

    async def RegisterCard(self, request, context):
        created = await self.run("register_card", request.citizen_id, request.card_token)
        return records_pb2.RegisterCardResponse(citizen_id=request.citizen_id, created=created)


class AuditServicer(Offload, audit_pb2_grpc.AuditServiceServicer):
    READS = frozenset({"checks_of", "replay"})

    async def ListChecks(self, request, context):
        entries = await self.run("checks_of", request.citizen_id, request.limit, current_caller())
        return audit_pb2.ListChecksResponse(entries=[convert.check_entry(e) for e in entries])

    async def ReplayDecision(self, request, context):
        entry, replayed, spec = await self.run("replay", request.decision_id, current_caller())
        return convert.replay_message(entry, replayed, spec)


class RightsServicer(Offload, rights_pb2_grpc.RightsServiceServicer):
    """Disputes and credit repair (server/rights.py): ``service`` is the generation's Rights.
    Listings read the store (bounded) on the reads' pool; every step writes, then re-scores."""

    READS = frozenset({"citizen_records", "list_disputes", "list_repairs"})

    async def ListCitizenRecords(self, request, context):
        items, disclosure_id = await self.run("citizen_records", request.citizen_id, current_caller())
        return convert.records_message(items, disclosure_id)

    async def FileDispute(self, request, context):
        view = await self.run("file_dispute", request.citizen_id, request.source, request.record_id, request.reason,
                              current_caller())
        return convert.dispute_message(view)

    async def ListDisputes(self, request, context):
        views = await self.run("list_disputes", request.citizen_id, request.source, request.open_only, request.limit,
                               current_caller())
        return rights_pb2.ListDisputesResponse(disputes=[convert.dispute_message(v) for v in views])

    async def AnswerDispute(self, request, context):
        answer = convert.answer_in(request.answer)
        day = convert.parse_date(request.date, "date") if request.date else None
        view = await self.run("answer_dispute", request.dispute_id, answer, day, request.value, request.note,
                              current_caller(), request.source)
        return convert.dispute_message(view)

    async def ApplyRepair(self, request, context):
        view = await self.run("apply_repair", request.citizen_id, request.source, request.record_id, request.statement,
                              current_caller())
        return convert.repair_message(view)

    async def ListRepairs(self, request, context):
        views = await self.run("list_repairs", request.citizen_id, request.source, request.pending_only, request.limit,
                               current_caller())
        return rights_pb2.ListRepairsResponse(applications=[convert.repair_message(v) for v in views])

    async def DecideRepair(self, request, context):
        approve = convert.decision_in(request.decision)
        view = await self.run("decide_repair", request.repair_id, approve, request.reason, current_caller(),
                              request.source)
        return convert.repair_message(view)

    async def AdvanceTestClock(self, request, context):
        return convert.clock_message(self.service.advance_test_clock(request.seconds))


class GateServicer(Offload, gate_pb2_grpc.GateServiceServicer):
    """Offline gates' lists (server/gate_snapshot.py): ``service`` is the generation's
    GateLists. The publisher's files are read on the reads' pool; an upload writes the audit."""

    READS = frozenset({"manifest", "snapshot", "deltas"})

    async def GetManifest(self, request, context):
        body, signature, key_id, latest = await self.run("manifest", request.scenario, current_caller())
        return gate_pb2.GateManifest(body=body, signature=signature, key_id=key_id, latest_sequence=latest)

    async def GetSnapshot(self, request, context):
        (body, signature, key_id, latest), chunks = await self.run("snapshot", request.scenario, current_caller())
        yield gate_pb2.SnapshotChunk(manifest=gate_pb2.GateManifest(body=body, signature=signature, key_id=key_id,
                                                                    latest_sequence=latest))
        for part, offset, data in chunks:
            yield gate_pb2.SnapshotChunk(part=part, offset=offset, data=data)

    async def GetDeltas(self, request, context):
        for body, signature, key_id in await self.run("deltas", request.scenario, request.since_sequence, current_caller()):
            yield gate_pb2.SignedDelta(body=body, signature=signature, key_id=key_id)

    async def UploadOfflineDecisions(self, request, context):
        r = await self.run("upload", request.gate_id, list(request.decisions), current_caller())
        return gate_pb2.UploadOfflineDecisionsResponse(written=r.written, already_uploaded=r.already_uploaded,
                                                       unknown_cards=r.unknown_cards, acknowledged_sequence=r.acknowledged)
