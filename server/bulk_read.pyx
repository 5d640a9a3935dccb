"""Bulk reads for the start-up load (server/state.py ServingState.fill): the stores' whole
tables read straight into numpy arrays by C loops that run without the GIL, never a
Python object per record.

SQLite (SQLiteReader): a read-only connection of this module's own (sqlite3_open_v2) that
steps through a SELECT and fills caller-owned arrays. It MUST be linked with the same
libsqlite3 that Python's sqlite3 module uses (setup.py: -lsqlite3, the system library),
never a second, bundled copy of SQLite: two copies of SQLite in one process do not see
each other's POSIX advisory locks and each closes the other's file descriptors' locks,
which corrupts the database (https://sqlite.org/howtocorrupt.html section 2.2.1). Nothing
in the build would notice a second copy, so: no SQLite amalgamation compiled in, and no
pysqlite3 or ADBC SQLite driver imported in this process (tests/test_bulk_load.py checks
that this module's SQLite is Python's and that one libsqlite3 is mapped).

PostgreSQL (PGCopyReader): the rows of a ``COPY (SELECT ...) TO STDOUT (FORMAT BINARY)`` that
psycopg started on a connection, taken from libpq with PQgetCopyData in a C loop and
parsed in place (big-endian fields, lengths checked). psycopg hands out one Python buffer
per row (about 1.2 us a row here, under a million rows a second); this does not. It calls
the very libpq that psycopg's connection was made with (function addresses passed in by
server/store_pg.py), so no second libpq and no build dependency on libpq-dev. Without
those addresses, rows fed one by one through ``feed`` (psycopg's own read) give the same
result, slower.

Names (a record's variable, its scenario) become small integer codes by a C hash table
(NameCodes): a variable the caller did not list drops the record (the model does not score
it); a scenario it did not list, or none, is -1. Citizen ids come as one buffer of bytes
with offsets, and their two keyed hashes (the citizen index's key, the audit pseudonym)
are computed here too (citizen_hashes), so a load makes no Python object per citizen
either. split_block sorts a block of records into chunks of citizens in one pass.
"""

from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcmp, memcpy

import numpy as np


cdef extern from "sqlite3.h" nogil:
    ctypedef struct sqlite3:
        pass
    ctypedef struct sqlite3_stmt:
        pass
    ctypedef long long sqlite3_int64
    int SQLITE_OK
    int SQLITE_ROW
    int SQLITE_DONE
    int SQLITE_NULL
    int SQLITE_OPEN_READONLY
    int SQLITE_OPEN_URI
    int sqlite3_open_v2(const char* filename, sqlite3** db, int flags, const char* vfs)
    int sqlite3_close_v2(sqlite3* db)
    int sqlite3_busy_timeout(sqlite3* db, int ms)
    const char* sqlite3_errmsg(sqlite3* db)
    const char* sqlite3_libversion()
    int sqlite3_exec(sqlite3* db, const char* sql, void* callback, void* arg, char** errmsg)
    int sqlite3_prepare_v2(sqlite3* db, const char* sql, int nbyte, sqlite3_stmt** stmt, const char** tail)
    int sqlite3_bind_int64(sqlite3_stmt* stmt, int i, sqlite3_int64 value)
    int sqlite3_step(sqlite3_stmt* stmt)
    int sqlite3_reset(sqlite3_stmt* stmt)
    int sqlite3_finalize(sqlite3_stmt* stmt)
    int sqlite3_column_count(sqlite3_stmt* stmt)
    int sqlite3_column_type(sqlite3_stmt* stmt, int col)
    sqlite3_int64 sqlite3_column_int64(sqlite3_stmt* stmt, int col)
    double sqlite3_column_double(sqlite3_stmt* stmt, int col)
    const unsigned char* sqlite3_column_text(sqlite3_stmt* stmt, int col)
    const void* sqlite3_column_blob(sqlite3_stmt* stmt, int col)
    int sqlite3_column_bytes(sqlite3_stmt* stmt, int col)


def sqlite_version() -> str:
    """The version of the SQLite library this module is linked with (the test suite checks
    it is the one Python's sqlite3 module reports)."""
    return sqlite3_libversion().decode()


class BulkReadError(RuntimeError):
    """A bulk read failed (the database's message)."""


# Citizen ids read in bulk: their bytes back to back, and n + 1 offsets (no Python object
# per citizen: server/state.py hashes them with citizen_hashes below, in C).
cdef struct IdBuffer:
    char* data
    Py_ssize_t used
    Py_ssize_t cap


cdef int ids_add(IdBuffer* b, const char* p, Py_ssize_t n) noexcept nogil:
    """Append ``n`` bytes; -1 when out of memory."""
    cdef Py_ssize_t cap
    cdef char* grown
    if b.used + n > b.cap:
        cap = b.cap * 2 if b.cap else 1 << 16
        while cap < b.used + n:
            cap *= 2
        grown = <char*>realloc(b.data, cap)
        if grown == NULL:
            return -1
        b.data, b.cap = grown, cap
    if n:
        memcpy(b.data + b.used, p, n)
    b.used += n
    return 0


cdef object ids_take(IdBuffer* b):
    """The bytes as a numpy uint8 array; the buffer is freed."""
    out = np.empty(b.used, np.uint8)
    cdef uint8_t[::1] ov = out
    if b.used:
        memcpy(&ov[0], b.data, b.used)
    free(b.data)
    b.data, b.used, b.cap = NULL, 0, 0
    return out


# --- names to codes ------------------------------------------------------------------------

cdef inline uint64_t fnv1a(const char* s, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <uint8_t>s[i]) * 1099511628211ULL
    return h


cdef class NameCodes:
    """Names (str) -> integer codes, looked up from C by their UTF-8 bytes.

    ``NameCodes({"traffic_violations": 3, ...})``; ``lookup`` gives -1 for a name not listed
    (``missing``: what the reader makes of it, e.g. drop the record)."""

    cdef bytes blob  # every name's bytes, back to back
    cdef object offsets_arr, lengths_arr, codes_arr, slots_arr
    cdef const int64_t* offsets
    cdef const int64_t* lengths
    cdef const int32_t* codes
    cdef const int32_t* slots  # hash table of entry index + 1 (0: empty)
    cdef uint64_t mask
    cdef const char* base

    def __init__(self, mapping):
        items = [(str(name).encode(), int(code)) for name, code in dict(mapping).items()]
        cdef Py_ssize_t n = len(items), i, size = 16
        while size < 4 * n:
            size *= 2
        self.blob = b"".join(name for name, _ in items)
        lengths = np.array([len(name) for name, _ in items], np.int64)
        offsets = np.cumsum(lengths) - lengths
        codes = np.array([code for _, code in items], np.int32)
        slots = np.zeros(size, np.int32)
        self.offsets_arr, self.lengths_arr, self.codes_arr, self.slots_arr = offsets, lengths, codes, slots
        cdef int64_t[::1] ov = offsets
        cdef int64_t[::1] lv = lengths
        cdef int32_t[::1] cv = codes
        cdef int32_t[::1] sv = slots
        self.base = self.blob
        self.mask = size - 1
        cdef uint64_t slot
        for i in range(n):
            slot = fnv1a(self.base + ov[i], lv[i]) & self.mask
            while sv[slot]:
                slot = (slot + 1) & self.mask
            sv[slot] = i + 1
        self.offsets = &ov[0] if n else NULL
        self.lengths = &lv[0] if n else NULL
        self.codes = &cv[0] if n else NULL
        self.slots = &sv[0]

    cdef inline int32_t find(self, const char* s, Py_ssize_t n) noexcept nogil:
        cdef uint64_t slot = fnv1a(s, n) & self.mask
        cdef int32_t e
        while True:
            e = self.slots[slot]
            if e == 0:
                return -1
            e -= 1
            if self.lengths[e] == n and memcmp(self.base + self.offsets[e], s, n) == 0:
                return self.codes[e]
            slot = (slot + 1) & self.mask

    def lookup(self, name) -> int:
        cdef bytes b = str(name).encode()
        return self.find(b, len(b))


