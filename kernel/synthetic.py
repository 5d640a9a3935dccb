"""A deterministic synthetic city: people, their records, and their feature matrix.

    >>> from kernel.spec import load_spec
    >>> spec = load_spec()
    >>> city = generate_city(spec, 1000, seed=7)
    >>> len(city.people), bool((city.people.age < 18).any())
    (1000, True)

The same ``(n, seed, chunk_size)`` always gives the same city. People are drawn in chunks
(each chunk from its own spawned seed), so a city of 12.5 million never holds all its
records at once: :func:`generate_features` aggregates each chunk's records straight into the
feature matrix (the vectorised path for large benchmarks), and gives exactly the matrix that
:func:`kernel.features.build_features` builds from :func:`generate_city`'s records.

Shapes, loosely after Hangzhou's 2018 statistics: an age pyramid with about 16 % minors (who
must get no score); residents and daily commuters, with and without local hukou (hukou type
never reaches the model); behaviour driven by a latent reliability trait, so negative records
cluster in few people and counts are skewed; serious records (court-listed debtors,
blacklists, crimes) in well under 1 % of adults. Protected attributes (sex, ethnicity, hukou
type, district, living outside the city and commuting in) are generated for fairness audits
only, and age bands are derived from the age (:func:`protected_attributes`, read by
kernel/fairness.py): none of them is ever a model input, and the latent behaviour traits are
drawn independently of all of them.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, fields

import numpy as np

from kernel.features import Records, build_features
from kernel.spec import ModelSpec

#: The scoring date of the synthetic city (the seed's launch day).
AS_OF = _dt.date(2018, 11, 16)
AS_OF_DAY = (AS_OF - _dt.date(1970, 1, 1)).days

DEFAULT_CHUNK = 250_000

# Age pyramid: (lowest age, highest age, share). About 16 % are minors.
AGE_BANDS = ((0, 5, 0.05), (6, 17, 0.11), (18, 29, 0.20), (30, 44, 0.25), (45, 59, 0.22), (60, 79, 0.14), (80, 95, 0.03))
DISTRICTS = ("shangcheng", "gongshu", "xihu", "binjiang", "xiaoshan", "yuhang", "linping", "qiantang", "fuyang", "linan")

#: Age bands of the fairness audit: (label, lowest age, highest age or None). Adults only:
#: minors get no score.
AUDIT_AGE_BANDS = (("18-24", 18, 24), ("25-34", 25, 34), ("35-59", 35, 59), ("60+", 60, None))


@dataclass
class People:
    """One row per person. ``sex``, ``ethnic_minority`` and ``hukou_local`` are protected:
    kept for fairness audits, never model inputs."""

    age: np.ndarray  # int16
    commuter: np.ndarray  # bool: works in the city, lives outside it
    district: np.ndarray  # int8 index into DISTRICTS
    sex: np.ndarray  # int8: 0 female, 1 male (protected)
    ethnic_minority: np.ndarray  # bool (protected)
    hukou_local: np.ndarray  # bool (protected)

    def __len__(self) -> int:
        return len(self.age)

    @property
    def adult(self) -> np.ndarray:
        return (self.age >= 18).astype(np.uint8)

    @staticmethod
    def concat(parts: list["People"]) -> "People":
        return People(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(People)))


def age_band(age) -> np.ndarray:
    """Index into :data:`AUDIT_AGE_BANDS` of each age in whole years (-1: a minor). The age is
    the one the service derives from the birth date on the scoring day (server/state.py).

        >>> age_band(np.array([17, 18, 24, 25, 59, 60, 95])).tolist()
        [-1, 0, 0, 1, 2, 3, 3]
    """
    age = np.asarray(age)
    lows = np.array([lo for _, lo, _ in AUDIT_AGE_BANDS])
    return np.where(age >= lows[0], np.searchsorted(lows, age, side="right") - 1, -1).astype(np.int8)


#: The protected attributes of the fairness audit, in report order: name -> group labels.
PROTECTED = {
    "sex": ("female", "male"),
    "ethnicity": ("Han", "minority"),
    "hukou": ("non-local", "local"),
    "age_band": tuple(label for label, _, _ in AUDIT_AGE_BANDS),
    "district": DISTRICTS,
    "commuter": ("resident", "commuter"),  # commuter: lives outside the city, works in it
}


def protected_attributes(people: "People") -> dict[str, np.ndarray]:
    """Each person's group (an index into :data:`PROTECTED`'s labels) per protected attribute.
    For fairness audits only: never a model input (kernel/spec.py refuses a variable named
    after one)."""
    return {
        "sex": people.sex.astype(np.int8),
        "ethnicity": people.ethnic_minority.astype(np.int8),
        "hukou": people.hukou_local.astype(np.int8),
        "age_band": age_band(people.age),
        "district": people.district.astype(np.int8),
        "commuter": people.commuter.astype(np.int8),
    }


@dataclass
class City:
    people: People
    records: Records
    as_of_day: int = AS_OF_DAY


# --- behaviour of each variable -------------------------------------------------------
# Each entry draws the records of one model variable for a chunk of people. A variable that
# a future spec adds and that the generator does not know simply gets no records.


def _events(rng, n, rate_per_year, years, value=None):
    """Poisson event counts over the last ``years`` and uniform ages: (person, age_days, value)."""
    counts = rng.poisson(rate_per_year * years)
    person = np.repeat(np.arange(n), counts)
    age = rng.integers(0, int(years * 365), size=len(person))
    vals = np.ones(len(person), np.float32) if value is None else value(len(person)).astype(np.float32)
    return person, age, vals


def _snapshot(mask, values):
    person = np.flatnonzero(mask)
    return person, np.zeros(len(person), np.int64), values[mask].astype(np.float32)


def _behaviours(rng, p, trait):
    """Records per variable name for one chunk: {name: (person, age_days, value)}."""
    n = len(p.age)
    adult = p.age >= 18
    working = adult & (p.age < 63)
    # Skewed: a few people carry most negatives. E[risk] = 1.5, E[risk**2] = 5.1 and
    # E[risk**3] = 38, which the rates below divide out: about 0.5 % of adults are active
    # court-listed debtors, 0.3 % blacklisted, 0.2 % convicted in the last three years.
    risk = np.exp(-0.9 * trait["reliability"])
    civic = np.exp(0.8 * trait["civic"])
    credit = trait["credit"] > -0.6  # has a loan or credit card
    years_adult = np.clip(p.age - 18, 0, None)
    b = {}
    residence = np.where(p.commuter, rng.gamma(1.5, 2.0, n), np.minimum(p.age, rng.gamma(2.0, 6.0, n) + 2 * p.hukou_local))
    b["residence_years"] = _snapshot(adult, np.round(residence, 1))
    si = np.minimum(12 * np.clip(p.age - 22, 0, None), rng.gamma(2.0, 40.0, n)).round()
    b["social_insurance_months"] = _snapshot(working & (rng.random(n) < 0.85), si)
    b["identity_verified"] = _snapshot(adult & (rng.random(n) < 0.9), np.ones(n))
    b["traffic_violations"] = _events(rng, n, np.where(adult, 0.35 * risk, 0), 0.5)
    b["administrative_penalties"] = _events(rng, n, np.where(adult, 0.01 * risk**2, 0), 2.0)
    b["tax_arrears"] = _events(rng, n, np.where(working, 0.005 * risk**2, 0), 2.0)
    b["criminal_convictions"] = _events(rng, n, np.where(adult, 1.75e-5 * risk**3, 0), 5.0)
    b["court_listed_dishonest_debtor"] = _events(rng, n, np.where(adult, 4.4e-5 * risk**3, 0), 5.0)
    b["blacklist_entries"] = _events(rng, n, np.where(adult, 4e-5 * risk**3, 0), 4.0)
    b["provident_fund_loan_overdue"] = _events(rng, n, np.where(working & credit, 0.015 * risk**2, 0), 2.0)
    b["welfare_fraud"] = _events(rng, n, np.where(adult, 1.3e-5 * risk**3, 0), 4.0)
    b["utility_arrears_serious"] = _events(rng, n, np.where(adult, 0.012 * risk**2, 0), 2.0)
    b["transit_fare_defaults"] = _events(rng, n, np.where(adult, 0.2 * risk, 0), 0.5)
    b["public_service_no_shows"] = _events(rng, n, np.where(adult, 0.4 * risk, 0), 0.5)
    # yearly statements of months paid on time, for the last two years
    pays_bills = adult & (rng.random(n) < 0.75)
    b["utility_on_time_months"] = _events(
        rng, n, np.where(pays_bills, 1.0, 0), 2.0, lambda k: np.clip(12 - rng.poisson(0.4, k), 0, 12)
    )
    pf = np.minimum(12 * np.clip(p.age - 22, 0, None), rng.gamma(2.0, 30.0, n)).round()
    b["provident_fund_months"] = _snapshot(working & (rng.random(n) < 0.65), pf)
    b["loan_overdue_90d"] = _events(rng, n, np.where(adult & credit, 0.012 * risk**2, 0), 2.0)
    b["rental_contract_breaches"] = _events(rng, n, np.where(adult, 0.006 * risk**2, 0), 2.0)
    b["contract_judgments_lost"] = _events(rng, n, np.where(adult, 0.004 * risk**2, 0), 2.0)
    b["on_time_repayments"] = _events(
        rng, n, np.where(adult & credit, 1.0, 0), 2.0, lambda k: np.clip(12 - rng.poisson(0.3, k), 0, 12)
    )
    b["credit_history_months"] = _snapshot(adult & credit, np.minimum(12 * years_adult, rng.gamma(2.0, 36.0, n)).round())
    b["volunteer_hours"] = _events(rng, n, np.where(adult, 0.8 * civic, 0), 3.0, lambda k: rng.gamma(1.5, 3.0, k).round(1))
    b["blood_donations"] = _events(rng, n, np.where(adult & (p.age <= 60), 0.12 * civic, 0), 3.0)
    b["charity_donations"] = _events(rng, n, np.where(adult, 0.5 * civic, 0), 3.0)
    b["honours"] = _events(rng, n, np.where(adult, 0.0012 * civic**3, 0), 5.0)
    return b


def _people(rng, n) -> tuple[People, dict]:
    lo = np.array([a for a, _, _ in AGE_BANDS])
    hi = np.array([b for _, b, _ in AGE_BANDS])
    share = np.array([s for _, _, s in AGE_BANDS])
    band = rng.choice(len(AGE_BANDS), size=n, p=share / share.sum())
    age = rng.integers(lo[band], hi[band] + 1).astype(np.int16)
    commuter = (age >= 18) & (rng.random(n) < 0.12)
    hukou_local = ~commuter & (rng.random(n) < 0.55)
    people = People(
        age=age,
        commuter=commuter,
        district=rng.integers(0, len(DISTRICTS), n).astype(np.int8),
        sex=rng.integers(0, 2, n).astype(np.int8),
        ethnic_minority=rng.random(n) < 0.02,
        hukou_local=hukou_local,
    )
    # Latent traits: independent of every protected attribute by construction.
    reliability = rng.standard_normal(n)
    trait = {
        "reliability": reliability,
        "civic": 0.4 * reliability + np.sqrt(1 - 0.16) * rng.standard_normal(n),
        "credit": rng.standard_normal(n),
    }
    return people, trait


def _chunks(n: int, seed: int, chunk_size: int):
    if n < 0:
        raise ValueError(f"n: must be >= 0, got {n}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    n_chunks = max(1, -(-n // chunk_size))
    seeds = np.random.SeedSequence(seed).spawn(n_chunks)
    for k, ss in enumerate(seeds):
        start = k * chunk_size
        yield start, min(chunk_size, n - start), np.random.default_rng(ss)


def _chunk(spec: ModelSpec, rng, start: int, size: int, as_of_day: int) -> tuple[People, Records]:
    people, trait = _people(rng, size)
    parts = []
    for name, (person, age, value) in _behaviours(rng, people, trait).items():
        try:
            var = spec.variable_index(name)
        except KeyError:
            continue  # this spec does not score the behaviour
        parts.append(Records.from_arrays(start + person, np.full(len(person), var), as_of_day - age, value))
    return people, Records.concat(parts)


def _progress(total: int, show: bool | None):
    from tqdm import tqdm

    return tqdm(total=total, unit="people", unit_scale=True, disable=not (show if show is not None else total >= 2_000_000))


def generate_city(
    spec: ModelSpec, n: int, seed: int = 2018, chunk_size: int = DEFAULT_CHUNK, progress: bool | None = None,
    as_of_day: int = AS_OF_DAY,
) -> City:
    """People and all their records (for the store and tests; use generate_features for
    benchmark-size populations). Records are dated up to ``as_of_day`` (the seed's launch
    day by default; the service seeds its store as of today)."""
    people, records = [], []
    with _progress(n, progress) as bar:
        for start, size, rng in _chunks(n, seed, chunk_size):
            p, r = _chunk(spec, rng, start, size, as_of_day)
            people.append(p)
            records.append(r)
            bar.update(size)
    return City(People.concat(people), Records.concat(records), as_of_day)


def generate_features(
    spec: ModelSpec, n: int, seed: int = 2018, chunk_size: int = DEFAULT_CHUNK,
    dtype=np.float32, progress: bool | None = None,
) -> tuple[People, np.ndarray]:
    """People and their feature matrix, chunk by chunk, without keeping records."""
    features = np.empty((n, len(spec.variables)), dtype)
    people = []
    with _progress(n, progress) as bar:
        for start, size, rng in _chunks(n, seed, chunk_size):
            people.append(_chunk_features(spec, rng, start, size, out=features[start : start + size]))
            bar.update(size)
    return People.concat(people), features


def _chunk_features(spec: ModelSpec, rng, start: int, size: int, out: np.ndarray) -> People:
    p, r = _chunk(spec, rng, start, size, AS_OF_DAY)
    r.citizen -= start
    build_features(spec, r, size, AS_OF_DAY, out=out)
    return p


#: The synthetic city's citizen ids: row 0 is ``c00000000`` (server/seed.py seeds them).
CITIZEN_ID_FORMAT = "c{:08d}"


def citizen_ids(start: int, n: int) -> np.ndarray:
    """Ids of rows ``start .. start + n - 1`` as an ``S`` array (:data:`CITIZEN_ID_FORMAT`)."""
    return np.strings.add(b"c", np.strings.zfill(np.arange(start, start + n).astype("S"), 8))


def generate_partitions(
    spec: ModelSpec, n: int, out, partitions: int, seed: int = 2018, chunk_size: int = DEFAULT_CHUNK,
    progress: bool | None = None, overwrite: bool = False,
) -> dict:
    """Write the city of :func:`generate_features` (the same people, the same features, as
    of :data:`AS_OF`) straight into a population directory of ``partitions`` Parquet parts
    (kernel/batch.py), a chunk at a time: a province needs neither a store nor its memory.
    Returns the manifest."""
    from kernel.batch import PopulationWriter

    source = {"kind": "synthetic", "citizens": n, "seed": seed, "chunk_size": chunk_size}
    features = np.empty((min(n, chunk_size), len(spec.variables)), np.float32)
    with PopulationWriter(out, spec, partitions, AS_OF_DAY, source, overwrite=overwrite) as writer, \
            _progress(n, progress) as bar:
        for start, size, rng in _chunks(n, seed, chunk_size):
            people = _chunk_features(spec, rng, start, size, out=features[:size])
            writer.add(citizen_ids(start, size), people.adult.astype(np.uint8), features[:size])
            bar.update(size)
    return writer.manifest
