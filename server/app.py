"""Building and running the server.

    >>> runtime = Runtime.prepare(ServerConfig(data_dir=tmp, seed_citizens=2000))   # doctest: +SKIP
    >>> node = Node(runtime, port=0); node.start(); runtime.load(); node.attach()   # doctest: +SKIP
    >>> node.port                                                                     # doctest: +SKIP
    40123

:class:`Runtime` is what all worker processes share: the model release, the scenarios, the
store's address, and the serving state in shared memory. :class:`Node` is one process's gRPC
server (grpc.aio on its own event-loop thread: health, reflection, the four services).
:func:`serve` runs either one node in this process or, with ``workers > 1``, the grpc
multiprocessing pattern: the parent allocates the shared state, forks the workers (each binds
the same port with SO_REUSEPORT and answers NOT_SERVING), loads the state (from its snapshot
when one matches: server/snapshot.py), and the workers turn SERVING when it is ready.
SIGTERM drains gracefully and writes a snapshot; SIGHUP switches to the registry's active
model release (server/rollout.py).
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kernel.calibration import CalibrationTable, RawHistogram, reference_table
from kernel.score import Scorer
from kernel.spec import ModelSpec, load_spec
from qianjiang.v1 import (
    audit_pb2, audit_pb2_grpc, eligibility_pb2, eligibility_pb2_grpc, gate_pb2, gate_pb2_grpc, records_pb2, records_pb2_grpc,
    rights_pb2, rights_pb2_grpc, score_pb2, score_pb2_grpc,
)
from server import replica, snapshot
from server.auth import (
    DEFAULT_POLICY_PATH, Authenticator, PolicyError, check_policy, is_loopback, load_policy, load_tokens,
)
from server.city_time import set_city_zone, today
from server.event_loop import new_event_loop
from server.interceptors import Limits, ServiceInterceptor
from server.keys import Keys, load_keys, synthetic_card_number
from server.keys import card_token as keyed_card_token
from server.metrics import Metrics
from server.models import ModelRegistry, lock_data_dir, remove_pid_file, write_pid_file
from server.consent import ConsentPurposes
from server.purposes import load_purposes
from server.quotas import TokenBuckets
from server.reflection import enable_reflection
from server.rollout import roll_out
from server.rollover import roll_over
from server.scenarios import Outcome, load_scenarios
from server.seed import citizen_id, seed_store  # development seeding (--seed-citizens)
from server.service import CreditService
from server.servicers import (
    AuditServicer, EligibilityServicer, GateServicer, RecordsServicer, RightsServicer, ScoreServicer,
)
from server.rights import DeadlineSweep, Rights, RightsShared, load_rights_config
from server.gate_snapshot import GateLists, gate_dir, start_publisher  # offline gates' signed lists
from server.state import (
    ACTIVE_GENERATION, CONTROL_WORKERS_SERVING, PREPARED_GENERATION, READY, WARMED, Control, ServingState,
)
from server.store import Store, StoreError, open_store
from server.store_watch import StoreWatch

log = logging.getLogger("qianjiang.server")

RECORDS_SERVICE = records_pb2.DESCRIPTOR.services_by_name["RecordsService"].full_name
RIGHTS_SERVICE = rights_pb2.DESCRIPTOR.services_by_name["RightsService"].full_name  # disputes, credit repair
SERVICE_NAMES = (
    score_pb2.DESCRIPTOR.services_by_name["ScoreService"].full_name,
    eligibility_pb2.DESCRIPTOR.services_by_name["EligibilityService"].full_name,
    records_pb2.DESCRIPTOR.services_by_name["RecordsService"].full_name,
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    RIGHTS_SERVICE,
    gate_pb2.DESCRIPTOR.services_by_name["GateService"].full_name,  # offline gates' lists
)

#: Bigger messages are refused by grpc with RESOURCE_EXHAUSTED (a BatchCheck of the maximum
#: 100,000 tokens is 1.6 MB).
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class ServerConfig:
    data_dir: Path = Path("data")
    store_url: str | None = None  # default: sqlite:///<data_dir>/qianjiang.db
    spec_path: Path | None = None
    scenarios_path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # 0: no metrics endpoint
    # Loopback by default: the endpoint is plain HTTP and unauthenticated; a Prometheus on
    # another host needs --metrics-host (the address of an interface it can reach).
    metrics_host: str = "127.0.0.1"
    workers: int = 1
    threads: int = 16  # handler threads per worker
    # Beyond this many calls in flight per worker, RESOURCE_EXHAUSTED (reason CALL_LIMIT)
    # instead of a queue: at about 1,000 checks/s per worker, 128 waiting calls bound the wait
    # near 130 ms, well inside a gate's few hundred milliseconds (docs/product.md §7). Counted
    # by the interceptor, and only once the caller is authenticated (server/interceptors.py):
    # a call without credentials, or one that never sends its message, takes no slot.
    max_concurrent_rpcs: int = 128
    # Calls waiting for a busy worker before any Python sees them (grpc core's pending
    # queue), likewise bounded: beyond it grpc refuses them at once, as CANCELLED. 128 is
    # about 40-50 ms of work at saturation; a longer stall of the machine overflows it.
    max_pending_calls: int = 128
    # Client- or bidi-streaming calls (StreamCheck, IngestRecords) open at once per worker;
    # beyond it a new one is refused at once (RESOURCE_EXHAUSTED, reason STREAM_LIMIT). A
    # stream counts as one call for its whole life, so without a limit of their own a
    # gateway's streams could take every slot from the unary checks.
    # None: half of max_concurrent_rpcs (none when that is 0); 0: no limit of their own.
    max_streams: int | None = None
    # Per caller identity (token and mtls modes), calls in flight and streams open on a
    # worker; beyond them RESOURCE_EXHAUSTED, reason CALLER_QUOTA, while the other callers
    # are served. None: a quarter of the worker's (32 calls and 16 streams by default: 32
    # checks in flight at a few ms each is far more than a worker answers a second, so only
    # calls held open reach it); 0: no quota.
    max_calls_per_caller: int | None = None
    max_streams_per_caller: int | None = None
    # The server's deadline on a unary call that set none (or a later one): a check takes
    # milliseconds, a write to a slow store seconds. It also bounds the wait for the request
    # message of a call whose client sends only headers. 0: none.
    call_timeout_seconds: float = 10.0
    # A client stream (StreamCheck, IngestRecords, reflection) that sends no message for this
    # long is ended (DEADLINE_EXCEEDED, reason STREAM_IDLE); the gateway reopens it when it
    # has something to check. 0: never.
    stream_idle_seconds: float = 120.0
    # Health.Watch and reflection streams open at once per worker (anyone may open them:
    # health and reflection need no identity). Health.Check is never limited: probes answer
    # whatever else holds the worker.
    max_open_service_streams: int = 16
    # HTTP/2 streams (calls) at once on one connection (grpc.max_concurrent_streams); a
    # client queues more on its side or opens another connection.
    max_streams_per_connection: int = 1000
    # Connections. The server pings a connection idle this long and drops it when the ping
    # is not answered within the timeout: a gateway that vanished (power, NAT) frees its
    # streams in about 80 s instead of grpc's default two hours.
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    # Every connection is closed (GOAWAY) after about this long (grpc adds +-10 % jitter, so
    # a fleet's connections do not all reconnect at once), 0: never. Clients reconnect
    # transparently, maybe to another SO_REUSEPORT worker or another server behind the load
    # balancer: without it a long-lived channel stays on the worker it first reached.
    max_connection_age_seconds: float = 300.0
    # After GOAWAY, calls in flight have this long to finish before the connection is cut.
    # Unary calls take milliseconds and an IngestRecords batch seconds; a StreamCheck or
    # IngestRecords stream still open then ends (UNAVAILABLE) and the client reopens it.
    # 0: no limit (a stream then keeps its old connection open until it ends).
    max_connection_age_grace_seconds: float = 30.0
    # A connection with no call for this long is closed (GOAWAY), 0: never.
    max_connection_idle_seconds: float = 120.0
    # The shortest interval between a client's keepalive pings on a connection without
    # calls that the server tolerates (more often: GOAWAY too_many_pings). Below the client
    # library's 30 s (clients/client.py KEEPALIVE_SECONDS), so its pings are always welcome.
    min_client_ping_seconds: float = 20.0
    # Development only: an EMPTY store is seeded with a synthetic city of this many people
    # (``make run`` asks for 100,000). 0: never; a production store is never seeded.
    seed_citizens: int = 0
    seed: int = 2018
    # The production stance: never seeds (seed_citizens must be 0), never insecure, and an
    # empty store serves an empty city (saying so) with the model's reference calibration.
    production: bool = False
    # The city's time zone: its calendar days are the days of ages, record ageing and the
    # daily refresh, whatever the host's zone (server/city_time.py).
    city_timezone: str = "Asia/Shanghai"
    grace_seconds: float = 5.0
    security: str = "insecure"  # insecure (loopback only), token, or mtls
    tokens_path: Path | None = None  # development bearer tokens (token mode)
    cert_dir: Path | None = None  # ca.pem, server.pem, server.key (server/tls.py)
    policy_path: Path | None = None  # default config/policy.toml
    audit: bool = True  # the audit log of disclosures, under <data_dir>/audit
    audit_flush_seconds: float = 0.05  # what a crash can lose at most (server/audit.py)
    # Disclosures accepted but not yet on disk, per worker: past it (a disk that cannot keep
    # up) disclosures are refused with UNAVAILABLE, never answered unaudited.
    audit_max_pending: int = 1_000_000
    # Card tokens a second one caller identity may send in batch checks, per worker (each is a
    # disclosure the audit log writes); 0: no limit. Not applied in the insecure mode.
    batch_tokens_per_second: float = 200_000.0
    purposes_path: Path | None = None  # config/purposes.toml: why a score may be read
    # The serving state's snapshot (server/snapshot.py) is written this often, and at every
    # clean stop; a start maps it instead of loading the whole city. 0: only at a clean stop.
    snapshot_seconds: float = 600.0
    # Offline gates (server/gate_snapshot.py): each pay-later scenario's signed delta this often
    # (0: no offline lists), and how long a gate may use a list after its newest delta was made.
    gate_delta_seconds: float = 300.0
    gate_valid_seconds: float = 3600.0
    gate_dir: Path | None = None  # where the lists are published and served (default <data_dir>/gate)
    event_loop: str = "uvloop"  # or "asyncio" (server/event_loop.py)
    # The citizens' rights (server/rights.py): deadlines, tier rules, the working-day calendar
    # (default config/rights.toml); and, for development and tests only, a rights clock that
    # RightsService/AdvanceTestClock moves forward (--production refuses it).
    rights_path: Path | None = None
    test_clock: bool = False
    # Replicas (server/replica.py, docs/replicas.md): this node is one of several serving one
    # PostgreSQL store, kept current by its change log; past ``replica_max_lag_seconds``
    # without confirming it is current, health says NOT_SERVING. SQLite serves one node only.
    replica: bool = False
    replica_max_lag_seconds: float = 1.0
    # Where the audit log's segments go (default <data_dir>/audit). Nodes that share one
    # directory write their own segments side by side, and "who checked me" reads them all.
    audit_dir: Path | None = None

    @property
    def stream_limit(self) -> int:
        """max_streams resolved: open streams allowed per worker, 0 for no limit."""
        if self.max_streams is not None:
            return max(self.max_streams, 0)
        return max(self.max_concurrent_rpcs // 2, 1) if self.max_concurrent_rpcs else 0

    @property
    def limits(self) -> Limits:
        """The interceptor's limits for one worker (server/interceptors.py)."""
        def share(explicit: int | None, of: int) -> int:
            if explicit is not None:
                return max(explicit, 0)
            return max(of // 4, 1) if of else 0

        return Limits(
            calls=max(self.max_concurrent_rpcs, 0), streams=self.stream_limit,
            caller_calls=share(self.max_calls_per_caller, self.max_concurrent_rpcs),
            caller_streams=share(self.max_streams_per_caller, self.stream_limit),
            call_seconds=max(self.call_timeout_seconds, 0.0), stream_idle_seconds=max(self.stream_idle_seconds, 0.0),
            open_streams=max(self.max_open_service_streams, 0),
        )

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or f"sqlite:///{Path(self.data_dir).resolve()}/qianjiang.db"


def since_start() -> float:
    """Seconds since this process began (its start time in /proc; 0 where there is none)."""
    try:
        with open("/proc/self/stat") as fh:
            started = int(fh.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return 0.0


_BEGAN: list[float] = []  # when the server's (first) process began, epoch seconds: workers inherit it


def _phase(what: str) -> None:
    """A step of a start, with the time since the server's process began (where a start's
    seconds go; a worker counts from its parent's beginning)."""
    if not _BEGAN:
        _BEGAN.append(time.time() - since_start())
    log.info("start: %s (%.2f s after the process began)", what, time.time() - _BEGAN[0])


def _ms(seconds: float) -> int:
    return max(int(round(seconds * 1000)), 0)


#: grpc's "never" for the connection age and idle options (INT_MAX milliseconds).
_NEVER_MS = 2**31 - 1


def connection_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """grpc server options for keepalive, connection ageing, the client pings allowed and the
    calls open on one connection."""
    return [
        ("grpc.keepalive_time_ms", _ms(cfg.keepalive_seconds) or _NEVER_MS),
        ("grpc.keepalive_timeout_ms", _ms(cfg.keepalive_timeout_seconds)),
        ("grpc.max_connection_age_ms", _ms(cfg.max_connection_age_seconds) or _NEVER_MS),
        ("grpc.max_connection_age_grace_ms", _ms(cfg.max_connection_age_grace_seconds) or _NEVER_MS),
        ("grpc.max_connection_idle_ms", _ms(cfg.max_connection_idle_seconds) or _NEVER_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(cfg.min_client_ping_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        # HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: calls open at once on one connection
        ("grpc.max_concurrent_streams", cfg.max_streams_per_connection or _NEVER_MS),
    ]


def private_dir(path: Path) -> None:
    """Make the data directory, or make an existing one (an older version left it 0755),
    its owner's only (0700): it holds the store, the keys, the audit log and the models."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o777 != 0o700:
            path.chmod(0o700)
    except PermissionError:  # another user's directory: theirs to protect
        log.warning("cannot make %s private (mode 0700): not its owner", path)


# --- the shared part ----------------------------------------------------------------------


class Runtime:
    """The serving release (spec + calibration), the shared state and its control block.

    The release comes from the model registry (server/models.py: ``<data_dir>/models/ACTIVE``)
    or, with ``--spec``, from that file; on the very first start of a spec its calibration
    is frozen from the population and registered as the active release. A rollout
    (server/rollout.py) replaces spec, calibration, release and state together."""

    def __init__(self, config: ServerConfig, spec: ModelSpec, scenarios, state: ServingState, keys: Keys,
                 control: Control, calibration: CalibrationTable | None = None, release: str | None = None):
        self.config, self.spec, self.scenarios, self.state, self.keys = config, spec, scenarios, state, keys
        self.control = control
        self.registry = ModelRegistry(config.data_dir)
        self._calibration, self.release = calibration, release
        self.snapshot_header: dict | None = None  # the snapshot to start from (Runtime.prepare)
        self._ageing_ready = threading.Event()  # the rollover's index is in (or will never be)
        self._ageing_ready.set()
        self._rolling = False  # a day rollover is under way: no snapshot of a state half moved
        self._positions: deque[tuple[float, int]] = deque()  # (monotonic time, state position), for replay floors
        self._snapshot_lock = threading.Lock()
        self.replica = None  # a replica's follower status (server/replica.py), shared by the workers
        self.calibration_path = Path(config.data_dir) / f"calibration-{spec.model_version}.npz"
        self.policy = load_policy(config.policy_path)
        self.purposes = load_purposes(config.purposes_path)
        # what a citizen can consent to, each its bit (server/consent.py)
        self.consent_purposes = ConsentPurposes(list(scenarios), list(self.purposes))
        state.consent_purposes = self.consent_purposes
        # the policy's grants must name this model's record types and these scenarios, each
        # record type granted only to its spec source (PolicyError otherwise: no start)
        try:
            check_policy(self.policy, {v.name: v.source for v in spec.variables}, scenarios,
                         Path(config.policy_path or DEFAULT_POLICY_PATH).name)
        except PolicyError as exc:
            if release is None:
                raise
            raise PolicyError(f"{exc} (in release {release}, the one the registry serves: make the policy agree, or "
                              "stage and activate a spec that does: qjscore model stage SPEC, then model activate)") from None
        self.authenticator = self._authenticator()
        # the offline gates' signing key (server/gate_snapshot.py): made in development,
        # required in production, like the end-user keys
        from server.gate_snapshot import load_signing_key

        self.gate_key = load_signing_key(config.data_dir, create=not config.production) if config.gate_delta_seconds > 0 else None

    def _authenticator(self) -> Authenticator:
        cfg = self.config
        if cfg.security == "insecure":
            if not is_loopback(cfg.host):
                raise ValueError(f"--security insecure is only allowed on a loopback address, not {cfg.host}")
            return Authenticator("insecure", self.policy)
        if cfg.security == "token":
            if not cfg.tokens_path:
                raise ValueError("--security token needs --tokens FILE")
            if not cfg.cert_dir and not is_loopback(cfg.host):
                raise ValueError("bearer tokens in clear text only on a loopback address; give --certs for TLS")
            return Authenticator("token", self.policy, load_tokens(cfg.tokens_path), end_user_keys=self._end_user_keys())
        if cfg.security == "mtls":
            if not cfg.cert_dir:
                raise ValueError("--security mtls needs --certs DIR (python -m server.tls makes a development one)")
            from server.tls import caller_identity

            return Authenticator("mtls", self.policy, identity_of=caller_identity, end_user_keys=self._end_user_keys())
        raise ValueError(f"--security {cfg.security!r}: expected insecure, token or mtls")

    def _end_user_keys(self) -> dict:
        """Each citizen app's public key for the end users it signs for (server/end_user.py):
        made in development when missing; required in production."""
        from server.end_user import load_public_keys

        apps = [identity for identity, c in self.policy.callers.items() if c.role == "citizen_app"]
        return load_public_keys(self.config.data_dir, apps, create=not self.config.production)

    def synthetic_card_token(self, row: int) -> bytes:
        return keyed_card_token(self.keys.card, synthetic_card_number(row))

    def release_of(self, model_version: str, calibration_version: str) -> tuple[ModelSpec, CalibrationTable]:
        """An earlier release's spec and calibration, from the registry (an appeal replays a
        decision with the release that made it). RegistryError if it is not there."""
        return self.registry.release(f"{model_version}~{calibration_version}")

    @classmethod
    def prepare(cls, config: ServerConfig) -> "Runtime":
        """Open the store (seeding an empty one when asked) and allocate the shared state.
        Cheap enough to run before the workers fork; loading comes after (:meth:`load`)."""
        check_stance(config)
        replica.check_config(config)  # replicas need PostgreSQL
        set_city_zone(config.city_timezone)  # before any day is computed; the workers inherit it
        scenarios = load_scenarios(config.scenarios_path)
        private_dir(Path(config.data_dir))
        registry = ModelRegistry(config.data_dir)
        calibration = release = None
        if config.spec_path is None:
            release = registry.active() or registry.adopt_legacy()
        if release is not None:
            spec, calibration = registry.release(release)
        else:
            spec = load_spec(config.spec_path)
        keys = load_keys(Path(config.data_dir))
        store = open_store(config.resolved_store_url)
        try:
            # population_bounds reads two keys' maxima; counts() would count every record
            # (15 s at 12.5 M, and its scan evicts the page cache a snapshot start needs)
            citizens, cards = store.population_bounds()
            if citizens == 0 and config.seed_citizens > 0:
                seed_store(store, spec, config.seed_citizens, config.seed, keys)
                citizens, cards = store.population_bounds()
            if citizens == 0:
                log.warning("the store %s has no citizens: serving an empty city (every card is unknown) until "
                            "sources add people (UpsertCitizen, RegisterCard, IngestRecords)%s", store.name,
                            "" if config.production else "; --seed-citizens N seeds a synthetic one for development")
        finally:
            store.close()
        # Room for 5 % more citizens and cards (at least 1,024) before a restart must grow the
        # state: a restart from a snapshot takes seconds, and every spare row costs memory.
        capacity = citizens + max(1024, citizens // 20)
        token_capacity = max(capacity, cards + max(1024, cards // 20))
        header = _snapshot_header(config, release)
        if header is not None:  # the snapshot's own capacities (its bytes map onto them) while half the room is left
            if (header["capacity"] - citizens >= (capacity - citizens) // 2
                    and header["token_capacity"] - cards >= (token_capacity - cards) // 2):
                capacity, token_capacity = header["capacity"], header["token_capacity"]
            else:
                log.info("the city outgrew the snapshot's capacity: loading from the store")
                header = None
        control = Control(capacity)
        state = ServingState.allocate(spec, capacity, token_capacity=token_capacity, audit_key=keys.audit,
                                      lock=control.lock)
        runtime = cls(config, spec, scenarios, state, keys, control, calibration, release)
        runtime.snapshot_header = header
        if config.replica:  # before the workers fork: they read the follower's status
            runtime.replica = replica.ReplicaStatus(config.replica_max_lag_seconds)
        # the citizens' rights: their configuration, the rights clock and the dispute marks,
        # shared by the workers like the state (server/rights.py)
        runtime.rights_config = load_rights_config(config.rights_path)
        runtime.rights_shared = RightsShared(capacity, test_clock=config.test_clock)
        if config.test_clock:
            log.warning("--test-clock: RightsService/AdvanceTestClock may move this server's rights clock forward "
                        "(development and tests only)")
        return runtime

    def open_store(self, metrics: Metrics | None = None) -> Store:
        return open_store(self.config.resolved_store_url, on_write=metrics.observe_store_write if metrics else None)

    def serve_release(self, spec: ModelSpec, calibration: CalibrationTable, release: str, state: ServingState) -> None:
        """What a rollout switched to (server/rollout.py)."""
        self.spec, self._calibration, self.release, self.state = spec, calibration, release, state

    def calibration(self) -> CalibrationTable:
        if self._calibration is None:
            self._calibration = CalibrationTable.load(self.calibration_path, self.spec)
        return self._calibration

    def load(self, metrics: Metrics | None = None) -> None:
        """Fill the shared state from the store and score everyone. The first time a model
        version is served, its calibration table is built from this population and frozen
        (later starts reuse it, so scores are reproducible)."""
        t0 = time.perf_counter()
        store = self.open_store()
        try:
            calibrated = self._calibration is not None or self.calibration_path.exists()
            scorer = Scorer(self.spec, self.calibration()) if calibrated else Scorer(self.spec)
            marked = self.rights_shared.rebuild(store)  # before the state is ready: no call sees marks missing
            if marked:
                log.info("%d citizens have open disputes", marked)
            if not (calibrated and self._restore_snapshot(store, scorer)):
                self.state.load(store, scorer, self.scenarios, today(), mark_ready=calibrated)
        finally:
            store.close()
        self._positions.append((time.monotonic(), self.state.position))  # every write up to it is in the state
        if not calibrated:
            n = self.state.n_citizens
            hist = RawHistogram.empty(self.spec)
            hist.add(self.state.columns.raw[:n][self.state.adult[:n] == 1])
            if hist.counts.sum():
                hist.freeze().save(self.calibration_path)
                log.info("calibrated model %s on %d adults", self.spec.model_version, int(hist.counts.sum()))
            else:  # nobody to calibrate on (an empty production store): never a synthetic population
                self._calibration = reference_table(self.spec, self.config.spec_path)
                log.warning("no adult in the store to calibrate model %s on: serving its reference calibration %s "
                            "until an operator stages one frozen from the city (qjscore model stage)",
                            self.spec.model_version, self._calibration.calibration_version)
            self.state.rescore(Scorer(self.spec, self.calibration()))  # the features are derived already
        if self.release is None:
            self.release = self.registry.bootstrap(self.spec, self.calibration(), self.config.spec_path)
        self.registry.record_served(self.release, self.registry.active(), "serving")  # what `model status` shows
        if metrics:
            if self.state.last_batch_seconds:  # none when started from a snapshot
                metrics.kernel_batch_seconds.observe(self.state.last_batch_seconds)
            metrics.citizens.set(self.state.n_citizens)
        log.info("loaded %d citizens in %.1f s", self.state.n_citizens, time.perf_counter() - t0)

    def _restore_snapshot(self, store: Store, scorer: Scorer) -> bool:
        """Serve from the snapshot Runtime.prepare found, if it is exactly what the store says
        (server/snapshot.py); False, with a log line saying why, when the state must be
        loaded from the store instead."""
        header = self.snapshot_header
        if header is None or self.release is None:
            return False
        path, t0, touched = snapshot.snapshot_path(self.config.data_dir), time.perf_counter(), False
        try:
            snapshot.check(header, self.state, **self._snapshot_identity(store), store_position=store.high_water_mark())
            _phase("snapshot checked")
            touched = True
            snapshot.load_into(path, header, self.state)
            _phase("snapshot read")
            replayed = snapshot.replay(self.state, store, self.scenarios, scorer, header["position"])
            _phase(f"{replayed} changed citizens replayed")
        except (snapshot.SnapshotRefused, StoreError, OSError) as exc:
            log.warning("snapshot not used: %s; loading from the store", exc)
            if touched:
                self.state.wipe()
            return False
        log.info("started from the snapshot of %d citizens (position %d) in %.1f s; %d citizens changed since were "
                 "re-derived from the store", self.state.n_citizens, header["position"], time.perf_counter() - t0, replayed)
        self._consent_settings_from(store)  # the snapshot's consent bits may mean other purposes
        if self.state.as_of_day != today():  # a snapshot of another day: its index first
            self._read_ageing(path, header)
            roll_over(self.state, store, scorer, self.scenarios, today())
        else:  # the index only serves the next rollover: read once the state serves
            self._ageing_ready.clear()
            threading.Thread(target=self._read_ageing, args=(path, header), name="qj-ageing", daemon=True).start()
        with self.state.lock:
            self.state.meta[READY] = 1
        return True

    def _read_ageing(self, path: Path, header: dict) -> None:
        """The snapshot's index of ageing records into the state (server/ageing.py). A
        damaged one leaves none: the next rollover then reads every citizen from the store."""
        state = self.state
        try:
            t0 = time.perf_counter()
            ageing = snapshot.read_ageing(path, header)
            if state is self.state:
                state.ageing = ageing
            log.info("the rollover's index of %d ageing records read from the snapshot in %.1f s",
                     len(ageing) if ageing is not None else 0, time.perf_counter() - t0)
        except (snapshot.SnapshotRefused, OSError) as exc:
            log.warning("the snapshot's index of ageing records not used (%s): the next day rollover reads every "
                        "citizen from the store", exc)
        finally:
            self._ageing_ready.set()

    def note_position(self) -> None:
        """Sample the state's position (the maintenance loop, once a second): a snapshot
        taken later replays from a sample old enough that every write up to it is applied."""
        now = time.monotonic()
        position = self.state.position
        if self.replica is not None:  # a replica's own writes may run ahead of what it followed
            position = min(position, self.replica.applied)
        self._positions.append((now, position))
        while len(self._positions) > 1 and self._positions[1][0] <= now - snapshot.REPLAY_MARGIN_SECONDS:
            self._positions.popleft()

    def write_snapshot(self, exact: bool = False) -> dict | None:
        """Write the serving state's snapshot (server/snapshot.py). ``exact``: no write can be
        in flight (a clean stop, every worker drained), so it replays from the state's own
        position; otherwise from the newest sampled position old enough."""
        if self.release is None or not self.state.ready:
            return None
        if self._rolling:  # its rows half moved to the new day: the previous snapshot stays
            log.warning("snapshot not written: a day rollover is under way")
            return None
        self._ageing_ready.wait(300)  # the rollover's index, read after the start, goes in it too
        with self._snapshot_lock:
            if exact or not self._positions:
                position = self.state.position
                if self.replica is not None:
                    position = min(position, self.replica.applied)
            else:
                position = self._positions[0][1]
            store = self.open_store()
            try:
                identity = self._snapshot_identity(store)
            finally:
                store.close()
            return snapshot.write(snapshot.snapshot_path(self.config.data_dir), self.state, **identity, position=position)

    def _consent_settings_from(self, store: Store) -> None:
        """Every row's purpose exceptions from the store, and the gate of each that changed:
        after a snapshot (written under another list of purposes, perhaps), before serving."""
        s = self.state
        n = s.n_citizens
        with s.lock:
            before = s.consent_except[:n].copy()
            s.load_consent_settings(store, n)
            changed = np.flatnonzero(before != s.consent_except[:n])
            if len(changed):
                with s.writing(changed):
                    s.refresh_gate(changed)

    def expire_consents(self, store: Store, old_day: int, new_day: int) -> int:
        """At the city's midnight: the citizens whose purpose grants ended on a day now past
        (their last day in [old_day, new_day - 1]) get their consent re-derived. Returns how
        many."""
        rows = store.consent_rows_expiring(old_day, new_day - 1)
        for row in rows:
            # the position first, then the consent: what is read is at least that new, and a
            # write the state applied since (re-derived on the new day already) is kept
            position = store.high_water_mark()
            blanket, exceptions = self.state.consent_of(store, row)
            with self.state.lock:
                self.state.set_consent(row, blanket, position, exceptions)
        if rows:
            log.info("consent: %d citizens' purpose grants expired at the day's start", len(rows))
        return len(rows)

    def _snapshot_identity(self, store: Store) -> dict:
        """What a snapshot is of (server/snapshot.py write and check): the release, the keys'
        fingerprint and the store."""
        return {"release": self.release, "model_version": self.spec.model_version,
                "calibration_version": self.calibration().calibration_version,
                "keys_id": snapshot.keys_fingerprint(self.keys), "store": snapshot.store_identity(store)}

    def refresh_if_new_day(self, metrics: Metrics | None = None, day: int | None = None) -> bool:
        """Records age out, people turn 18 and purpose grants end by the city's day: on a
        new day (``day``: the city's today by default), re-derive the citizens that changes,
        without stalling writes (server/rollover.py)."""
        day = today() if day is None else day
        if day == self.state.as_of_day:
            return False
        store = self.open_store()
        try:
            old_day = self.state.as_of_day
            self._ageing_ready.wait(300)  # read after a snapshot start (else every citizen is read again)
            self._rolling = True
            try:
                figures = roll_over(self.state, store, Scorer(self.spec, self.calibration()), self.scenarios, day)
            finally:
                self._rolling = False
            self.expire_consents(store, old_day, day)
        finally:
            store.close()
        if metrics:
            metrics.rollover_seconds.observe(figures.get("seconds", 0.0))
        return True


def _snapshot_header(config: ServerConfig, release: str | None) -> dict | None:
    """The header of the data directory's snapshot if there is one worth trying."""
    path = snapshot.snapshot_path(config.data_dir)
    if release is None or not path.exists():
        return None
    try:
        return snapshot.read_header(path)
    except snapshot.SnapshotRefused as exc:
        log.warning("snapshot not used: %s; loading from the store", exc)
        return None


def check_stance(config: ServerConfig) -> None:
    """The production stance (``--production``) refuses what only development may do:
    ValueError naming the option."""
    if not config.production:
        return
    if config.seed_citizens:
        raise ValueError(f"--production never seeds a synthetic city: drop --seed-citizens {config.seed_citizens}")
    if config.security != "mtls":
        raise ValueError(f"--production serves with mutual TLS (--security mtls --certs DIR), not --security {config.security}")
    if config.test_clock:
        raise ValueError("--production keeps the real clock: drop --test-clock (development and tests only)")


# --- one process's server -------------------------------------------------------------------


class Node:
    """One gRPC server (grpc.aio): health, reflection and the four services.

    The server runs on its own event loop in a thread of this process (``qj-grpc``), so the
    code that builds, attaches and drains it stays synchronous; blocking domain calls go to
    a small thread pool (server/servicers.py).
    """

    def __init__(self, runtime: Runtime, port: int | None = None, host: str | None = None,
                 metrics: Metrics | None = None, reuseport: bool = False):
        cfg = runtime.config
        self.runtime = runtime
        # the shared control block, read through a memoryview: a plain int per call, where
        # indexing the numpy array makes a numpy scalar (this is asked before every call)
        self._active_generation = memoryview(runtime.control.meta)
        self.metrics = metrics or Metrics()
        self.metrics.start_flushing()
        self.pool = futures.ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix="qj-io")
        # per caller identity, for every model generation this node serves
        self.batch_quota = TokenBuckets(cfg.batch_tokens_per_second) if cfg.batch_tokens_per_second > 0 else None
        self.loop = new_event_loop(cfg.event_loop)
        self._thread = threading.Thread(target=self.loop.run_forever, name="qj-grpc", daemon=True)
        self._thread.start()
        self.score = ScoreServicer(self.pool, self._ready)
        self.eligibility = EligibilityServicer(self.pool, self._ready)
        self.records = RecordsServicer(self.pool, self._ready)
        self.audit_servicer = AuditServicer(self.pool, self._ready)
        self.rights = RightsServicer(self.pool, self._ready)
        self.gate = GateServicer(self.pool, self._ready)  # offline gates' lists (server/gate_snapshot.py)
        self.score.rights_marks = runtime.rights_shared
        self.service: CreditService | None = None
        self.store_watch: StoreWatch | None = None
        self._next: tuple[int, CreditService] | None = None  # built for the next generation
        self._switching = threading.Lock()
        self._watching = threading.Event()
        self._store: Store | None = None
        self.audit = None
        try:
            self.port = self._on_loop(self._build(host or cfg.host, cfg.port if port is None else port, reuseport))
        except BaseException:
            self._stop_loop()
            raise

    def _on_loop(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop from any other thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _build(self, host: str, port: int, reuseport: bool) -> int:
        cfg = self.runtime.config
        self.health = health.aio.HealthServicer()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.interceptor = ServiceInterceptor(self.metrics, ready=self._ready, authenticator=self.runtime.authenticator,
                                              limits=cfg.limits)
        self.server = grpc.aio.server(
            interceptors=[self.interceptor],
            # No maximum_concurrent_rpcs: grpc would count a call from its headers, before
            # anyone is authenticated, and hold the slot while the call waits for a message
            # that may never come. The interceptor counts admitted calls instead.
            maximum_concurrent_rpcs=None,
            options=connection_options(cfg) + [
                ("grpc.so_reuseport", 1 if reuseport else 0),
                # Overload: calls the worker has not taken up yet queue in grpc's core, before
                # any Python sees them; past this many the core itself refuses them at once
                # (as CANCELLED: grpcio's server answers this way, not RESOURCE_EXHAUSTED), so
                # the queue (and the wait) stays bounded.
                ("grpc.server.max_pending_requests", max(cfg.max_pending_calls, 1)),  # = hard: no random early drops
                ("grpc.server.max_pending_requests_hard_limit", max(cfg.max_pending_calls, 1)),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        audit_pb2_grpc.add_AuditServiceServicer_to_server(self.audit_servicer, self.server)
        rights_pb2_grpc.add_RightsServiceServicer_to_server(self.rights, self.server)
        gate_pb2_grpc.add_GateServiceServicer_to_server(self.gate, self.server)
        score_pb2_grpc.add_ScoreServiceServicer_to_server(self.score, self.server)
        eligibility_pb2_grpc.add_EligibilityServiceServicer_to_server(self.eligibility, self.server)
        records_pb2_grpc.add_RecordsServiceServicer_to_server(self.records, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        enable_reflection(self.server, SERVICE_NAMES + (health.SERVICE_NAME,))  # v1 and v1alpha
        addr = f"{host}:{port}"
        if cfg.cert_dir:
            from server.tls import server_credentials

            bound = self.server.add_secure_port(addr, server_credentials(Path(cfg.cert_dir), require_client_auth=cfg.security == "mtls"))
        else:
            bound = self.server.add_insecure_port(addr)
        if not bound:
            raise OSError(f"cannot listen on {addr}")
        return bound

    async def _set_health(self, status, names=("",) + SERVICE_NAMES) -> None:
        for name in names:
            await self.health.set(name, status)

    def set_health(self, status, names=("",) + SERVICE_NAMES) -> None:
        self._on_loop(self._set_health(status, names))

    def _ready(self) -> bool:
        """Asked before every call (the interceptor): switches to a new model generation
        the moment it is active, then answers whether the state is loaded."""
        service = self.service
        if service is None:
            return False
        if self._active_generation[ACTIVE_GENERATION] != service.generation:
            service = self._switch()
        return service.state.ready

    def start(self) -> "Node":
        self._on_loop(self.server.start())
        return self

    def attach(self) -> CreditService:
        """Once the shared state is loaded: bind the kernel, open this process's store
        connection, and turn SERVING."""
        rt, m = self.runtime, self.metrics
        self._store = rt.open_store(m)
        self.store_watch = StoreWatch(self._store, on_change=self._store_changed)
        m.store_up.set(1)
        if rt.config.audit:
            from server.audit import AuditLog

            self.audit = AuditLog(Path(rt.config.audit_dir or Path(rt.config.data_dir) / "audit"), rt.keys.audit, flush_interval=rt.config.audit_flush_seconds,
                                  max_pending=rt.config.audit_max_pending)
            self.audit.start()
        service = self._service_on(rt.state, rt.spec, rt.calibration(), rt.control.generation)
        self._serve(service)
        # Everything loaded so far lives as long as the process: keep it out of the cyclic
        # garbage collector's full passes, which otherwise stall the event loop for tens of
        # milliseconds (the p99.9 of a gate check).
        gc.collect()
        gc.freeze()
        self.set_health(health_pb2.HealthCheckResponse.SERVING)
        threading.Thread(target=self._watch, name="qj-rollout", daemon=True).start()
        replica.watch_health(self)  # a replica behind its bound: NOT_SERVING
        return service

    def _service_on(self, state: ServingState, spec: ModelSpec, calibration: CalibrationTable,
                    generation: int = 0, previous: CreditService | None = None) -> CreditService:
        m = self.metrics
        decisions = m.decisions
        children = {}

        def counter(scenario: str, outcome: int):
            child = children.get((scenario, outcome))
            if child is None:
                child = children[(scenario, outcome)] = decisions.labels(scenario=scenario, outcome=_OUTCOME_NAMES[outcome])
            return child

        count = m.calls.inc
        by_outcome = {}  # scenario -> its counters of outcomes 1..7 (0 is never an answer)

        def on_decisions(scenario: str, counts: np.ndarray) -> None:
            counters = by_outcome.get(scenario)
            if counters is None:
                counters = by_outcome[scenario] = tuple(counter(scenario, v) for v in range(1, len(counts)))
            m.calls.inc_each(counters, counts[1:])

        def on_decision(scenario: str, outcome) -> None:
            count(counter(scenario, outcome))  # an Outcome is its int as a key and an index

        return CreditService(
            state, self._store, Scorer(spec, calibration), self.runtime.scenarios,
            on_rescore=m.observe_rescore, on_decisions=on_decisions, on_decision=on_decision, audit=self.audit,
            control=self.runtime.control, generation=generation,
            ids=previous.ids if previous else None, store_watch=self.store_watch,
            releases=self.runtime.release_of, purposes=self.runtime.purposes, batch_quota=self.batch_quota,
            repair_after=self.runtime.rights_config.min_publicity_days,
        )

    def _store_changed(self, up: bool) -> None:
        """The store went away or came back (server/store_watch.py): writes are refused
        meanwhile, so the writing service says NOT_SERVING; the reading ones keep serving."""
        self.metrics.store_up.set(1 if up else 0)
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            self.set_health(status, names=(RECORDS_SERVICE, RIGHTS_SERVICE))
        except RuntimeError:  # the loop is closed: draining
            pass

    def _serve(self, service: CreditService) -> None:
        old = self.service
        self.score.service = self.eligibility.service = self.records.service = self.audit_servicer.service = service
        self.rights.service = Rights(service, self.runtime.rights_shared, self.runtime.rights_config)
        self.gate.service = GateLists(self.runtime.config.data_dir, service, directory=gate_dir(self.runtime.config))
        self.service = service
        info = self.metrics.model_info
        if old is not None:
            info.labels(model_version=old.model_version, calibration_version=old.calibration_version).set(0)
        info.labels(model_version=service.model_version, calibration_version=service.calibration_version).set(1)

    def _switch(self) -> CreditService:
        with self._switching:
            active = int(self.runtime.control.meta[ACTIVE_GENERATION])
            if active != self.service.generation and self._next is not None and self._next[0] == active:
                service = self._next[1]
                self._next = None
                self._serve(service)
                log.info("serving model %s, calibration %s (generation %d)", service.model_version,
                         service.calibration_version, active)
            return self.service

    def _watch(self) -> None:
        """Builds and warms up the service of a generation the parent prepares, before it
        becomes active (server/rollout.py)."""
        control = self.runtime.control
        while not self._watching.wait(0.02):
            prepared = int(control.meta[PREPARED_GENERATION])
            nxt = self._next
            if nxt is not None and prepared != nxt[0]:
                self._next = None  # the rollout was called off
            if prepared <= self.service.generation or (nxt is not None and nxt[0] == prepared):
                continue
            generation, path, release = control.prepared()
            try:
                spec, calibration = self.runtime.registry.release(release)
                old = self.service
                state = ServingState.attach(path, spec, old.state.capacity, old.state.token_capacity,
                                            old.state.audit_key, control.lock)
                state.consent_purposes = old.state.consent_purposes
                service = self._service_on(state, spec, calibration, generation, previous=old)
                _warm_up(service)
            except Exception:  # noqa: BLE001 - the parent times out and keeps the old release
                log.exception("could not prepare model generation %d (%s)", generation, release)
                continue
            self._next = (generation, service)
            with control.lock:
                control.meta[WARMED] += 1

    def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING first (load balancers stop sending), then finish calls in flight."""
        grace = self.runtime.config.grace_seconds if grace is None else grace
        self._watching.set()
        if self.store_watch is not None:
            self.store_watch.close()
        try:
            self.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            self._on_loop(self.server.stop(grace))
        finally:
            self._stop_loop()
            self.pool.shutdown(wait=True)
            if self.audit is not None:
                self.audit.close()  # flushes: nothing disclosed goes unrecorded
            if self._store is not None:
                self._store.close()
            self.metrics.stop_flushing()  # the last calls' figures too

    def _stop_loop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


_OUTCOME_NAMES = {o.value: o.name for o in Outcome}


def _warm_up(service: CreditService) -> None:
    """Touch every page of a freshly mapped state and run the check path once, so the first
    calls after the switch pay no page faults or first-call costs."""
    s = service.state
    n = s.n_citizens
    for column in (s.columns.score, s.columns.flags, s.adult, s.consent, s.defaults, s.subject, s.gate):
        int(np.asarray(column[: max(n, 1)]).view(np.uint8).sum())
    int(s.tokens.slots.view(np.uint8).sum())
    scenario = next(iter(service.scenarios.values()))
    service._check_tokens(scenario, bytes(16 * 64))


# --- running ----------------------------------------------------------------------------------


class _Signals:
    """SIGTERM and SIGINT (stop) and SIGHUP (``reload``: switch to the registry's active model
    release), caught from the moment they are installed. A server installs them before it
    loads anything, so a signal that comes while it starts is acted on once it serves, never
    the default action, which would end the process with no drain and no snapshot."""

    def __init__(self, reload: bool = True):
        self.stop, self.reload, self.signum = threading.Event(), threading.Event(), 0
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        if reload:
            signal.signal(signal.SIGHUP, lambda signum, frame: self.reload.set())

    def _stop(self, signum, frame) -> None:
        self.signum = signum
        self.stop.set()


def _wait_for_signal(signals: _Signals, parent: int | None = None, children: list[int] | None = None) -> int:
    """Block until SIGTERM or SIGINT, or (in a worker) until the parent process is gone, so
    that no worker outlives its parent, or (in the parent) until a worker dies. Returns the
    signal, or -1 when a worker died."""
    while not signals.stop.wait(0.5):
        if parent is not None and os.getppid() != parent:
            break
        for pid in children or ():
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                children.remove(pid)
                return -1
    return signals.signum


def _example_caller(runtime: Runtime, method: str, scenario: str | None = None) -> str | None:
    """A caller identity of the policy that may call ``method`` (and decide ``scenario``)."""
    for identity, caller in sorted(runtime.policy.callers.items()):
        if caller.may_call(method) and (scenario is None or caller.may_decide(scenario)):
            return identity
    return None


def start_banner(runtime: Runtime, port: int, examples: bool) -> str:
    """What ``qjscore serve`` prints once the service answers. ``examples`` (stdout is a
    terminal): a seeded citizen and their card token to try, with the flags the security
    mode needs; never otherwise, so that no identifier or card token reaches a log file."""
    cfg = runtime.config
    metrics = f"{cfg.metrics_host}:{cfg.metrics_port}" if cfg.metrics_port else "off"
    lines = [
        f"Qianjiang Score serving {runtime.state.n_citizens:,} citizens on {cfg.host}:{port} "
        f"({cfg.workers} worker(s); model {runtime.spec.model_version}; security {cfg.security}; metrics on {metrics})",
    ]
    state = runtime.state
    n = state.n_citizens
    ok = np.flatnonzero((state.consent[:n] == 1) & (state.adult[:n] == 1))
    row = int(ok[0]) if len(ok) else -1
    # examples only from a synthetic city: a real citizen's card token is not ours to print
    synthetic = row >= 0 and state.tokens.get(runtime.synthetic_card_token(row)) == row
    if n == 0:
        lines.append("The store has no citizens: an empty city, every card unknown, until sources add people "
                     "(UpsertCitizen, RegisterCard, IngestRecords)."
                     + ("" if cfg.production else " Development: --seed-citizens N seeds a synthetic city."))
    if examples and synthetic:
        host = cfg.host if is_loopback(cfg.host) else "127.0.0.1"
        target = f"{host}:{port}"
        flags = "" if target == "127.0.0.1:50051" else f" --target {target}"
        checks = f"qjscore check campus_fitness --card {runtime.synthetic_card_token(row).hex()}"
        scores = f"qjscore score {citizen_id(row)}"
        notes = []
        if cfg.security == "insecure":
            checks, scores = checks + flags, scores + flags
        else:
            checker = _example_caller(runtime, "EligibilityService/Check", "campus_fitness") or "IDENTITY"
            reader = _example_caller(runtime, "ScoreService/GetScore") or "IDENTITY"
            if cfg.security == "token":
                checks += f"{flags} --token TOKEN_OF_{checker.upper()}"
                scores += f"{flags} --token TOKEN_OF_{reader.upper()}"
                notes.append(f"(the tokens of {checker} and {reader} are in {cfg.tokens_path}; or export QJ_TOKEN)")
            else:
                certs = f" --certs {cfg.cert_dir}"
                checks += f"{flags}{certs} --caller {checker}"
                scores += f"{flags}{certs} --caller {reader}"
                notes.append(f"(their certificates: qjscore certs --out {cfg.cert_dir} makes them with the CA)")
        lines += ["Try, in another shell:", f"  {checks}", f"  {scores}", *(f"  {n}" for n in notes)]
    elif synthetic:
        lines.append("(not a terminal: no example citizen or card token printed; `qjscore token CITIZEN_ID` gives one)")
    lines.append("Stop with Ctrl-C (drains gracefully).")
    return "\n".join(lines)


def announce(runtime: Runtime, port: int) -> None:
    """``serve``'s on_ready for the command line: the banner on stdout."""
    print(start_banner(runtime, port, examples=sys.stdout.isatty()), flush=True)


def serve(config: ServerConfig, on_ready=None) -> None:
    """Run the service until SIGTERM or SIGINT. ``on_ready(runtime)`` is called once it
    answers (the CLI prints how to query it)."""
    if config.workers > 1 and config.port == 0:
        raise ValueError("--workers > 1 needs a fixed --port (every worker binds the same one)")
    _phase("imports done")
    lock_data_dir(config.data_dir)  # one server per data directory, before anything touches it
    signals = _Signals()
    runtime = Runtime.prepare(config)
    _phase("store opened, state allocated")
    write_pid_file(config.data_dir)  # `qjscore model activate|restore` signals this process
    atexit.register(remove_pid_file, config.data_dir)
    if config.security == "insecure":
        banner = "=" * 78
        log.warning(
            "\n%s\nINSECURE MODE: no caller is authenticated and every call is allowed, on %s only.\n"
            "For anything but local development use --security mtls --certs DIR.\n%s", banner, config.host, banner,
        )
    if config.workers <= 1:
        _serve_single(runtime, on_ready, signals)
    else:
        _serve_workers(runtime, on_ready, signals)


def _maintenance(runtime: Runtime, metrics: Metrics, stop: threading.Event, reload: threading.Event, nodes: int) -> None:
    """The parent's background work, one thing at a time: a model rollout when SIGHUP asks
    for one (server/rollout.py), the snapshot every ``snapshot_seconds`` (server/snapshot.py)
    and the day rollover at the city's midnight (server/rollover.py); every second, the rights'
    deadline sweep (server/rights.py: disputes unanswered past their deadline suspend their
    record, repair applications undecided past theirs are escalated). It runs at a lower CPU
    priority (this thread only) so that all of it takes what the workers leave."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except OSError:  # not permitted here: run at the normal priority
        pass
    next_refresh = time.monotonic() + 60
    every = runtime.config.snapshot_seconds
    next_snapshot = time.monotonic() + every if every > 0 else float("inf")
    sweep = DeadlineSweep(runtime)  # disputes and repair applications past their deadlines (server/rights.py)
    while not stop.is_set():
        runtime.note_position()
        sweep()
        if time.monotonic() >= next_snapshot:
            next_snapshot = time.monotonic() + every
            try:
                runtime.write_snapshot()
            except Exception:  # a full disk: the previous snapshot stays; retry at the next interval
                log.exception("snapshot not written")
        if reload.wait(1.0):
            reload.clear()
            try:
                roll_out(runtime, nodes, metrics)
            except Exception as exc:  # keep serving the release that serves now
                log.exception("model rollout failed")
                runtime.registry.record_served(runtime.release, runtime.registry.active(), "failed", repr(exc))
        if time.monotonic() >= next_refresh:
            next_refresh = time.monotonic() + 60
            try:
                runtime.refresh_if_new_day(metrics)  # logs what it re-derived
            except Exception:  # keep serving yesterday's scores, retry next minute
                log.exception("daily refresh failed")


def _serve_single(runtime: Runtime, on_ready, signals: _Signals) -> None:
    cfg = runtime.config
    metrics = Metrics()
    if cfg.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, addr=cfg.metrics_host)
    node = Node(runtime, metrics=metrics).start()
    runtime.load(metrics)
    follower = replica.start(runtime)  # a replica follows the store's change log
    node.attach()
    stop = threading.Event()
    threading.Thread(target=_maintenance, args=(runtime, metrics, stop, signals.reload, 1), daemon=True).start()
    start_publisher(runtime, stop, metrics)  # the offline gates' snapshots and deltas (server/gate_snapshot.py)
    if on_ready:
        on_ready(runtime, node.port)
    _wait_for_signal(signals)
    stop.set()
    log.info("draining")
    node.drain()
    if follower is not None:
        follower.stop()
    _last_snapshot(runtime)


def _last_snapshot(runtime: Runtime) -> None:
    """At a clean stop, every worker drained: an exact snapshot for the next start."""
    try:
        runtime.write_snapshot(exact=True)
    except Exception:  # noqa: BLE001 - the next start loads from the store
        log.exception("snapshot not written at stop")


def _serve_workers(runtime: Runtime, on_ready, signals: _Signals) -> None:
    cfg = runtime.config
    children = []
    parent = os.getpid()
    for _ in range(cfg.workers):
        pid = os.fork()
        if pid == 0:  # worker
            code = 0
            try:
                _worker(runtime, parent)
            except BaseException:  # noqa: BLE001
                log.exception("worker failed")
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    _phase(f"{cfg.workers} workers forked")
    metrics = Metrics()
    if cfg.metrics_port:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        start_http_server(cfg.metrics_port, addr=cfg.metrics_host, registry=registry)
    runtime.load(metrics)
    follower = replica.start(runtime)  # a replica follows the store's change log
    _phase("state ready")
    deadline = time.monotonic() + 60
    while runtime.control.meta[CONTROL_WORKERS_SERVING] < cfg.workers and time.monotonic() < deadline:
        time.sleep(0.05)
    _phase("every worker serving")
    if on_ready:
        on_ready(runtime, cfg.port)
    stop = threading.Event()
    threading.Thread(target=_maintenance, args=(runtime, metrics, stop, signals.reload, cfg.workers), daemon=True).start()
    start_publisher(runtime, stop, metrics)  # the offline gates' snapshots and deltas (server/gate_snapshot.py)
    if _wait_for_signal(signals, children=children) == -1:
        # A worker died (killed, out of memory): it may have held the shared write lock, which
        # no other process can release, so writes would hang. Stop every worker and exit
        # non-zero for the supervisor to restart the service; the store has everything that
        # was acknowledged.
        log.error("a worker died; stopping the service so that it restarts cleanly")
        exit_code = 1
    else:
        exit_code = 0
    stop.set()
    log.info("draining %d workers", len(children))
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for pid in children:
        os.waitpid(pid, 0)
    if follower is not None:
        follower.stop()
    if exit_code:  # a worker died: it may have left a row half applied, so no snapshot now
        sys.exit(exit_code)
    _last_snapshot(runtime)


def _worker(runtime: Runtime, parent: int) -> None:
    signals = _Signals(reload=False)  # this process's own (the parent's were inherited)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; SIGTERM drains
    node = Node(runtime, reuseport=True).start()
    _phase(f"worker {os.getpid()} listening")
    while not runtime.state.ready:
        if os.getppid() != parent:
            return
        time.sleep(0.05)
    node.attach()
    _phase(f"worker {os.getpid()} serving")
    with runtime.control.lock:
        runtime.control.meta[CONTROL_WORKERS_SERVING] += 1
    _wait_for_signal(signals, parent)
    with runtime.control.lock:
        runtime.control.meta[CONTROL_WORKERS_SERVING] -= 1
    node.drain()
