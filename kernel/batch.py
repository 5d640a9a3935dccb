"""Population batch on Dask: re-score and calibrate partitioned populations beyond one machine.

    qjscore export --out /data/pop --partitions 64            # the store's population, as Parquet
    qjscore generate --citizens 50000000 --partitions 200 --out /data/pop50m   # or a synthetic one
    qjscore batch rescore --input /data/pop --out /data/scores [--scheduler tcp://10.0.0.5:8786]
    qjscore model stage --calibration /data/scores/calibration.npz            # rolls out like any other

A **population directory** holds ``part-NNNNN.parquet`` files and ``manifest.json``. Each
row is one citizen: ``citizen_id`` (string), ``adult`` (uint8, 1 from 18 on: only adults are
scored) and one float32 column per model variable, named as in the spec and in its order:
the features the service itself derives from the records as of one day
(``ServingState.load``, so a batch score is the score the service would serve that day).
Features, not records, because they are what the kernel reads, a tenth of the bytes, and
their derivation (ageing, windows, decay) stays in one place; the price is that a new model
or another as-of day needs a new export. The manifest names the model version, the as-of
day, the variables, and for every part its rows and SHA-256, and which citizen goes where:
``partition = splitmix64(fnv1a64(utf8(citizen_id))) mod K`` (:func:`partition_of_ids`,
:func:`partition_of_id` in plain Python), stable across exports and machines, so exports of
two days line up part by part.

**The job** (:func:`rescore`) runs two passes over the parts on a dask.distributed cluster
(a ``LocalCluster`` of worker processes by default, an existing scheduler when given):

1. each part: check it (:func:`load_part`) → the compiled kernel, uncalibrated → the
   integer histogram of its adults' raw points (``RawHistogram``: 16,384 int64 counts);
   the client sums them — integers, so the sum, and the frozen table, are the same for any
   partitioning and any order — and freezes the calibration table;
2. each part again: the kernel with that table (GIL released, ``threads`` per task) →
   ``part-NNNNN.parquet`` of scores (score, level, dimension points, raw, percentile, the
   four reason codes, flags; the model and calibration versions in the file's metadata),
   with a digest of the kernel's outputs that the single-process run reproduces.

Every task is a pure function of its part's bytes, so when a worker dies Dask runs its tasks
again elsewhere and the result is the same. A part that fails its check (checksum, schema,
a null, a feature that is not a finite non-negative number) fails the job with
:class:`BatchInputError` naming the file, the row and the column. The output is written into
``<out>.partial-<pid>`` and renamed to ``<out>`` only once every part and the manifest are
written: a failed or killed job leaves nothing that looks final. Paths must be the same on
every worker (one machine, or a shared file system).

:func:`rescore_local` runs exactly the same per-part functions in one process: the
reference the Dask result equals bit for bit (tests/test_batch.py; ``python -m
kernel.batch_bench``).

These files hold personal data (who, and what their records add up to): they are written
0600 in 0700 directories, and belong on the operator's encrypted volume, not in a share.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from kernel.calibration import CalibrationError, CalibrationTable, RawHistogram
from kernel.columns import MAX_REASONS, ScoreColumns
from kernel.spec import ModelSpec

POPULATION_FORMAT = "qianjiang-population"
SCORES_FORMAT = "qianjiang-scores"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CALIBRATION_FILE = "calibration.npz"
#: Rows per Parquet row group when writing parts (a part is read whole, so this only bounds
#: a writer's buffers).
ROW_GROUP = 131_072
#: Longest citizen id the service accepts (server/service.py: 1-64 characters).
MAX_ID_BYTES = 64

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_M64 = (1 << 64) - 1


class BatchError(Exception):
    """A batch job cannot run: a bad directory, manifest or option. The message says what."""


class BatchInputError(BatchError):
    """A part fails its check: names the file, and the row and column where there is one."""

    def __init__(self, file: str, message: str, row: int | None = None, column: str | None = None):
        self.file, self.row, self.column, self.detail = file, row, column, message
        where = file if row is None else f"{file} row {row}" + (f" column {column}" if column else "")
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # travels from a Dask worker to the client intact
        return (BatchInputError, (self.file, self.detail, self.row, self.column))


# --- which part a citizen belongs to -----------------------------------------------------------


def id_bytes(ids) -> np.ndarray:
    """Citizen ids (str or bytes, a list or an array) as a numpy ``S`` array of ASCII bytes."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind == "S":
        raw = ids
    else:
        try:
            raw = np.asarray(ids, dtype="S")
        except UnicodeEncodeError:
            raise BatchError("citizen ids must be ASCII (1-64 letters, digits, '_', '.', ':' or '-')") from None
    if raw.dtype.itemsize > MAX_ID_BYTES:
        raise BatchError(f"a citizen id is longer than {MAX_ID_BYTES} bytes")
    return raw