# --- SQLite --------------------------------------------------------------------------------

cdef class SQLiteReader:
    """A read-only connection of its own to an SQLite database file (see the module's
    comment on the one SQLite library). ``begin()`` .. ``end()`` is one read transaction:
    every statement in between sees the same committed state (WAL snapshot)."""

    cdef sqlite3* db
    cdef readonly str path

    def __cinit__(self, path, int busy_timeout_ms=10000, long long mmap_bytes=0):
        self.db = NULL
        self.path = str(path)
        cdef bytes p = self.path.encode()
        cdef const char* cp = p
        cdef int rc
        with nogil:
            rc = sqlite3_open_v2(cp, &self.db, SQLITE_OPEN_READONLY, NULL)
        if rc != SQLITE_OK:
            msg = sqlite3_errmsg(self.db).decode(errors="replace") if self.db != NULL else f"error {rc}"
            if self.db != NULL:
                sqlite3_close_v2(self.db)
                self.db = NULL
            raise BulkReadError(f"{self.path}: cannot open for reading: {msg}")
        sqlite3_busy_timeout(self.db, busy_timeout_ms)
        if mmap_bytes > 0:
            # Reads of a table scan straight from the page cache, not copied page by page.
            self.execute(f"PRAGMA mmap_size = {int(mmap_bytes)}")

    def __dealloc__(self):
        if self.db != NULL:
            sqlite3_close_v2(self.db)
            self.db = NULL

    cdef sqlite3* _db(self) except NULL:
        if self.db == NULL:
            raise BulkReadError(f"{self.path}: the bulk reader is closed")
        return self.db

    def close(self):
        if self.db != NULL:
            sqlite3_close_v2(self.db)
            self.db = NULL

    def _error(self, what):
        return BulkReadError(f"{self.path}: {what}: {sqlite3_errmsg(self.db).decode(errors='replace')}")

    def execute(self, sql):
        """Run statements that return nothing (BEGIN, COMMIT, PRAGMA ...)."""
        cdef sqlite3* db = self._db()
        cdef bytes s = sql.encode()
        cdef const char* cs = s
        cdef int rc
        with nogil:
            rc = sqlite3_exec(db, cs, NULL, NULL, NULL)
        if rc != SQLITE_OK:
            raise self._error(sql.split(None, 1)[0])

    def query(self, sql, params=()) -> SQLiteQuery:
        """A prepared statement with integer ``params`` bound (?1, ?2, ...)."""
        q = SQLiteQuery.__new__(SQLiteQuery)
        (<SQLiteQuery>q).open(self, sql, params)
        return q

    def scalar(self, sql, params=()) -> int:
        """The integer in the first column of the first row (0 for NULL or no row)."""
        cdef SQLiteQuery q = self.query(sql, params)
        cdef int rc
        cdef long long value = 0
        try:
            with nogil:
                rc = sqlite3_step(q.stmt)
                if rc == SQLITE_ROW:
                    value = sqlite3_column_int64(q.stmt, 0)
            if rc != SQLITE_ROW and rc != SQLITE_DONE:
                raise self._error("read")
        finally:
            q.close()
        return value


