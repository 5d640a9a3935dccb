"""Seeding a store with a synthetic city: development only (``qjscore serve --seed-citizens N``).

    >>> seeded = seed_store(store, spec, 100_000, seed=2018, keys=keys)   # doctest: +SKIP
    >>> seeded.citizens, seeded.records                                    # doctest: +SKIP
    (100000, 1172513)

The city is :func:`kernel.synthetic.generate_city`'s for the same ``n``, ``seed`` and chunk
size (the same people and records, so the README's numbers hold), but it is never whole in
memory: it is generated one chunk of people at a time (``chunk_size``, 250,000 by default;
another size is another city), and each chunk is handed to the store's bulk load
(:meth:`server.store.Store.bulk_load`) in slices of at most ``records_per_write`` records,
then dropped. The load encodes the next slice (and generates the next chunk) on a helper
thread while the store writes this one, so the generator's numpy work and the database's
work overlap on two cores. Memory is bounded by a few slices and the store's page cache,
whatever ``n``.

What is written, for citizen row ``i`` (``citizen_id(i)``, ``c00000000`` …):

* its birth day: as of ``as_of`` (today, the city's day, by default), the person's age in
  years times 365 plus a uniform 0..364 days drawn for everyone from ``default_rng(seed)``;
* one card token, ``card_token(keys.card, synthetic_card_number(i))`` (server/keys.py);
* consent granted with probability ``authorised_share`` (the next draws of that generator),
  one grant in the consent history each;
* the person's records, ``syn-{seed}-{k}`` for the city's ``k``-th record, sent by their
  variable's source (version 1 each).

All of it is one transaction with one change in the log: a seed that fails or is killed
half-way leaves the store as empty as it was (SQLite rolls the journal back at the next open;
PostgreSQL drops the transaction), so a server never serves half a city. The next
``--seed-citizens`` start seeds it again from the beginning.

Progress: a bar on a terminal (tqdm), log lines otherwise.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kernel.spec import ModelSpec
from kernel.synthetic import CITIZEN_ID_FORMAT, DEFAULT_CHUNK, _chunk, _chunks
from server.keys import Keys, synthetic_card_number
from server.store import TOKEN_BYTES, LoadChunk, Store

log = logging.getLogger(__name__)

#: Records per slice handed to the store (about 40 MB of encoded data for SQLite).
RECORDS_PER_WRITE = 500_000

#: At most one progress log line this often (seconds), without a terminal.
LOG_EVERY_S = 10.0


def citizen_id(row: int) -> str:
    """The synthetic city's id of citizen row ``row``: ``c00000000`` …"""
    return CITIZEN_ID_FORMAT.format(row)


@dataclass(frozen=True)
class Seeded:
    citizens: int
    records: int
    seconds: float