def _id_matrix(ids) -> tuple[np.ndarray, np.ndarray]:
    """Citizen ids as an (n, width) uint8 matrix of their ASCII bytes, and their lengths."""
    raw = id_bytes(ids)
    m = np.ascontiguousarray(raw).view(np.uint8).reshape(len(raw), raw.dtype.itemsize)
    return m, np.strings.str_len(raw)


def partition_of_ids(ids, k: int) -> np.ndarray:
    """Each id's part among ``k``: splitmix64(fnv1a64(id bytes)) mod k, vectorised (int32)."""
    if k < 1:
        raise BatchError(f"partitions: must be at least 1, got {k}")
    m, lengths = _id_matrix(ids)
    h = np.full(len(m), _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(m.shape[1]):
            live = lengths > j
            if not live.any():
                break
            h = np.where(live, (h ^ m[:, j].astype(np.uint64)) * _FNV_PRIME, h)
        z = h + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(k)).astype(np.int32)


def partition_of_id(citizen_id: str, k: int) -> int:
    """:func:`partition_of_ids` for one id, in plain Python (for other tools to copy)."""
    h = 0xCBF29CE484222325
    for b in citizen_id.encode("ascii"):
        h = ((h ^ b) * 0x100000001B3) & _M64
    z = (h + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) % k


def part_name(p: int) -> str:
    return f"part-{p:05d}.parquet"


# --- files ------------------------------------------------------------------------------------------


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, doc: dict) -> None:
    from server.files import write_atomic

    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), 0o600)


