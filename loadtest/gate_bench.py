"""The offline gates' benchmark (issue 19; docs/offline_gates.md): one JSON line.

    python -m loadtest.gate_bench --citizens 12500000            # about 10 minutes, plus the link cut
    python -m loadtest.gate_bench --citizens 200000 --cut-seconds 30

Two parts:

1. **The list at city scale**, in this process, without a store: a synthetic city of N
   (kernel/synthetic.py features, scored by the compiled kernel calibrated on them; random
   16-byte card tokens, which have the distribution of the service's keyed tokens; consent
   85 % blanket with 3 % of scenario exceptions, 1 % unpaid defaults per pay-later scenario),
   held in the columns the service serves from (the token index and the packed gate words,
   server/token_index.pyx), so the allowed sets come from the very check EligibilityService
   answers with (server.gate_snapshot.allowed_slots). The real publisher
   (server.gate_snapshot.GatePublisher) writes the signed snapshots and deltas; the real
   gate library (clients/gate.py) verifies and queries them.

   * ``snapshot_bytes`` per scenario, ``bits_per_card`` (snapshot bits over allowed cards),
     ``levels``, ``snapshot_build_s``;
   * ``verify_ms``: a gate's load of the metro snapshot (signature, SHA-256 of each part, the
     filters);
   * ``enrolled_errors``: every enrolled card of every scenario, gate vs the check (must be 0);
   * ``false_allow_rate``: ``--unknown`` (10 million) random never-enrolled tokens;
   * ``gate_check_ns``: one token through ``Gate.check_local`` from Python;
     ``gate_batch_ns_per_token``: a batch of 1 million through ``allows_many``;
   * ``delta_bytes_per_hour`` at ``--churn-per-hour`` (the share of cards whose state
     changes in an hour, a tenth of them new cards), 12 deltas of 5 minutes through the
     publisher, and the gate applies them and still agrees with the check on every card.

2. **A real server** (``qjscore serve`` on loopback, ``--server-citizens`` seeded, its
   publisher at ``--propagation-interval`` seconds):

   * ``propagation_p99_s``: from a write's acknowledgement (a revoked consent) to the gate's
     local answer changing, the gate syncing every ``--sync-interval``: bounded by the delta
     interval plus the sync interval (at the default 300 s, about 300 s + the gate's sync);
   * the link cut: the gate is online, its link is cut for ``--cut-seconds`` (600) while
     scans arrive at ``--scan-rate`` a second and the city keeps changing (consents revoked
     and granted every second); every scan must be answered and equal the online service's
     answer at the list's time; when the link is back the kept decisions are uploaded
     (``cut_*``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

METRO = "metro_pay_later"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- part 1: the list at city scale ------------------------------------------------------------


def synthetic_city(n: int, seed: int, spare: int):
    """A serving state's checking columns for a synthetic city of n (room for ``spare`` more
    cards): SimpleNamespace(tokens, gate, subject, position, as_of_day, columns to churn)."""
    from kernel.calibration import RawHistogram
    from kernel.columns import ScoreColumns
    from kernel.score import Scorer
    from kernel.spec import load_spec
    from kernel.synthetic import generate_features
    from server.token_index import TokenIndex, pack_gate

    spec = load_spec()
    log(f"generating {n:,} citizens ...")
    people, features = generate_features(spec, n, seed=seed)
    adult = people.adult
    del people
    log("scoring ...")
    raw = Scorer(spec).score(features, adult).raw
    hist = RawHistogram.empty(spec)
    hist.add(raw[adult == 1])
    del raw
    calibration = hist.freeze()
    cols = ScoreColumns.empty(n)
    Scorer(spec, calibration).score(features, adult, out=cols, n_threads=2)
    del features
    rng = np.random.default_rng(seed)
    cap = n + spare
    score = np.zeros(cap, np.int16)
    score[:n] = cols.score
    flags = np.zeros(cap, np.uint8)
    flags[:n] = cols.flags
    del cols
    adult_c = np.zeros(cap, np.uint8)
    adult_c[:n] = adult
    consent = (rng.random(cap) < 0.85).astype(np.uint8)
    consent_except = np.where(rng.random(cap) < 0.03, rng.integers(0, 1 << 16, cap), 0).astype(np.uint32)
    defaults = np.where(rng.random(cap) < 0.01, rng.integers(0, 1 << 4, cap), 0).astype(np.uint32)
    log("tokens and index ...")
    tokens = rng.integers(0, 256, (cap, 16), dtype=np.uint8)
    index = TokenIndex.allocate(cap)
    index.insert_many(tokens[:n], np.arange(n, dtype=np.int32))
    gate = pack_gate(adult_c, consent, score, flags, defaults, consent_except=consent_except)
    subject = rng.integers(1, 2**63, cap, dtype=np.uint64)
    return SimpleNamespace(tokens=index, gate=gate, subject=subject, position=1, as_of_day=20_800, n=n,
                           all_tokens=tokens, adult=adult_c, consent=consent, score=score, flags=flags, defaults=defaults,
                           consent_except=consent_except, model_version=spec.model_version,
                           calibration_version=calibration.calibration_version)


def _truth(state, scenario, tokens: bytes) -> np.ndarray:
    from server.scenarios import Outcome
    from server.token_index import Checker

    outcomes, _, _ = Checker(state.tokens, state.gate, state.subject).check(tokens, *scenario.rule,
                                                                             consent_bit=scenario.consent_bit)
    return outcomes == Outcome.ALLOW


def _errors(lst, state, scenario, n: int) -> int:
    bad = 0
    for lo in range(0, n, 1 << 20):
        chunk = state.all_tokens[lo:min(n, lo + (1 << 20))].tobytes()
        bad += int(np.count_nonzero(lst.allows_many(chunk).astype(bool) != _truth(state, scenario, chunk)))
    return bad


def _load(gate, folder: Path, name: str):
    """The gate's load of the scenario's current snapshot from the publisher's files."""
    import json as _json

    from server.gate_snapshot import _read_signed, read_current

    current = read_current(folder, name)
    body, signature = _read_signed(folder / name / f"snapshot-{current['snapshot']}.json")
    data = (folder / name / f"snapshot-{current['snapshot']}.bin").read_bytes()
    parts, offset = {}, 0
    for spec in _json.loads(body)["parts"]:
        parts[spec["name"]] = data[offset:offset + spec["size"]]
        offset += spec["size"]
    t0 = time.perf_counter()
    gate.load_snapshot(name, body, signature, parts)
    return (time.perf_counter() - t0) * 1000