cdef class SQLiteQuery:
    """One statement stepped through by the ``fill_*`` methods, a block at a time: each
    fills the arrays it is given from where the last one stopped, and returns how many rows
    it wrote (fewer than room: the statement is done)."""

    cdef sqlite3_stmt* stmt
    cdef SQLiteReader reader
    cdef readonly bint done

    cdef open(self, SQLiteReader reader, sql, params):
        self.reader = reader
        self.stmt = NULL
        self.done = False
        cdef bytes s = sql.encode()
        cdef int rc = sqlite3_prepare_v2(reader._db(), s, -1, &self.stmt, NULL)
        if rc != SQLITE_OK:
            raise reader._error("prepare")
        for i, value in enumerate(params):
            if sqlite3_bind_int64(self.stmt, i + 1, int(value)) != SQLITE_OK:
                raise reader._error("bind")

    def __dealloc__(self):
        if self.stmt != NULL:
            sqlite3_finalize(self.stmt)
            self.stmt = NULL

    def close(self):
        if self.stmt != NULL:
            sqlite3_finalize(self.stmt)
            self.stmt = NULL
        self.done = True

    cdef int _check(self, int rc) except -1:
        if rc == SQLITE_DONE:
            self.done = True
            return 0
        if rc != SQLITE_ROW:
            raise self.reader._error("read")
        return 0

    def fill_records(self, NameCodes variables not None, NameCodes scenarios not None, int32_t[::1] citizen, int16_t[::1] variable,
                     int32_t[::1] day, float[::1] value, int8_t[::1] bit, long long citizen_limit):
        """Rows ``(citizen_row, variable, day, value, scenario)``: the variable's code, the
        scenario's (-1: none or not listed). A record of a variable not listed, or of a
        citizen row outside ``0..citizen_limit-1``, is skipped (counted in the second
        result). Returns (rows written, rows skipped)."""
        cdef Py_ssize_t room = citizen.shape[0], i = 0, skipped = 0
        if variable.shape[0] < room or day.shape[0] < room or value.shape[0] < room or bit.shape[0] < room:
            raise ValueError("fill_records: the arrays must have the same length")
        cdef sqlite3_stmt* st = self.stmt
        cdef int rc = SQLITE_ROW
        cdef int32_t code
        cdef long long row
        cdef const char* text
        if self.done or st == NULL:
            return 0, 0
        with nogil:
            while i < room:
                rc = sqlite3_step(st)
                if rc != SQLITE_ROW:
                    break
                row = sqlite3_column_int64(st, 0)
                text = <const char*>sqlite3_column_text(st, 1)
                code = variables.find(text, sqlite3_column_bytes(st, 1)) if text != NULL else -1
                if code < 0 or row < 0 or row >= citizen_limit:
                    skipped += 1
                    continue
                citizen[i] = <int32_t>row
                variable[i] = <int16_t>code
                day[i] = <int32_t>sqlite3_column_int64(st, 2)
                value[i] = <float>sqlite3_column_double(st, 3)
                if sqlite3_column_type(st, 4) == SQLITE_NULL:
                    bit[i] = -1
                else:
                    text = <const char*>sqlite3_column_text(st, 4)
                    bit[i] = <int8_t>scenarios.find(text, sqlite3_column_bytes(st, 4))
                i += 1
        if i < room:
            self._check(rc)
        return i, skipped

    def fill_records_of_rows(self, NameCodes variables not None, NameCodes scenarios not None, const int64_t[::1] rows,
                             Py_ssize_t start, int32_t[::1] citizen, int16_t[::1] variable, int32_t[::1] day,
                             float[::1] value, int8_t[::1] bit):
        """:meth:`fill_records` for a statement with one parameter, the citizen row (``?1``),
        run once for each of ``rows[start:]`` in turn (reset and bound again, in C without
        the GIL): each row's records whole or not at all. Returns (the index in ``rows`` to
        go on from, records written, records skipped); the arrays are full before that
        row's records when it is not ``len(rows)``."""
        cdef Py_ssize_t room = citizen.shape[0], i = 0, mark, smark, skipped = 0, k = start, n_rows = rows.shape[0]
        if variable.shape[0] < room or day.shape[0] < room or value.shape[0] < room or bit.shape[0] < room:
            raise ValueError("fill_records_of_rows: the arrays must have the same length")
        cdef sqlite3_stmt* st = self.stmt
        cdef int rc = SQLITE_DONE, full = 0
        cdef int32_t code
        cdef long long row
        cdef const char* text
        if st == NULL:
            raise self.reader._error("closed statement")
        with nogil:
            while k < n_rows and not full:
                sqlite3_reset(st)
                rc = sqlite3_bind_int64(st, 1, rows[k])
                if rc != SQLITE_OK:
                    break
                mark, smark = i, skipped
                while True:
                    rc = sqlite3_step(st)
                    if rc != SQLITE_ROW:
                        break
                    if i == room:
                        full = 1
                        i, skipped = mark, smark  # this row's records go in the next block, whole
                        break
                    row = sqlite3_column_int64(st, 0)
                    text = <const char*>sqlite3_column_text(st, 1)
                    code = variables.find(text, sqlite3_column_bytes(st, 1)) if text != NULL else -1
                    if code < 0:
                        skipped += 1
                        continue
                    citizen[i] = <int32_t>row
                    variable[i] = <int16_t>code
                    day[i] = <int32_t>sqlite3_column_int64(st, 2)
                    value[i] = <float>sqlite3_column_double(st, 3)
                    if sqlite3_column_type(st, 4) == SQLITE_NULL:
                        bit[i] = -1
                    else:
                        text = <const char*>sqlite3_column_text(st, 4)
                        bit[i] = <int8_t>scenarios.find(text, sqlite3_column_bytes(st, 4))
                    i += 1
                if full:
                    break
                if rc != SQLITE_DONE:
                    break
                k += 1
            sqlite3_reset(st)
        if not full and rc != SQLITE_DONE and rc != SQLITE_OK:
            raise self.reader._error("read")
        if full and i == 0:
            raise ValueError(f"fill_records_of_rows: row {rows[k]} has more records than a block holds ({room})")
        return k, i, skipped

    def fill_citizens(self, long long first_row, Py_ssize_t count):
        """Rows ``(citizen_row, citizen_id, birth_day, consent)`` of citizens ``first_row ..
        first_row + count - 1`` in row order: (ids: their UTF-8 bytes back to back, uint8;
        offsets, int64 (count + 1): id ``i`` is ``ids[offsets[i]:offsets[i + 1]]``; birth_day
        int32; consent uint8). Rows are dense: a gap is an error."""
        birth = np.empty(count, np.int32)
        consent = np.empty(count, np.uint8)
        offsets = np.zeros(count + 1, np.int64)
        cdef int32_t[::1] bv = birth
        cdef uint8_t[::1] cv = consent
        cdef int64_t[::1] ov = offsets
        cdef IdBuffer ids
        ids.data, ids.used, ids.cap = NULL, 0, 0
        cdef Py_ssize_t i = 0
        cdef int rc = SQLITE_DONE, bad = 0
        cdef sqlite3_stmt* st = self.stmt
        with nogil:
            while i < count:
                rc = sqlite3_step(st)
                if rc != SQLITE_ROW:
                    break
                if sqlite3_column_int64(st, 0) != first_row + i:
                    bad = 1
                    break
                if ids_add(&ids, <const char*>sqlite3_column_text(st, 1), sqlite3_column_bytes(st, 1)) < 0:
                    bad = 2
                    break
                ov[i + 1] = ids.used
                bv[i] = <int32_t>sqlite3_column_int64(st, 2)
                cv[i] = 1 if sqlite3_column_int64(st, 3) else 0
                i += 1
        data = ids_take(&ids)
        if bad == 1:
            raise BulkReadError(f"{self.reader.path}: citizen rows are not dense at row {first_row + i}")
        if bad == 2:
            raise MemoryError("citizen ids")
        if i < count:
            self._check(rc)
            raise BulkReadError(f"{self.reader.path}: {count - i} citizens missing from row {first_row + i} on")
        return data, offsets, birth, consent

    def fill_cards(self, uint8_t[:, ::1] tokens, int64_t[::1] rows):
        """Rows ``(token, citizen_row)`` into ``tokens`` (n, 16) and ``rows``; returns how
        many."""
        cdef Py_ssize_t room = tokens.shape[0], i = 0
        cdef sqlite3_stmt* st = self.stmt
        cdef int rc = SQLITE_ROW
        cdef int bad = 0
        if self.done or st == NULL:
            return 0
        if tokens.shape[1] != 16 or rows.shape[0] < room:
            raise ValueError("fill_cards: tokens (n, 16) and n rows")
        with nogil:
            while i < room:
                rc = sqlite3_step(st)
                if rc != SQLITE_ROW:
                    break
                if sqlite3_column_bytes(st, 0) != 16:
                    bad = 1
                    break
                memcpy(&tokens[i, 0], sqlite3_column_blob(st, 0), 16)
                rows[i] = sqlite3_column_int64(st, 1)
                i += 1
        if bad:
            raise BulkReadError(f"{self.reader.path}: a card token is not 16 bytes")
        if i < room:
            self._check(rc)
        return i


# --- PostgreSQL binary COPY ----------------------------------------------------------------