def _private_file(path: Path) -> str:
    """``path`` created empty with mode 0600 (pyarrow's writers create files with the
    umask's mode), for a writer to open."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    return str(path)


@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool = False):
    """Write a directory as ``<out>.partial-<pid>`` and rename it to ``out`` only when the
    block ends without an exception; on one, remove what was written. ``out`` must not
    exist (or, with ``overwrite``, is replaced only at the very end)."""
    out = Path(out)
    _check_out(out, overwrite)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    out.parent.mkdir(parents=True, exist_ok=True)  # an existing parent keeps its mode
    _private_dir(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out)


def population_schema(spec: ModelSpec):
    import pyarrow as pa

    fields = [pa.field("citizen_id", pa.string(), nullable=False), pa.field("adult", pa.uint8(), nullable=False)]
    fields += [pa.field(v.name, pa.float32(), nullable=False) for v in spec.variables]
    return pa.schema(fields)


class PopulationWriter:
    """Writes a population directory from batches of citizens in any order: each batch is
    split by :func:`partition_of_ids` and appended to its parts' buffers, written out a row
    group at a time. Use as a context manager; nothing is final until it exits cleanly.

        >>> with PopulationWriter("/data/pop", spec, partitions=8, as_of_day=20000, source={"kind": "store"}) as w:  # doctest: +SKIP
        ...     w.add(ids, adult, features)
    """

    def __init__(self, out: str | Path, spec: ModelSpec, partitions: int, as_of_day: int, source: dict,
                 overwrite: bool = False, row_group: int = ROW_GROUP):
        if not 1 <= partitions <= 100_000:
            raise BatchError(f"partitions: must be 1-100000, got {partitions}")
        self.out, self.spec, self.k, self.as_of_day, self.source = Path(out), spec, partitions, int(as_of_day), source
        self.overwrite, self.row_group = overwrite, row_group
        self.schema = population_schema(spec)
        self._buffers: list[list] = [[] for _ in range(partitions)]
        self._buffered = np.zeros(partitions, np.int64)
        self.rows = np.zeros(partitions, np.int64)
        self._writers: dict[int, object] = {}
        self._stage = None
        self.dir: Path | None = None
        self.manifest: dict | None = None

    def __enter__(self) -> PopulationWriter:
        self._stage = staged_output(self.out, self.overwrite)
        self.dir = self._stage.__enter__()
        return self

    def add(self, ids, adult: np.ndarray, features: np.ndarray) -> None:
        """Append citizens: ids (str list or an ``S`` array), adult uint8 (n,), features (n, V)."""
        features = np.asarray(features, np.float32)
        n = len(adult)
        if features.shape != (n, len(self.spec.variables)) or len(ids) != n:
            raise BatchError(f"a batch of {n} citizens needs {n} ids and features of shape ({n}, {len(self.spec.variables)}),"
                             f" got {len(ids)} ids and {features.shape}")
        ids = id_bytes(ids)
        part = partition_of_ids(ids, self.k)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.k + 1))
        for p in np.flatnonzero(np.diff(bounds)):
            take = order[bounds[p] : bounds[p + 1]]
            self._buffers[p].append((ids[take], np.asarray(adult, np.uint8)[take], features[take]))
            self._buffered[p] += len(take)
            if self._buffered[p] >= self.row_group:
                self._flush(p)

    def _flush(self, p: int) -> None:
        import pyarrow as pa

        if not self._buffers[p]:
            return
        ids = np.concatenate([b[0] for b in self._buffers[p]])
        adult = np.concatenate([b[1] for b in self._buffers[p]])
        feats = np.concatenate([b[2] for b in self._buffers[p]])
        self._buffers[p], self._buffered[p] = [], 0
        columns = [pa.array(ids, pa.binary()).cast(pa.string()), pa.array(adult, pa.uint8())]
        columns += [pa.array(feats[:, j]) for j in range(feats.shape[1])]
        self._writer(p).write_table(pa.Table.from_arrays(columns, schema=self.schema), row_group_size=self.row_group)
        self.rows[p] += len(ids)

    def _writer(self, p: int):
        import pyarrow.parquet as pq

        w = self._writers.get(p)
        if w is None:
            w = self._writers[p] = pq.ParquetWriter(_private_file(self.dir / part_name(p)), self.schema)
        return w

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                for p in range(self.k):
                    self._flush(p)
                    self._writer(p)  # an empty part still has its file and schema
            for w in self._writers.values():
                w.close()
            if exc_type is None:
                self.manifest = self._manifest()
                _write_json(self.dir / MANIFEST, self.manifest)
        except BaseException as inner:
            self._stage.__exit__(type(inner), inner, inner.__traceback__)
            raise
        self._stage.__exit__(exc_type, exc, tb)

    def _manifest(self) -> dict:
        parts = [{"file": part_name(p), "rows": int(self.rows[p]), "sha256": _sha256_file(self.dir / part_name(p))}
                 for p in range(self.k)]
        return {
            "format": POPULATION_FORMAT, "format_version": FORMAT_VERSION,
            "model_version": self.spec.model_version, "variables": list(self.spec.variable_names),
            "as_of_day": self.as_of_day, "as_of": str(_dt.date(1970, 1, 1) + _dt.timedelta(days=self.as_of_day)),
            "rows": int(self.rows.sum()), "partitions": self.k,
            "partitioning": "splitmix64(fnv1a64(utf8(citizen_id))) mod partitions",
            "source": self.source, "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "created_by": _operator(), "parts": parts,
        }


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


# --- reading and checking ---------------------------------------------------------------------------


def read_manifest(directory: str | Path, fmt: str = POPULATION_FORMAT) -> dict:
    """A directory's manifest, checked for shape (not the parts: :func:`load_part` does that)."""
    path = Path(directory) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BatchError(f"{path}: no manifest (not a {fmt} directory; `qjscore export` or `qjscore generate "
                         "--partitions` writes one)") from None
    except (OSError, ValueError) as exc:
        raise BatchError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise BatchError(f"{path}: not a {fmt} manifest (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("format_version") != FORMAT_VERSION:
        raise BatchError(f"{path}: format version {doc.get('format_version')!r}, this build reads {FORMAT_VERSION}")
    parts = doc.get("parts")
    if not isinstance(parts, list) or not parts:
        raise BatchError(f"{path}: no parts listed")
    for i, part in enumerate(parts):
        if not (isinstance(part, dict) and isinstance(part.get("file"), str) and isinstance(part.get("rows"), int)
                and isinstance(part.get("sha256"), str)):
            raise BatchError(f"{path}: parts[{i}] needs file, rows and sha256")
        name = part["file"]
        if "/" in name or name.startswith(".") or not name.endswith(".parquet"):
            raise BatchError(f"{path}: parts[{i}].file {name!r} is not a part file name")
    return doc


def check_population(manifest: dict, spec: ModelSpec, where: str) -> None:
    if manifest.get("model_version") != spec.model_version or manifest.get("variables") != list(spec.variable_names):
        raise BatchError(
            f"{where}: its features were derived for model {manifest.get('model_version')}, not "
            f"{spec.model_version}: export again with --spec for this model")
    if not isinstance(manifest.get("as_of_day"), int):
        raise BatchError(f"{where}: the manifest has no as_of_day")


@dataclass
class Part:
    """One checked part in memory."""

    ids: object  # pyarrow StringArray
    adult: np.ndarray  # uint8 (n,)
    features: np.ndarray  # float32 (n, V), C-contiguous


def load_part(directory: str | Path, entry: dict, spec: ModelSpec) -> Part:
    """Read a part once, check it against its manifest entry and the spec, and return it.
    Raises :class:`BatchInputError` naming the file (and row, column) for anything wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = entry["file"]
    path = Path(directory) / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BatchInputError(name, f"cannot read ({exc.strerror or exc})") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BatchInputError(name, "its SHA-256 does not match the manifest (changed or damaged since export)")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise BatchInputError(name, f"not a readable Parquet file ({exc})") from None
    if table.num_rows != entry["rows"]:
        raise BatchInputError(name, f"{table.num_rows} rows, the manifest says {entry['rows']}")
    want = population_schema(spec)
    for field in want:
        i = table.schema.get_field_index(field.name)
        if i < 0:
            raise BatchInputError(name, f"no column {field.name!r}", column=field.name)
        if table.schema.field(i).type != field.type:
            raise BatchInputError(name, f"column {field.name!r} is {table.schema.field(i).type}, expected {field.type}",
                                  column=field.name)
    n, names = table.num_rows, list(spec.variable_names)
    for col in ["citizen_id", "adult", *names]:
        column = table.column(col)
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise BatchInputError(name, "is null", row=row, column=col)
    ids = table.column("citizen_id").combine_chunks()
    adult = table.column("adult").to_numpy()
    bad = adult > 1
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise BatchInputError(name, f"adult must be 0 or 1, got {int(adult[row])}", row=row, column="adult")
    features = np.empty((n, len(names)), np.float32)
    for j, col in enumerate(names):
        features[:, j] = table.column(col).to_numpy()
    ok = np.isfinite(features) & (features >= 0)
    if not ok.all():
        row, j = (int(x[0]) for x in np.nonzero(~ok))
        raise BatchInputError(name, f"{features[row, j]} is not a finite non-negative number (citizen "
                              f"{ids[row].as_py()})", row=row, column=names[j])
    return Part(ids, np.ascontiguousarray(adult, np.uint8), features)


# --- the two passes (pure functions of a part: what a Dask task runs) ---------------------------------

_scorers: dict = {}


def _scorer(spec: ModelSpec, table: CalibrationTable | None):
    """One Scorer per (model, calibration) per process: building one copies the table."""
    from kernel.score import Scorer

    key = (spec.model_version, table.calibration_version if table is not None else None)
    s = _scorers.get(key)
    if s is None:
        _scorers.clear()
        s = _scorers[key] = Scorer(spec, table) if table is not None else Scorer(spec)
    return s


def part_histogram(directory: str, entry: dict, spec: ModelSpec, threads: int = 1) -> np.ndarray:
    """Pass 1: the integer histogram of a part's adults' raw points (int64 counts)."""
    part = load_part(directory, entry, spec)
    raw = _scorer(spec, None).score(part.features, part.adult, n_threads=threads).raw
    hist = RawHistogram.empty(spec)
    hist.add(raw[part.adult == 1])
    return hist.counts


def outputs_digest(cols: ScoreColumns) -> str:
    """SHA-256 of every kernel output of a part, in a fixed order and layout."""
    h = hashlib.sha256()
    for name in ("score", "level", "flags", "reasons", "raw", "percentile", "dimension_points"):
        h.update(np.ascontiguousarray(getattr(cols, name)).tobytes())
    return h.hexdigest()


def scores_table(spec: ModelSpec, ids, cols: ScoreColumns, meta: dict):
    """The scores of a part as an Arrow table (levels and reasons as dictionary codes)."""
    import pyarrow as pa

    def coded(index: np.ndarray, codes: list[str]):
        index = np.asarray(index, np.int32)
        return pa.DictionaryArray.from_arrays(pa.array(np.where(index < 0, 0, index), pa.int32(), mask=index < 0),
                                              pa.array(codes, pa.string()))

    reason_codes = [v.reason.code for v in spec.variables]
    columns = {
        "citizen_id": ids,
        "score": pa.array(cols.score, pa.int16()),
        "level": pa.array(cols.level, pa.int8()),
        "level_code": coded(cols.level, [lv.code for lv in spec.levels]),
        "raw": pa.array(cols.raw, pa.float64()),
        "percentile": pa.array(cols.percentile, pa.float64()),
    }
    for d, dim in enumerate(spec.dimensions):
        columns[f"points_{dim.name}"] = pa.array(np.ascontiguousarray(cols.dimension_points[:, d]), pa.float64())
    for r in range(MAX_REASONS):
        columns[f"reason_{r + 1}"] = coded(cols.reasons[:, r], reason_codes)
    columns["flags"] = pa.array(cols.flags, pa.uint8())
    table = pa.table(columns)
    return table.replace_schema_metadata({b"qianjiang": json.dumps(meta, sort_keys=True).encode()})


def score_part(directory: str, entry: dict, spec: ModelSpec, table: CalibrationTable, out_dir: str,
               as_of_day: int, threads: int = 1) -> dict:
    """Pass 2: a part scored with the calibration, written to ``out_dir`` under the same
    name (atomically: a retried task overwrites). Returns its manifest entry."""
    import pyarrow.parquet as pq

    part = load_part(directory, entry, spec)
    cols = _scorer(spec, table).score(part.features, part.adult, n_threads=threads)
    meta = {"model_version": spec.model_version, "calibration_version": table.calibration_version,
            "as_of_day": as_of_day, "input_sha256": entry["sha256"]}
    out = Path(out_dir) / entry["file"]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    pq.write_table(scores_table(spec, part.ids, cols, meta), _private_file(tmp))
    os.replace(tmp, out)
    adult = part.adult == 1
    levels = np.bincount(cols.level[adult].astype(np.int64), minlength=len(spec.levels))
    return {"file": entry["file"], "rows": int(len(part.adult)), "sha256": _sha256_file(out),
            "digest": outputs_digest(cols), "level_counts": levels.tolist()}


# --- the job ------------------------------------------------------------------------------------------


@dataclass
class BatchResult:
    out: Path
    manifest: dict
    calibration: CalibrationTable
    seconds: float
    workers_lost: int = 0

    @property
    def digests(self) -> list[str]:
        return [p["digest"] for p in self.manifest["parts"]]


def _freeze(spec: ModelSpec, counts: Iterable[np.ndarray]) -> CalibrationTable:
    hist = RawHistogram.empty(spec)
    for c in counts:
        hist = hist.merge(RawHistogram(spec.model_version, hist.raw_min, hist.raw_max, np.asarray(c, np.int64)))
    return hist.freeze()


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise BatchError(f"{out}: exists and is not empty (pick a new directory, or --overwrite)")


def _prepare(input_dir, out, spec: ModelSpec, calibration: CalibrationTable | None, overwrite: bool) -> dict:
    _check_out(Path(out), overwrite)  # before any work, not after the first pass
    manifest = read_manifest(input_dir)
    check_population(manifest, spec, str(Path(input_dir) / MANIFEST))
    if calibration is not None:
        calibration.check_model(spec)
    if Path(out).resolve() == Path(input_dir).resolve():
        raise BatchError(f"--out {out}: is the input directory")
    return manifest


def _finish(stage: Path, spec, manifest: dict, input_dir, table: CalibrationTable, calibrated_here: bool,
            entries: list[dict], cluster: str, t0: float, workers_lost: int = 0) -> dict:
    table.save(stage / CALIBRATION_FILE)
    os.chmod(stage / CALIBRATION_FILE, 0o600)
    level_counts = np.sum([e.pop("level_counts") for e in entries], axis=0)
    doc = {
        "format": SCORES_FORMAT, "format_version": FORMAT_VERSION,
        "model_version": spec.model_version, "calibration_version": table.calibration_version,
        "calibration": CALIBRATION_FILE if calibrated_here else None, "calibration_total": table.total,
        "as_of_day": manifest["as_of_day"], "rows": int(sum(e["rows"] for e in entries)),
        "input": str(Path(input_dir).resolve()), "input_manifest_sha256": _sha256_file(Path(input_dir) / MANIFEST),
        "levels": {lv.code: int(c) for lv, c in zip(spec.levels, level_counts)},
        "cluster": cluster, "workers_lost": workers_lost, "seconds": round(time.perf_counter() - t0, 3),
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "parts": entries,
    }
    _write_json(stage / MANIFEST, doc)
    return doc


def rescore_local(input_dir, out, spec: ModelSpec, calibration: CalibrationTable | None = None,
                  threads: int = 2, overwrite: bool = False) -> BatchResult:
    """The job in this process, part after part, with the same functions as the Dask tasks."""
    t0 = time.perf_counter()
    manifest = _prepare(input_dir, out, spec, calibration, overwrite)
    input_dir = str(input_dir)
    table = calibration or _freeze(spec, (part_histogram(input_dir, e, spec, threads) for e in manifest["parts"]))
    with staged_output(out, overwrite) as stage:
        entries = [score_part(input_dir, e, spec, table, str(stage), manifest["as_of_day"], threads)
                   for e in manifest["parts"]]
        doc = _finish(stage, spec, manifest, input_dir, table, calibration is None, entries, "single process", t0)
    return BatchResult(Path(out), doc, table, time.perf_counter() - t0)


def has_dashboard() -> bool:
    """Whether Dask can serve its dashboard here (it needs bokeh)."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def local_cluster(workers: int | None = None, threads_per_worker: int = 1):
    """A LocalCluster of worker processes on loopback, its HTTP server (the dashboard when
    bokeh is installed, Prometheus metrics at /metrics always) on a free loopback port."""
    from distributed import LocalCluster

    workers = workers or max(1, os.cpu_count() or 1)
    return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                        host="127.0.0.1", dashboard_address="127.0.0.1:0", silence_logs=40)