def city_part(args, out: dict) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from clients.gate import Gate
    from server.gate_snapshot import GatePublisher, _read_signed
    from server.scenarios import load_scenarios
    from server.token_index import pack_gate

    n = args.citizens
    spare = max(16, int(n * args.churn_per_hour * 0.1) + 16)
    t0 = time.perf_counter()
    state = synthetic_city(n, args.seed, spare)
    out["city_s"] = round(time.perf_counter() - t0, 1)
    scenarios = {k: v for k, v in load_scenarios().items() if v.pay_later}
    key = Ed25519PrivateKey.generate()
    clock = SimpleNamespace(t=time.time())
    folder = Path(tempfile.mkdtemp(prefix="qj-gate-bench-"))
    publisher = GatePublisher(folder, scenarios, key, lambda: (state, state.model_version, state.calibration_version),
                              clock=lambda: clock.t)
    log("snapshots ...")
    t0 = time.perf_counter()
    published = publisher.publish()
    out["snapshot_build_s"] = round(time.perf_counter() - t0, 2)
    out["snapshot_bytes"] = {k: v["snapshot_bytes"] for k, v in published.items()}
    out["allowed_cards"] = {k: v["allowed"] for k, v in published.items()}
    out["levels"] = {k: v["levels"] for k, v in published.items()}
    out["bits_per_card"] = {k: round(v["snapshot_bytes"] * 8 / max(v["allowed"], 1), 3) for k, v in published.items()}
    gate = Gate(key.public_key(), list(scenarios), clock=lambda: clock.t)
    verify = {name: _load(gate, publisher.dir, name) for name in scenarios}
    out["verify_ms"] = round(verify[METRO], 1)
    out["verify_ms_by_scenario"] = {k: round(v, 1) for k, v in verify.items()}
    log("every enrolled card, every scenario ...")
    out["enrolled_errors"] = sum(_errors(gate.lists[name], state, sc, n) for name, sc in scenarios.items())
    lst = gate.lists[METRO]
    log(f"{args.unknown:,} unknown tokens ...")
    rng = np.random.default_rng(args.seed + 1)
    false_allows = measured = 0
    for lo in range(0, args.unknown, 1 << 20):
        m = min(1 << 20, args.unknown - lo)
        unknown = rng.integers(0, 256, (m, 16), dtype=np.uint8).tobytes()
        fresh = state.tokens.lookup_batch(unknown) < 0  # never enrolled (all of them, but for a 2**-96 chance)
        false_allows += int(np.count_nonzero(lst.allows_many(unknown).astype(bool) & fresh))
        measured += int(np.count_nonzero(fresh))
    out["false_allow_rate"] = false_allows / measured
    out["false_allows"] = false_allows
    out["unknown_tokens"] = measured
    log("timings ...")
    sample = [state.all_tokens[i].tobytes() for i in rng.integers(0, n, 200_000)]
    check = gate.check_local
    t0 = time.perf_counter_ns()
    for tok in sample:
        check(METRO, tok)
    out["gate_check_ns"] = round((time.perf_counter_ns() - t0) / len(sample))
    batch = state.all_tokens[rng.integers(0, n, 1 << 20)].tobytes()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        lst.allows_many(batch)
        best = min(best, time.perf_counter_ns() - t0)
    out["gate_batch_ns_per_token"] = round(best / (1 << 20), 1)

    log(f"churn: 12 deltas of 5 minutes at {args.churn_per_hour:.2%} of the cards an hour ...")
    metro = scenarios[METRO]
    publisher.scenarios = {METRO: metro}
    per_delta = max(1, int(n * args.churn_per_hour / 12))
    new_rows = iter(range(n, n + spare))
    delta_bytes = changed = 0
    for _ in range(12):
        rows = rng.integers(0, n, per_delta - per_delta // 10)
        # revoke or grant this scenario's consent (flip its exception bit), a new serious record
        # or a default here and there: what changes answers
        state.consent_except[rows] ^= np.uint32(1 << metro.consent_bit)
        hit = rows[: len(rows) // 5]
        state.flags[hit] ^= np.uint8(1)
        for _ in range(per_delta // 10):  # new cards of new citizens
            row = next(new_rows, None)
            if row is None:
                break
            state.tokens.insert(state.all_tokens[row].tobytes(), row)
            state.n = max(state.n, row + 1)
        sel = np.unique(np.concatenate([rows, np.arange(n, state.n)]))
        state.gate[sel] = pack_gate(state.adult[sel], state.consent[sel], state.score[sel], state.flags[sel],
                                    state.defaults[sel], consent_except=state.consent_except[sel])
        state.position += 1
        clock.t += 300
        result = publisher.publish()[METRO]
        delta_bytes += result["delta_bytes"]
        changed += result["removed"] + result["added"]
        body, signature = _read_signed(publisher.dir / METRO / f"delta-{result['sequence']}.bin")
        gate.apply_delta(METRO, body, signature)
    out["churn_per_hour"] = args.churn_per_hour
    out["delta_bytes_per_hour"] = delta_bytes
    out["delta_changes_per_hour"] = changed
    out["delta_publish_s"] = round(result["seconds"], 2)
    out["enrolled_errors_after_deltas"] = _errors(gate.lists[METRO], state, metro, state.n)
    out["enrolled_errors"] += out["enrolled_errors_after_deltas"]
    shutil.rmtree(folder, ignore_errors=True)


# --- part 2: a real server ------------------------------------------------------------------------


def server_part(args, out: dict) -> None:
    from clients.client import QianjiangClient
    from clients.gate import Gate
    from loadtest.scale import Serve
    from server.app import citizen_id
    from server.gate_snapshot import key_paths
    from server.keys import card_token, existing_card_key, synthetic_card_number

    data = Path(tempfile.mkdtemp(prefix="qj-gate-bench-server-"))
    logs = data / "serve.log"
    server = Serve(data, logs, "--seed-citizens", str(args.server_citizens),
                   "--gate-delta-interval", str(args.propagation_interval))
    try:
        server.wait(time.monotonic(), timeout=600)
        client = server.client
        key = existing_card_key(data)
        tokens = [card_token(key, synthetic_card_number(r)) for r in range(args.server_citizens)]
        packed = b"".join(tokens)

        def online():
            got = []
            for lo in range(0, len(packed), 16 * 50_000):
                got.append(np.frombuffer(client.check_batch(METRO, packed[lo:lo + 16 * 50_000]).outcomes, np.uint8) == 1)
            return np.concatenate(got)

        public = key_paths(data)[1]
        gate = Gate(public, [METRO], client=client, gate_id="bench-1", online=True)
        while True:
            try:
                gate.sync()
                break
            except Exception:  # noqa: BLE001 - the first list is published just after SERVING
                time.sleep(0.2)
        stop = threading.Event()

        def syncing():
            while not stop.wait(args.sync_interval):
                try:
                    gate.sync()
                except Exception:  # noqa: BLE001 - the link is cut below on purpose
                    pass

        syncer = threading.Thread(target=syncing, daemon=True)
        syncer.start()
        log(f"propagation: {args.writes} revoked consents ...")
        allowed = np.flatnonzero(online())
        rng = np.random.default_rng(args.seed)
        chosen = rng.choice(allowed, args.writes, replace=False)
        delays = []
        for row in chosen:
            time.sleep(float(rng.uniform(0, args.propagation_interval)))
            client.revoke_consent(citizen_id(int(row)), purposes=[METRO])
            t0 = time.monotonic()
            while gate.check_local(METRO, tokens[row]):
                time.sleep(0.01)
                if time.monotonic() - t0 > 10 * args.propagation_interval + 60:
                    raise RuntimeError("a revoked consent never reached the gate")
            delays.append(time.monotonic() - t0)
        out["propagation_p99_s"] = round(float(np.percentile(delays, 99)), 2)
        out["propagation_p50_s"] = round(float(np.percentile(delays, 50)), 2)
        out["propagation_writes"] = len(delays)
        out["propagation_delta_interval_s"] = args.propagation_interval
        out["propagation_sync_interval_s"] = args.sync_interval
        for row in chosen:  # back as they were
            client.grant_consent(citizen_id(int(row)), purposes=[METRO])

        log(f"link cut: {args.cut_seconds:.0f} s at {args.scan_rate:.0f} scans a second ...")
        stop.set()
        syncer.join()
        # a list made after every write so far: wait for two more deltas, then sync
        from qianjiang.v1 import gate_pb2

        def latest():
            return gate._stub.GetManifest(gate_pb2.GetManifestRequest(scenario=METRO)).latest_sequence

        target = latest() + 2
        while latest() < target:
            time.sleep(0.2)
        gate.sync()
        at_list_time = online()  # what the service says at the list's time (nothing written since)
        dead = QianjiangClient("127.0.0.1:1", timeout=0.2)
        live, gate.client = gate.client, dead
        gate.link_up = False  # the cut: a scan's call would fail at once anyway (UNAVAILABLE)
        scans = answered = mismatches = 0
        t_end = time.monotonic() + args.cut_seconds
        next_write = time.monotonic()
        period = 1.0 / args.scan_rate
        next_scan = time.monotonic()
        flip = rng.choice(len(tokens), max(1, int(args.cut_seconds)), replace=True)
        w = 0
        while time.monotonic() < t_end:
            now = time.monotonic()
            if now >= next_write and w < len(flip):  # the city changes meanwhile: a consent a second
                cid = citizen_id(int(flip[w]))
                (client.revoke_consent if w % 2 == 0 else client.grant_consent)(cid, purposes=[METRO])
                w += 1
                next_write = now + 1.0
            row = int(rng.integers(0, len(tokens)))
            answer = gate.check(METRO, tokens[row])  # never raises: every scan is answered
            scans += 1
            answered += answer in (True, False)
            mismatches += answer != bool(at_list_time[row])
            next_scan += period
            pause = next_scan - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        gate.client = live
        dead.close()
        t0 = time.monotonic()
        uploaded = gate.upload()
        out.update(cut_seconds=args.cut_seconds, cut_scans=scans, cut_answered=answered, cut_mismatches=mismatches,
                   cut_writes_meanwhile=w, cut_uploaded=uploaded, cut_pending_after=len(gate.pending),
                   cut_upload_s=round(time.monotonic() - t0, 2), cut_link_up_after=gate.link_up)
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest.gate_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--citizens", type=int, default=1_000_000)
    ap.add_argument("--unknown", type=int, default=10_000_000, help="never-enrolled tokens for the false-allow rate")
    ap.add_argument("--churn-per-hour", type=float, default=0.002,
                    help="share of the cards whose answer may change in an hour (a tenth of them new cards)")
    ap.add_argument("--server-citizens", type=int, default=20_000)
    ap.add_argument("--propagation-interval", type=float, default=5.0, help="the real server's --gate-delta-interval")
    ap.add_argument("--sync-interval", type=float, default=0.5, help="how often the gate syncs")
    ap.add_argument("--writes", type=int, default=20)
    ap.add_argument("--cut-seconds", type=float, default=600.0)
    ap.add_argument("--scan-rate", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=2018)
    ap.add_argument("--skip-server", action="store_true", help="part 1 only")
    args = ap.parse_args(argv)
    out: dict = {"citizens": args.citizens}
    city_part(args, out)
    if not args.skip_server:
        server_part(args, out)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