def synthetic_card_tokens(key: bytes, first_row: int, n: int) -> np.ndarray:
    """The card tokens of rows ``first_row .. first_row + n - 1`` (uint8, shape (n, 16)):
    exactly ``server.keys.card_token(key, synthetic_card_number(row))``, with the HMAC's key
    schedule computed once instead of once per token."""
    block = 64  # SHA-256's block size (RFC 2104)
    if len(key) > block:
        key = hashlib.sha256(key).digest()
    key = key.ljust(block, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    inner.update(b"card:")
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    out = bytearray(n * TOKEN_BYTES)
    for k in range(n):
        h = inner.copy()
        h.update(synthetic_card_number(first_row + k).encode())
        o = outer.copy()
        o.update(h.digest())
        out[k * TOKEN_BYTES:(k + 1) * TOKEN_BYTES] = o.digest()[:TOKEN_BYTES]
    return np.frombuffer(bytes(out), np.uint8).reshape(n, TOKEN_BYTES)


def city_chunks(
    spec: ModelSpec, n: int, seed: int, card_key: bytes, as_of: int, authorised_share: float = 0.85,
    chunk_size: int = DEFAULT_CHUNK, records_per_write: int = RECORDS_PER_WRITE,
) -> Iterator[LoadChunk]:
    """The synthetic city as :class:`LoadChunk` s, lazily: a chunk of people, their cards and
    the first slice of their records, then the rest of their records in slices."""
    if records_per_write < 1:
        raise ValueError(f"records_per_write: must be >= 1, got {records_per_write}")
    rng = np.random.default_rng(seed)
    # The birth-day jitter is one draw for everyone (an integer draw split in parts would
    # not give the same numbers); the consent draws come after it, taken chunk by chunk
    # (doubles are drawn one by one, so the parts give exactly the numbers of one draw).
    jitter = rng.integers(0, 365, n).astype(np.int16)
    names = [v.name for v in spec.variables]
    sources = sorted({v.source for v in spec.variables})
    source_of = np.array([sources.index(v.source) for v in spec.variables], np.intp)
    first_record = 0
    for start, size, chunk_rng in _chunks(n, seed, chunk_size):
        people, records = _chunk(spec, chunk_rng, start, size, as_of)
        birth_days = as_of - (people.age.astype(np.int64) * 365 + jitter[start:start + size])
        consent = rng.random(size) < authorised_share
        rows = np.arange(start, start + size, dtype=np.int64)
        m = len(records)
        for lo in range(0, max(m, 1), records_per_write):
            part = slice(lo, min(lo + records_per_write, m))
            head = lo == 0
            variable = records.variable[part].astype(np.intp)
            yield LoadChunk(
                citizen_ids=[citizen_id(int(i)) for i in rows] if head else (),
                birth_days=birth_days if head else (),
                consent=consent if head else None,
                card_tokens=synthetic_card_tokens(card_key, start, size) if head else None,
                card_rows=rows if head else (),
                record_rows=records.citizen[part], record_variables=variable, record_days=records.day[part],
                record_values=records.value[part], record_sources=source_of[variable],
                variables=names, sources=sources, record_id_prefix=f"syn-{seed}-", record_id_first=first_record + lo,
            )
        first_record += m


def seed_store(
    store: Store, spec: ModelSpec, n: int, seed: int, keys: Keys, authorised_share: float = 0.85,
    as_of: int | None = None, chunk_size: int = DEFAULT_CHUNK, records_per_write: int = RECORDS_PER_WRITE,
    progress: bool | None = None,
) -> Seeded:
    """Write a synthetic city of ``n`` people (as of ``as_of``, a day number; today by
    default) into an EMPTY store (:class:`server.store.Conflict` otherwise), streamed in
    chunks, in one transaction (see the module's docstring). ``progress``: a bar (None: when
    stderr is a terminal)."""
    from tqdm import tqdm

    from server.city_time import today

    t0 = time.perf_counter()
    as_of = today() if as_of is None else int(as_of)
    show = sys.stderr.isatty() if progress is None else progress
    log.info("seeding %s with a synthetic city of %d people (development: --seed-citizens): generating it "
             "in chunks of %d people and writing each as it comes", store.name, n, chunk_size)
    if n <= 0:
        log.info("seeded 0 citizens: nothing to do")
        return Seeded(0, 0, 0.0)
    log.info("seeding: writing %d citizens, their cards and consents, and their records, in one transaction "
             "(an interrupted seed leaves the store empty)", n)
    # People count as written with all their records: those of a chunk when the next chunk's
    # first slice (its people) is written, or the load's last slice.
    done = {"citizens": 0, "records": 0, "pending": 0}
    last_log = [time.monotonic()]

    with tqdm(total=n, unit="people", unit_scale=True, desc="seeding", disable=not show) as bar:

        def people_done(k: int) -> None:
            done["citizens"] += k
            bar.update(k)

        def written(chunk: LoadChunk) -> None:
            if chunk.citizen_ids:
                people_done(done["pending"])
                done["pending"] = len(chunk.citizen_ids)
            done["records"] += len(chunk.record_rows)
            bar.set_postfix(records=f"{done['records']:,}", refresh=False)
            if not show and time.monotonic() - last_log[0] >= LOG_EVERY_S:
                last_log[0] = time.monotonic()
                log.info("seeding: %d of %d people and %d records written (%.0f s)", done["citizens"], n,
                         done["records"], time.perf_counter() - t0)

        with store.bulk_load() as load:
            load.add_all(city_chunks(spec, n, seed, keys.card, as_of, authorised_share, chunk_size,
                                     records_per_write), written)
            people_done(done["pending"])
            log.info("seeding: %d of %d people and %d records written (%.0f s); building the indexes and committing",
                     done["citizens"], n, done["records"], time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    log.info("seeded %d citizens and %d records in %.1f s (%.0f records/s)", n, done["records"], seconds,
             done["records"] / seconds if seconds else 0.0)
    return Seeded(n, done["records"], seconds)