def _wait(futures: list, client, show_progress: bool, on_progress: Callable[[int, int], None] | None,
          lost: list) -> list:
    """Wait for ``futures`` (a progress bar on the console, or ``on_progress(done, total)``),
    counting workers that leave meanwhile; the first task error is raised."""
    from distributed import as_completed, progress

    workers = set(client.scheduler_info()["workers"])
    if show_progress:
        progress(futures, notebook=False)
    else:
        done = 0
        for f in as_completed(futures):
            done += 1
            if f.status == "error":
                f.result()
            if on_progress is not None:
                on_progress(done, len(futures))
            now = set(client.scheduler_info()["workers"])
            lost[0] += len(workers - now)
            workers |= now
    result = client.gather(futures)
    now = set(client.scheduler_info()["workers"])
    lost[0] += len(workers - now)
    return result


def rescore(input_dir, out, spec: ModelSpec, calibration: CalibrationTable | None = None, *,
            client=None, scheduler: str | None = None, workers: int | None = None, threads_per_worker: int = 1,
            threads: int = 1, progress: bool = False, on_progress: Callable[[str, int, int], None] | None = None,
            overwrite: bool = False, log=print) -> BatchResult:
    """The job on Dask: ``client`` (a distributed.Client), else ``scheduler`` (an address),
    else a new :func:`local_cluster` of ``workers`` processes. Each task runs the kernel with
    ``threads`` threads. ``on_progress(pass_name, done, total)`` follows the tasks when no
    progress bar is shown."""
    from distributed import Client

    t0 = time.perf_counter()
    manifest = _prepare(input_dir, out, spec, calibration, overwrite)
    input_dir = str(Path(input_dir).resolve())
    with contextlib.ExitStack() as stack:
        if client is None:
            if scheduler:
                try:
                    client = stack.enter_context(Client(scheduler, timeout="10s"))
                except (OSError, TimeoutError) as exc:
                    raise BatchError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
                where = f"scheduler {scheduler}"
            else:
                cluster = stack.enter_context(local_cluster(workers, threads_per_worker))
                client = stack.enter_context(Client(cluster))
                where = f"LocalCluster of {len(cluster.workers)} worker processes"
        else:
            where = f"scheduler {client.scheduler.address}"
        if has_dashboard():
            log(f"dashboard: {client.dashboard_link}")
        else:
            log(f"scheduler metrics: {client.dashboard_link.removesuffix('/status')}/metrics (the dashboard needs bokeh)")
        log(f"{manifest['rows']:,} citizens in {len(manifest['parts'])} parts on {where}")
        lost = [0]
        spec_f = client.scatter(spec, broadcast=True)
        parts = manifest["parts"]

        def follow(name):
            return None if on_progress is None else (lambda done, total: on_progress(name, done, total))

        try:
            table = calibration
            if table is None:
                futures = client.map(part_histogram, [input_dir] * len(parts), parts, [spec_f] * len(parts),
                                     [threads] * len(parts), pure=False, key=[f"histogram-{e['file']}" for e in parts])
                log("pass 1: histograms")
                table = _freeze(spec, _wait(futures, client, progress, follow("histogram"), lost))
                log(f"calibration {table.calibration_version} frozen from {table.total:,} adults")
            table_f = client.scatter(table, broadcast=True)
            with staged_output(out, overwrite) as stage:
                log("pass 2: scores")
                futures = client.map(score_part, [input_dir] * len(parts), parts, [spec_f] * len(parts),
                                     [table_f] * len(parts), [str(stage.resolve())] * len(parts),
                                     [manifest["as_of_day"]] * len(parts), [threads] * len(parts),
                                     pure=False, key=[f"score-{e['file']}" for e in parts])
                try:
                    entries = _wait(futures, client, progress, follow("score"), lost)
                except BaseException:
                    client.cancel(futures)
                    raise
                doc = _finish(stage, spec, manifest, input_dir, table, calibration is None, entries, where, t0,
                              lost[0])
        except BatchInputError:
            raise
        except Exception as exc:
            if isinstance(exc, (BatchError, CalibrationError)):
                raise
            raise BatchError(f"the job failed on the cluster: {type(exc).__name__}: {exc}") from exc
    return BatchResult(Path(out), doc, table, time.perf_counter() - t0, lost[0])


def read_scores(directory: str | Path):
    """Every part of a scores directory as one Arrow table (for tests and small checks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    doc = read_manifest(directory, SCORES_FORMAT)
    return doc, pa.concat_tables([pq.read_table(Path(directory) / p["file"]) for p in doc["parts"]])