ctypedef int (*PQgetCopyData_t)(void* conn, char** buffer, int async_) noexcept nogil
ctypedef void (*PQfreemem_t)(void* ptr) noexcept nogil
ctypedef char* (*PQerrorMessage_t)(const void* conn) noexcept nogil
ctypedef void* (*PQgetResult_t)(void* conn) noexcept nogil
ctypedef char* (*PQresultErrorMessage_t)(const void* res) noexcept nogil
ctypedef void (*PQclear_t)(void* res) noexcept nogil

cdef const char* PG_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"

cdef extern from *:
    uint16_t __builtin_bswap16(uint16_t x) nogil
    uint32_t __builtin_bswap32(uint32_t x) nogil
    uint64_t __builtin_bswap64(uint64_t x) nogil

# COPY's binary fields are big-endian (network order); this machine is little-endian (x86-64,
# ARM64 as Linux runs them).
cdef inline int16_t be16(const char* p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return <int16_t>__builtin_bswap16(v)

cdef inline int32_t be32(const char* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return <int32_t>__builtin_bswap32(v)

cdef inline uint64_t ube64(const char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return __builtin_bswap64(v)

cdef inline int64_t be64(const char* p) noexcept nogil:
    return <int64_t>ube64(p)

cdef inline double bedouble(const char* p) noexcept nogil:
    cdef uint64_t u = ube64(p)
    cdef double d
    memcpy(&d, &u, 8)
    return d


# What a COPY row is made of, per query (the kind of reader):
#   RECORDS  int8 citizen_row, text variable, int4 day, float8 value, text scenario (or NULL)
#   CITIZENS int8 citizen_row, text citizen_id, int4 birth_day, int2 consent
#   CARDS    bytea token (16 bytes), int8 citizen_row
cdef enum:
    RECORDS = 0
    CITIZENS = 1
    CARDS = 2

# what parsing one tuple found
cdef enum:
    ROW = 0
    SKIPPED = 1
    TRAILER = 2
    BAD = 3
    NOT_DENSE = 4
    NO_MEMORY = 5


cdef class PGCopyReader:
    """The rows of one binary COPY TO STDOUT in progress on a libpq connection.

    ``PGCopyReader(kind, conn_ptr, getcopydata, freemem, errormessage, getresult,
    resulterrormessage, clear)``: the PGconn pointer (psycopg's ``pgconn.pgconn_ptr``) and
    the addresses of those libpq functions (PQgetCopyData …) in the library that connection
    uses. A COPY the server ends with an error: its results are read here, the error's
    message raised (psycopg then finds the connection idle, in a failed transaction). The ``fill_*`` methods drain it in C, without the GIL,
    and stop at the COPY's trailer: psycopg's own ``Copy.read()`` then reads the end of the
    COPY and its result, so the connection goes on as psycopg expects. With ``conn_ptr`` 0,
    rows are given one by one with :meth:`feed` instead (psycopg's row-at-a-time read)."""

    cdef void* conn
    cdef PQgetCopyData_t getcopydata
    cdef PQfreemem_t freemem
    cdef PQerrorMessage_t errormessage
    cdef PQgetResult_t getresult
    cdef PQresultErrorMessage_t resulterrormessage
    cdef PQclear_t clear
    cdef int kind
    cdef char* msg       # the message being parsed (libpq's buffer) and where
    cdef Py_ssize_t msg_len, msg_pos
    cdef bint header_seen
    cdef readonly bint done
    cdef object fed      # a fed row (bytes) kept alive while parsed
    cdef bint owns_msg
    # where parse_row writes
    cdef NameCodes variables, scenarios
    cdef long long citizen_limit
    cdef int32_t* r_citizen
    cdef int16_t* r_variable
    cdef int32_t* r_day
    cdef float* r_value
    cdef int8_t* r_bit
    cdef uint8_t* c_token
    cdef int64_t* c_row
    cdef IdBuffer c_ids
    cdef int64_t* c_offsets
    cdef int32_t* c_birth
    cdef uint8_t* c_consent
    cdef long long c_first_row

    def __cinit__(self, int kind, size_t conn_ptr=0, size_t getcopydata=0, size_t freemem=0, size_t errormessage=0,
                  size_t getresult=0, size_t resulterrormessage=0, size_t clear=0):
        if kind not in (RECORDS, CITIZENS, CARDS):
            raise ValueError("kind: 0 records, 1 citizens, 2 cards")
        self.kind = kind
        self.conn = <void*>conn_ptr
        self.getcopydata = <PQgetCopyData_t>getcopydata
        self.freemem = <PQfreemem_t>freemem
        self.errormessage = <PQerrorMessage_t>errormessage
        self.getresult = <PQgetResult_t>getresult
        self.resulterrormessage = <PQresultErrorMessage_t>resulterrormessage
        self.clear = <PQclear_t>clear
        if self.conn != NULL and (self.getcopydata == NULL or self.freemem == NULL or self.errormessage == NULL
                                  or self.getresult == NULL or self.resulterrormessage == NULL or self.clear == NULL):
            raise ValueError("PGCopyReader: a connection needs the addresses of the eight libpq functions")
        self.msg = NULL
        self.msg_len = self.msg_pos = 0
        self.header_seen = False
        self.done = False
        self.owns_msg = False

    def __dealloc__(self):
        self._release()
        free(self.c_ids.data)
        self.c_ids.data = NULL

    cdef void _release(self) noexcept:
        if self.msg != NULL and self.owns_msg:
            self.freemem(self.msg)
        self.msg = NULL
        self.owns_msg = False
        self.fed = None

    cdef int _header(self) noexcept nogil:
        """Skip the COPY header at the start of the stream; BAD if it is not one."""
        cdef int32_t ext
        if self.msg_len - self.msg_pos < 19 or memcmp(self.msg + self.msg_pos, PG_SIGNATURE, 11) != 0:
            return BAD
        ext = be32(self.msg + self.msg_pos + 15)
        if ext < 0 or self.msg_len - self.msg_pos - 19 < ext:
            return BAD
        self.msg_pos += 19 + ext
        self.header_seen = True
        return ROW

    cdef int _parse_row(self, Py_ssize_t i) noexcept nogil:
        """One tuple at msg_pos into slot ``i``: ROW, SKIPPED (a record dropped), TRAILER or
        BAD (not the shape this query's rows have)."""
        cdef const char* p = self.msg + self.msg_pos
        cdef const char* end = self.msg + self.msg_len
        cdef int16_t nf
        cdef int32_t n
        cdef long long row
        cdef int32_t code
        if end - p < 2:
            return BAD
        nf = be16(p)
        p += 2
        if nf == -1:
            self.msg_pos = self.msg_len
            return TRAILER
        if self.kind == RECORDS:
            if nf != 5:
                return BAD
            # citizen_row int8
            if end - p < 12 or be32(p) != 8:
                return BAD
            row = be64(p + 4)
            p += 12
            # variable text
            if end - p < 4:
                return BAD
            n = be32(p)
            if n < 0 or end - p - 4 < n:
                return BAD
            code = self.variables.find(p + 4, n)
            p += 4 + n
            # day int4, value float8
            if end - p < 8 + 12 or be32(p) != 4 or be32(p + 8) != 8:
                return BAD
            if code < 0 or row < 0 or row >= self.citizen_limit:
                # skip the rest of the tuple
                p += 20
                if end - p < 4:
                    return BAD
                n = be32(p)
                p += 4 + (n if n > 0 else 0)
                if p > end:
                    return BAD
                self.msg_pos = p - self.msg
                return SKIPPED
            self.r_citizen[i] = <int32_t>row
            self.r_variable[i] = <int16_t>code
            self.r_day[i] = be32(p + 4)
            self.r_value[i] = <float>bedouble(p + 12)
            p += 20
            # scenario text or NULL
            if end - p < 4:
                return BAD
            n = be32(p)
            p += 4
            if n < 0:
                self.r_bit[i] = -1
            else:
                if end - p < n:
                    return BAD
                self.r_bit[i] = <int8_t>self.scenarios.find(p, n)
                p += n
        elif self.kind == CARDS:
            if nf != 2 or end - p < 4 + 16 + 12 or be32(p) != 16 or be32(p + 20) != 8:
                return BAD
            memcpy(self.c_token + 16 * i, p + 4, 16)
            self.c_row[i] = be64(p + 24)
            p += 32
        else:
            return BAD  # citizens are parsed with the GIL (_parse_citizen)
        self.msg_pos = p - self.msg
        return ROW

    cdef int _parse_citizen(self, Py_ssize_t i) noexcept nogil:
        """One citizen's tuple into slot ``i``: ROW, TRAILER, BAD, NOT_DENSE or NO_MEMORY."""
        cdef const char* p = self.msg + self.msg_pos
        cdef const char* end = self.msg + self.msg_len
        cdef int16_t nf
        cdef int32_t n
        if end - p < 2:
            return BAD
        nf = be16(p)
        p += 2
        if nf == -1:
            self.msg_pos = self.msg_len
            return TRAILER
        if nf != 4 or end - p < 12 or be32(p) != 8:
            return BAD
        if be64(p + 4) != self.c_first_row + i:
            return NOT_DENSE
        p += 12
        n = be32(p)
        if n < 0 or end - p - 4 < n:
            return BAD
        if ids_add(&self.c_ids, p + 4, n) < 0:
            return NO_MEMORY
        self.c_offsets[i + 1] = self.c_ids.used
        p += 4 + n
        if end - p < 8 + 6 or be32(p) != 4 or be32(p + 8) != 2:
            return BAD
        self.c_birth[i] = be32(p + 4)
        self.c_consent[i] = 1 if be16(p + 12) else 0
        p += 14
        self.msg_pos = p - self.msg
        return ROW

    cdef int _next(self) noexcept nogil:
        """Make sure a message with unparsed bytes is at hand: 1 yes, 0 the COPY ended
        without a trailer, -2 an error (libpq's), 2 waiting for :meth:`feed`."""
        cdef char* buf = NULL
        cdef int got
        if self.msg != NULL and self.msg_pos < self.msg_len:
            return 1
        if self.msg != NULL:
            if self.owns_msg:
                self.freemem(self.msg)
            self.msg = NULL
            self.owns_msg = False
        if self.conn == NULL:
            return 2
        got = self.getcopydata(self.conn, &buf, 0)
        if got == -1:
            return 0
        if got < 0 or buf == NULL:
            return -2
        self.msg, self.msg_len, self.msg_pos, self.owns_msg = buf, got, 0, True
        return 1

    cdef _fail(self, int why):
        cdef void* res
        cdef const char* text
        self._release()
        if why == -2 and self.conn != NULL:
            return BulkReadError(f"COPY failed: {self.errormessage(self.conn).decode(errors='replace').strip()}")
        if why == 0:
            # The server ended the COPY early: its error is in the results that follow.
            messages = []
            if self.conn != NULL:
                while True:
                    with nogil:
                        res = self.getresult(self.conn)
                    if res == NULL:
                        break
                    text = self.resulterrormessage(res)
                    if text != NULL and text[0] != 0:
                        messages.append(text.decode(errors="replace").strip())
                    self.clear(res)
            return BulkReadError("COPY ended before its trailer: " + ("; ".join(messages) or "no error reported"))
        return BulkReadError("COPY data is not in the expected binary row format")

    cdef Py_ssize_t _drain(self, Py_ssize_t room, Py_ssize_t* skipped, int* status) noexcept nogil:
        """Parse rows into slots 0..room-1. ``status``: 1 room filled, 2 trailer (done),
        3 needs feed, else an error code for _fail."""
        cdef Py_ssize_t i = 0
        cdef int got, r
        while i < room:
            got = self._next()
            if got != 1:
                status[0] = 3 if got == 2 else got
                return i
            if not self.header_seen:
                if self._header() == BAD:
                    status[0] = BAD + 10
                    return i
                continue
            r = self._parse_row(i)
            if r == ROW:
                i += 1
            elif r == SKIPPED:
                skipped[0] += 1
            elif r == TRAILER:
                self.done = True
                status[0] = 2
                return i
            else:
                status[0] = BAD + 10
                return i
        status[0] = 1
        return i

    def feed(self, data):
        """One COPY message (psycopg's ``Copy.read()``), when there is no connection to
        drain: parsed by the next ``fill_*`` call, which must leave room for it."""
        if self.conn != NULL:
            raise ValueError("feed: this reader drains its connection itself")
        if self.msg != NULL and self.msg_pos < self.msg_len:
            raise ValueError("feed: the previous message is not parsed yet")
        self._release()
        self.fed = bytes(data)
        self.msg = <char*><const char*>self.fed
        self.msg_len = len(self.fed)
        self.msg_pos = 0
        self.owns_msg = False

    def fill_records(self, NameCodes variables not None, NameCodes scenarios not None, int32_t[::1] citizen, int16_t[::1] variable,
                     int32_t[::1] day, float[::1] value, int8_t[::1] bit, long long citizen_limit):
        """As SQLiteQuery.fill_records. Returns (rows written, rows skipped, state): state
        "full", "done" (the trailer: let psycopg read the end of the COPY) or "feed"."""
        cdef Py_ssize_t room = citizen.shape[0], n, skipped = 0
        cdef int status = 1
        if variable.shape[0] < room or day.shape[0] < room or value.shape[0] < room or bit.shape[0] < room:
            raise ValueError("fill_records: the arrays must have the same length")
        if self.kind != RECORDS:
            raise ValueError("fill_records on a reader of another kind")
        if self.done or room == 0:
            return 0, 0, "done" if self.done else "full"
        self.variables, self.scenarios, self.citizen_limit = variables, scenarios, citizen_limit
        self.r_citizen, self.r_variable, self.r_day, self.r_value, self.r_bit = (
            &citizen[0], &variable[0], &day[0], &value[0], &bit[0])
        with nogil:
            n = self._drain(room, &skipped, &status)
        return n, skipped, self._state(status)

    def fill_cards(self, uint8_t[:, ::1] tokens, int64_t[::1] rows):
        """Card rows into ``tokens`` (n, 16) and ``rows``: (rows written, state)."""
        cdef Py_ssize_t room = tokens.shape[0], n, skipped = 0
        cdef int status = 1
        if self.kind != CARDS or tokens.shape[1] != 16 or rows.shape[0] < room:
            raise ValueError("fill_cards: a cards reader, tokens (n, 16) and n rows")
        if self.done or room == 0:
            return 0, "done" if self.done else "full"
        self.c_token, self.c_row = &tokens[0, 0], &rows[0]
        with nogil:
            n = self._drain(room, &skipped, &status)
        return n, self._state(status)

    def fill_citizens(self, long long first_row, Py_ssize_t count):
        """The next ``count`` citizens, rows ``first_row`` on: (ids, offsets, birth_day,
        consent, state) as SQLiteQuery.fill_citizens gives them. Fewer than ``count`` only
        at "done" or "feed"."""
        if self.kind != CITIZENS:
            raise ValueError("fill_citizens on a reader of another kind")
        birth = np.empty(count, np.int32)
        consent = np.empty(count, np.uint8)
        offsets = np.zeros(count + 1, np.int64)
        cdef int32_t[::1] bv = birth
        cdef uint8_t[::1] cv = consent
        cdef int64_t[::1] ov = offsets
        free(self.c_ids.data)
        self.c_ids.data, self.c_ids.used, self.c_ids.cap = NULL, 0, 0
        self.c_first_row = first_row
        self.c_offsets = &ov[0]
        if count:
            self.c_birth, self.c_consent = &bv[0], &cv[0]
        cdef Py_ssize_t i = 0
        cdef int got, r = ROW, status = 1
        with nogil:
            while i < count and not self.done:
                got = self._next()
                if got != 1:
                    status = 3 if got == 2 else got
                    break
                if not self.header_seen:
                    if self._header() == BAD:
                        status = BAD + 10
                        break
                    continue
                r = self._parse_citizen(i)
                if r == ROW:
                    i += 1
                elif r == TRAILER:
                    self.done = True
                    status = 2
                else:
                    status = BAD + 10
                    break
        data = ids_take(&self.c_ids)
        if r == NOT_DENSE:
            self._release()
            raise BulkReadError(f"citizen rows are not dense at row {first_row + i}")
        if r == NO_MEMORY:
            self._release()
            raise MemoryError("citizen ids")
        state = self._state(status)
        return data, offsets[:i + 1], birth[:i], consent[:i], state

    def finish(self):
        """Read on to the COPY's trailer, which must come next (no row left): "done", or
        "feed" when it needs a message :meth:`feed` gives."""
        cdef int got
        while not self.done:
            got = self._next()
            if got != 1:
                return self._state(3 if got == 2 else got)
            if not self.header_seen:
                if self._header() == BAD:
                    raise self._fail(BAD + 10)
                continue
            if self.msg_len - self.msg_pos >= 2 and be16(self.msg + self.msg_pos) == -1:
                self.msg_pos = self.msg_len
                self.done = True
            else:
                self._release()
                raise BulkReadError("COPY has more rows than asked for")
        return "done"

    cdef object _state(self, int status):
        if status == 1:
            return "full"
        if status == 2:
            return "done"
        if status == 3:
            return "feed"
        raise self._fail(status)


# --- bucketing ------------------------------------------------------------------------------

def split_block(int32_t[::1] citizen, int16_t[::1] variable, int32_t[::1] day, float[::1] value,
                int8_t[::1] scenario, long long chunk, Py_ssize_t k):
    """A block of records reordered by chunk of citizens (``citizen_row // chunk``), stably
    (the records of one chunk keep their order), in one pass without the GIL: (citizen,
    variable, day, value, scenario, bounds), chunk ``j``'s records at ``bounds[j] ..
    bounds[j + 1] - 1``. Every row must be in ``0 .. k * chunk - 1``."""
    cdef Py_ssize_t n = citizen.shape[0], i, j
    if variable.shape[0] != n or day.shape[0] != n or value.shape[0] != n or scenario.shape[0] != n:
        raise ValueError("split_block: the arrays must have the same length")
    if chunk <= 0 or k <= 0:
        raise ValueError("split_block: chunk and k must be positive")
    out_c, out_v, out_d = np.empty(n, np.int32), np.empty(n, np.int16), np.empty(n, np.int32)
    out_val, out_s = np.empty(n, np.float32), np.empty(n, np.int8)
    bounds = np.zeros(k + 1, np.int64)
    fill = np.zeros(k, np.int64)
    cdef int32_t[::1] oc = out_c
    cdef int16_t[::1] ov = out_v
    cdef int32_t[::1] od = out_d
    cdef float[::1] oval = out_val
    cdef int8_t[::1] os = out_s
    cdef int64_t[::1] b = bounds
    cdef int64_t[::1] at = fill
    cdef long long limit = chunk * k
    cdef int bad = 0
    cdef long long bad_row = 0
    with nogil:
        for i in range(n):
            if citizen[i] < 0 or citizen[i] >= limit:
                bad = 1
                bad_row = citizen[i]
                break
            b[citizen[i] // chunk + 1] += 1
        if not bad:
            for j in range(k):
                b[j + 1] += b[j]
                at[j] = b[j]
            for i in range(n):
                j = citizen[i] // chunk
                oc[at[j]] = citizen[i]
                ov[at[j]] = variable[i]
                od[at[j]] = day[i]
                oval[at[j]] = value[i]
                os[at[j]] = scenario[i]
                at[j] += 1
    if bad:
        raise ValueError(f"split_block: citizen row {bad_row} is not in 0..{limit - 1}")
    return out_c, out_v, out_d, out_val, out_s, bounds


# --- citizen id hashes ----------------------------------------------------------------------
#
# The two keyed hashes a load makes of every citizen id (server/state.py citizen_key, the
# citizen index's key: BLAKE2b-128 personalised "qj-citizen-row"; server/keys.py subject_of,
# the audit log's pseudonym: the first 8 bytes of HMAC-SHA256(audit key, id), little-endian,
# 0 made 1), here in portable C over a buffer of ids, without the GIL: in Python they were
# the one per-citizen loop of a load (some 30 s of 12.5 M citizens on this machine). The
# test suite checks them against hashlib and hmac on many ids and keys.

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    static const uint32_t qj_k256[64] = {
        0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u, 0xab1c5ed5u,
        0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu, 0x9bdc06a7u, 0xc19bf174u,
        0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu, 0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau,
        0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u, 0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u,
        0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu, 0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u,
        0xa2bfe8a1u, 0xa81a664bu, 0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u,
        0x19a4c116u, 0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
        0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u, 0xc67178f2u};
    static const uint32_t qj_sha256_iv[8] = {
        0x6a09e667u, 0xbb67ae85u, 0x3c6ef372u, 0xa54ff53au, 0x510e527fu, 0x9b05688cu, 0x1f83d9abu, 0x5be0cd19u};

    #define QJ_ROTR32(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

    static void qj_sha256_block_c(uint32_t h[8], const unsigned char *p) {
        uint32_t w[64], a, b, c, d, e, f, g, k, t1, t2;
        int i;
        for (i = 0; i < 16; i++)
            w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) | ((uint32_t)p[4 * i + 2] << 8) | p[4 * i + 3];
        for (i = 16; i < 64; i++) {
            uint32_t s0 = QJ_ROTR32(w[i - 15], 7) ^ QJ_ROTR32(w[i - 15], 18) ^ (w[i - 15] >> 3);
            uint32_t s1 = QJ_ROTR32(w[i - 2], 17) ^ QJ_ROTR32(w[i - 2], 19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16] + s0 + w[i - 7] + s1;
        }
        a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; k = h[7];
        for (i = 0; i < 64; i++) {
            t1 = k + (QJ_ROTR32(e, 6) ^ QJ_ROTR32(e, 11) ^ QJ_ROTR32(e, 25)) + ((e & f) ^ (~e & g)) + qj_k256[i] + w[i];
            t2 = (QJ_ROTR32(a, 2) ^ QJ_ROTR32(a, 13) ^ QJ_ROTR32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
            k = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
        }
        h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += k;
    }


    #if defined(__x86_64__) || defined(__i386__)
    #include <immintrin.h>
    #include <cpuid.h>
    __attribute__((target("sha,sse4.1,ssse3")))
    static void qj_sha256_block_ni(uint32_t h[8], const unsigned char *p) {
        const __m128i mask = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
        __m128i tmp, s0, s1, msg, abef, cdgh, g[16];
        int j;
        tmp = _mm_loadu_si128((const __m128i *)&h[0]);
        s1 = _mm_loadu_si128((const __m128i *)&h[4]);
        tmp = _mm_shuffle_epi32(tmp, 0xB1);
        s1 = _mm_shuffle_epi32(s1, 0x1B);
        s0 = _mm_alignr_epi8(tmp, s1, 8);
        s1 = _mm_blend_epi16(s1, tmp, 0xF0);
        abef = s0; cdgh = s1;
        for (j = 0; j < 16; j++) {
            if (j < 4) g[j] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * j)), mask);
            else g[j] = _mm_sha256msg2_epu32(_mm_add_epi32(_mm_sha256msg1_epu32(g[j - 4], g[j - 3]),
                                                          _mm_alignr_epi8(g[j - 1], g[j - 2], 4)), g[j - 1]);
            msg = _mm_add_epi32(g[j], _mm_loadu_si128((const __m128i *)&qj_k256[4 * j]));
            s1 = _mm_sha256rnds2_epu32(s1, s0, msg);
            msg = _mm_shuffle_epi32(msg, 0x0E);
            s0 = _mm_sha256rnds2_epu32(s0, s1, msg);
        }
        s0 = _mm_add_epi32(s0, abef);
        s1 = _mm_add_epi32(s1, cdgh);
        tmp = _mm_shuffle_epi32(s0, 0x1B);
        s1 = _mm_shuffle_epi32(s1, 0xB1);
        s0 = _mm_blend_epi16(tmp, s1, 0xF0);
        s1 = _mm_alignr_epi8(s1, tmp, 8);
        _mm_storeu_si128((__m128i *)&h[0], s0);
        _mm_storeu_si128((__m128i *)&h[4], s1);
    }
    static int qj_sha_ni(void) {
        static int has = -1;
        if (has < 0) {
            unsigned a, b, c, d;
            int sse = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 19)) && (c & (1u << 9));
            has = sse && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 29));
        }
        return has;
    }
    #else
    static void qj_sha256_block_ni(uint32_t h[8], const unsigned char *p) { (void)h; (void)p; }
    static int qj_sha_ni(void) { return 0; }
    #endif

    /* The SHA extensions when the CPU has them (x86-64: SHA-NI), else portable C. */
    static int qj_portable = 0;  /* tests: the portable code even where SHA-NI is there */
    static void qj_sha256_block(uint32_t h[8], const unsigned char *p) {
        if (!qj_portable && qj_sha_ni()) qj_sha256_block_ni(h, p); else qj_sha256_block_c(h, p);
    }

    /* SHA-256 of (what ``state`` has absorbed: ``done`` bytes, a multiple of 64) + m[0..n). */
    static void qj_sha256_finish(const uint32_t state[8], uint64_t done, const unsigned char *m, size_t n,
                                 unsigned char out[32]) {
        uint32_t h[8];
        unsigned char last[128];
        uint64_t bits = (done + n) * 8;
        size_t rest, len, i;
        memcpy(h, state, sizeof h);
        while (n >= 64) { qj_sha256_block(h, m); m += 64; n -= 64; }
        rest = n;
        memset(last, 0, sizeof last);
        if (rest) memcpy(last, m, rest);
        last[rest] = 0x80;
        len = rest + 1 + 8 <= 64 ? 64 : 128;
        for (i = 0; i < 8; i++) last[len - 1 - i] = (unsigned char)(bits >> (8 * i));
        qj_sha256_block(h, last);
        if (len == 128) qj_sha256_block(h, last + 64);
        for (i = 0; i < 8; i++) {
            out[4 * i] = (unsigned char)(h[i] >> 24); out[4 * i + 1] = (unsigned char)(h[i] >> 16);
            out[4 * i + 2] = (unsigned char)(h[i] >> 8); out[4 * i + 3] = (unsigned char)h[i];
        }
    }

    /* HMAC-SHA256's two pads, absorbed once: ipad and opad states for ``key``. */
    static void qj_hmac_pads(const unsigned char *key, size_t n, uint32_t ipad[8], uint32_t opad[8]) {
        unsigned char k[64], block[64];
        int i;
        memset(k, 0, sizeof k);
        if (n > 64) qj_sha256_finish(qj_sha256_iv, 0, key, n, k);
        else if (n) memcpy(k, key, n);
        memcpy(ipad, qj_sha256_iv, 32);
        memcpy(opad, qj_sha256_iv, 32);
        for (i = 0; i < 64; i++) block[i] = k[i] ^ 0x36;
        qj_sha256_block(ipad, block);
        for (i = 0; i < 64; i++) block[i] = k[i] ^ 0x5c;
        qj_sha256_block(opad, block);
    }

    static uint64_t qj_subject(const uint32_t ipad[8], const uint32_t opad[8], const unsigned char *m, size_t n) {
        unsigned char inner[32], outer[32];
        uint64_t v = 0;
        int i;
        qj_sha256_finish(ipad, 64, m, n, inner);
        qj_sha256_finish(opad, 64, inner, 32, outer);
        for (i = 7; i >= 0; i--) v = (v << 8) | outer[i];
        return v ? v : 1;
    }

    static const uint64_t qj_b2_iv[8] = {
        0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
        0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
    static const unsigned char qj_b2_sigma[12][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
        {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
        {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
        {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
        {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

    #define QJ_ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
    #define QJ_B2G(a, b, c, d, x, y) do { \\
        v[a] = v[a] + v[b] + (x); v[d] = QJ_ROTR64(v[d] ^ v[a], 32); v[c] = v[c] + v[d]; v[b] = QJ_ROTR64(v[b] ^ v[c], 24); \\
        v[a] = v[a] + v[b] + (y); v[d] = QJ_ROTR64(v[d] ^ v[a], 16); v[c] = v[c] + v[d]; v[b] = QJ_ROTR64(v[b] ^ v[c], 63); \\
    } while (0)

    #define QJ_B2R(r) do { \\
        QJ_B2G(0, 4, 8, 12, m[qj_b2_sigma[r][0]], m[qj_b2_sigma[r][1]]); \\
        QJ_B2G(1, 5, 9, 13, m[qj_b2_sigma[r][2]], m[qj_b2_sigma[r][3]]); \\
        QJ_B2G(2, 6, 10, 14, m[qj_b2_sigma[r][4]], m[qj_b2_sigma[r][5]]); \\
        QJ_B2G(3, 7, 11, 15, m[qj_b2_sigma[r][6]], m[qj_b2_sigma[r][7]]); \\
        QJ_B2G(0, 5, 10, 15, m[qj_b2_sigma[r][8]], m[qj_b2_sigma[r][9]]); \\
        QJ_B2G(1, 6, 11, 12, m[qj_b2_sigma[r][10]], m[qj_b2_sigma[r][11]]); \\
        QJ_B2G(2, 7, 8, 13, m[qj_b2_sigma[r][12]], m[qj_b2_sigma[r][13]]); \\
        QJ_B2G(3, 4, 9, 14, m[qj_b2_sigma[r][14]], m[qj_b2_sigma[r][15]]); \\
    } while (0)

    static void qj_b2_block(uint64_t h[8], const unsigned char *p, uint64_t t, int last) {
        uint64_t v[16], m[16];
        int i, j;
        for (i = 0; i < 16; i++) {
            uint64_t w = 0;
            for (j = 7; j >= 0; j--) w = (w << 8) | p[8 * i + j];
            m[i] = w;
        }
        for (i = 0; i < 8; i++) { v[i] = h[i]; v[i + 8] = qj_b2_iv[i]; }
        v[12] ^= t;
        if (last) v[14] = ~v[14];
        QJ_B2R(0); QJ_B2R(1); QJ_B2R(2); QJ_B2R(3); QJ_B2R(4); QJ_B2R(5);
        QJ_B2R(6); QJ_B2R(7); QJ_B2R(8); QJ_B2R(9); QJ_B2R(10); QJ_B2R(11);
        for (i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
    }

    /* BLAKE2b with a 16-byte digest, no key, and personalisation ``person`` (16 bytes). */
    static void qj_blake2b_16(const unsigned char person[16], const unsigned char *m, size_t n, unsigned char out[16]) {
        uint64_t h[8], p0 = 0, p1 = 0;
        unsigned char last[128];
        uint64_t t = 0;
        int i;
        for (i = 7; i >= 0; i--) { p0 = (p0 << 8) | person[i]; p1 = (p1 << 8) | person[8 + i]; }
        for (i = 0; i < 8; i++) h[i] = qj_b2_iv[i];
        h[0] ^= 0x01010000ULL | 16;  /* digest length 16, key length 0, fanout 1, depth 1 */
        h[6] ^= p0;
        h[7] ^= p1;
        while (n > 128) { t += 128; qj_b2_block(h, m, t, 0); m += 128; n -= 128; }
        memset(last, 0, sizeof last);
        if (n) memcpy(last, m, n);
        t += n;
        qj_b2_block(h, last, t, 1);
        for (i = 0; i < 16; i++) out[i] = (unsigned char)(h[i / 8] >> (8 * (i % 8)));
    }
    """
    int qj_portable
    int qj_sha_ni() nogil
    void qj_hmac_pads(const unsigned char* key, size_t n, uint32_t* ipad, uint32_t* opad) nogil
    uint64_t qj_subject(const uint32_t* ipad, const uint32_t* opad, const unsigned char* m, size_t n) nogil
    void qj_blake2b_16(const unsigned char* person, const unsigned char* m, size_t n, unsigned char* out) nogil


def citizen_hashes(audit_key, const uint8_t[::1] ids, const int64_t[::1] offsets, person):
    """Of the ids ``ids[offsets[i]:offsets[i + 1]]`` (UTF-8): (the citizen-index keys, uint8
    (n, 16): BLAKE2b-128 personalised ``person``; the audit subjects, uint64: HMAC-SHA256
    with ``audit_key``, first 8 bytes little-endian, 0 made 1)."""
    cdef bytes key = bytes(audit_key)
    cdef bytes pers = bytes(person).ljust(16, b"\0")
    if len(pers) != 16:
        raise ValueError("person: at most 16 bytes")
    cdef Py_ssize_t n = offsets.shape[0] - 1, i
    if n < 0:
        raise ValueError("offsets: n + 1 of them")
    keys = np.empty((n, 16), np.uint8)
    subjects = np.empty(n, np.uint64)
    if n == 0:
        return keys, subjects
    if offsets[0] < 0 or offsets[n] > ids.shape[0]:
        raise ValueError("offsets: outside the ids")
    for i in range(n):
        if offsets[i + 1] < offsets[i]:
            raise ValueError("offsets: not increasing")
    cdef uint8_t[:, ::1] kv = keys
    cdef uint64_t[::1] sv = subjects
    cdef uint32_t ipad[8]
    cdef uint32_t opad[8]
    cdef const unsigned char* kp = key
    cdef const unsigned char* pp = pers
    cdef const unsigned char* base = &ids[0] if ids.shape[0] else <const unsigned char*>pp
    qj_hmac_pads(kp, len(key), ipad, opad)
    with nogil:
        for i in range(n):
            qj_blake2b_16(pp, base + offsets[i], offsets[i + 1] - offsets[i], &kv[i, 0])
            sv[i] = qj_subject(ipad, opad, base + offsets[i], offsets[i + 1] - offsets[i])
    return keys, subjects


def sha_extensions(use=None) -> bool:
    """Whether SHA-256 runs on the CPU's SHA extensions (x86-64 SHA-NI); ``use=False``
    forces the portable code (the test suite checks both), ``True`` allows the extensions
    again."""
    global qj_portable
    if use is not None:
        qj_portable = 0 if use else 1
    return not qj_portable and qj_sha_ni() != 0
