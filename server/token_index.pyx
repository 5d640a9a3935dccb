# Card-token index: 16-byte card tokens -> citizen rows, an open-addressing hash table
# with linear probing over a caller-owned numpy array (so the table can live in shared
# memory and every worker process reads the same one).
#
# A slot is 16 bytes, two 8-byte words: the token's first 8 bytes, then its bytes 12-15
# (the high half of the second 8) above the row (int32; -1: an empty slot). 96 bits of a
# token are kept, not 128: tokens are keyed hashes (uniform), so two of a city's 13 million
# share 96 bits with a chance of 1e-15, and an unknown token matches one with 2e-22; the
# row fits in the slot instead of a table of its own, 16 bytes a slot instead of 20 and one
# cache miss a probe instead of two.
#
# Pure C, nogil: `find` probes for one token; `lookup_batch` runs it over a packed buffer
# of N tokens (the BatchCheck request's bytes, straight from protobuf) without creating a
# Python object per token. Python: `TokenIndex` validates once and holds the array.
# `Checker` is the eligibility rule over the index and the state's gate words (a row's rule
# inputs packed into 8 bytes, `pack_gate`) and pseudonyms, prefetching a group of tokens'
# slots and rows at a time (a city's cards are random cache misses).
#
# Writers (inserts) must be serialised by the caller (the service holds a cross-process
# lock); readers take no lock. An insert writes a slot's first word, then (a release store)
# its second, which holds the row: a reader loads the second word first (an acquire load)
# and the first after it, so it never matches a slot whose first word is not yet written; a
# rebinding changes the second word alone. Aligned 8-byte stores are not torn on x86-64 and
# ARM64.

from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy

import numpy as np

# An empty slot has row -1. Tokens are keyed hashes or random (issue 4), so their first
# 8 bytes are already uniform; the multiply still spreads structured test tokens.
cdef uint64_t MIX = 0x9E3779B97F4A7C15ULL
# The kept half of a token's second word, and the row below it.
cdef uint64_t KEY_HI = 0xFFFFFFFF00000000ULL
cdef uint64_t ROW_BITS = 0xFFFFFFFFULL


cdef extern from *:
    """
    static inline uint64_t qj_load_acquire(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void qj_store_release(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
    """
    uint64_t qj_load_acquire(const uint64_t* p) noexcept nogil
    void qj_store_release(uint64_t* p, uint64_t v) noexcept nogil


cdef inline int32_t slot_row(uint64_t word) noexcept nogil:
    return <int32_t>(word & ROW_BITS)


cdef extern from *:
    """
    static inline Py_ssize_t qj_range(uint64_t h, Py_ssize_t cap) {
        return (Py_ssize_t)(((unsigned __int128)h * (uint64_t)cap) >> 64);
    }
    """
    Py_ssize_t qj_range(uint64_t h, Py_ssize_t cap) noexcept nogil


cdef inline Py_ssize_t home(uint64_t k0, Py_ssize_t cap) noexcept nogil:
    """Where a token's probe starts: the hash of its first half, mapped onto any capacity by
    a multiply (Lemire's range reduction), so the table need not be a power of two."""
    return qj_range(k0 * MIX, cap)


cdef inline Py_ssize_t probe(const uint64_t* slots, Py_ssize_t cap, Py_ssize_t slot, uint64_t k0,
                             uint64_t k1) noexcept nogil:
    """From ``slot`` on: the token's slot, or the empty slot where it would go."""
    cdef uint64_t word
    k1 &= KEY_HI
    while True:
        word = qj_load_acquire(&slots[2 * slot + 1])  # first: the row that publishes the slot
        if slot_row(word) < 0:
            return slot
        if slots[2 * slot] == k0 and (word & KEY_HI) == k1:
            return slot
        slot += 1
        if slot == cap:
            slot = 0


cdef inline Py_ssize_t find(const uint64_t* slots, Py_ssize_t cap, uint64_t k0, uint64_t k1) noexcept nogil:
    """Slot of the token, or of the empty slot where it would go."""
    return probe(slots, cap, home(k0, cap), k0, k1)


cdef void lookup_many(const uint64_t* slots, Py_ssize_t cap, const unsigned char* tokens, Py_ssize_t n,
                      int32_t* out) noexcept nogil:
    cdef Py_ssize_t i, slot
    cdef uint64_t k[2]
    for i in range(n):
        memcpy(k, tokens + 16 * i, 16)
        slot = find(slots, cap, k[0], k[1])
        out[i] = slot_row(slots[2 * slot + 1])


class TokenIndexFull(RuntimeError):
    """The index reached its load limit; rebuild it with a larger capacity."""


cdef class TokenIndex:
    """Card token -> citizen row.

        >>> idx = TokenIndex.allocate(100)
        >>> idx.insert(b"0123456789abcdef", 7)
        True
        >>> idx.get(b"0123456789abcdef"), idx.get(b"fedcba9876543210")
        (7, -1)
        >>> idx.lookup_batch(b"0123456789abcdef" * 2).tolist()
        [7, 7]
    """

    cdef readonly object slots  # uint64 (capacity, 2): the slots (module comment)
    cdef readonly object meta   # int64 (1,): the number of tokens (shared like the table)
    cdef uint64_t* s
    cdef int64_t* count
    cdef Py_ssize_t cap
    cdef Py_ssize_t limit

    def __cinit__(self, slots, meta):
        """On ``slots`` as they are (a new table: all zero, then :meth:`clear`)."""
        if not isinstance(slots, np.ndarray) or slots.dtype != np.uint64 or slots.ndim != 2 or slots.shape[1] != 2:
            raise TypeError("slots: expected a uint64 array of shape (capacity, 2)")
        cap = slots.shape[0]
        if cap < 2:
            raise ValueError(f"capacity must be at least 2, got {cap}")
        if not (slots.flags.c_contiguous and slots.flags.writeable):
            raise ValueError("slots must be C-contiguous and writeable")
        if not isinstance(meta, np.ndarray) or meta.dtype != np.int64 or meta.shape != (1,):
            raise TypeError("meta: expected an int64 array of shape (1,)")
        cdef uint64_t[:, ::1] sv = slots
        cdef int64_t[::1] mv = meta
        self.slots, self.meta = slots, meta
        self.s, self.count = &sv[0, 0], &mv[0]
        self.cap = cap
        self.limit = cap * 7 // 10  # linear probing stays short below 70 % load

    @property
    def rows(self):
        """Each slot's row (-1: empty), a strided int32 view into the slots (writable)."""
        return self.slots.view(np.int32)[:, 2 if np.little_endian else 3]

    @staticmethod
    def capacity_for(n: int) -> int:
        """The capacity holding n tokens at the load limit (7 in 10 slots used), rounded up
        to a whole cache line of rows: any size, not the next power of two (at 13 million
        tokens that would be 33.5 million slots, 2.6 times the tokens, instead of 1.4)."""
        return max(16, -(-(n * 10 // 7 + 1) // 16) * 16)

    @classmethod
    def allocate(cls, n: int):
        index = cls(np.zeros((TokenIndex.capacity_for(n), 2), np.uint64), np.zeros(1, np.int64))
        index.clear()
        return index

    def __len__(self):
        return self.count[0]

    @property
    def capacity(self):
        return self.cap

    def insert(self, token, int row):
        """Bind token to row (rebinding an existing token). Returns True if it was new."""
        cdef const unsigned char[::1] t = _token(token)
        cdef uint64_t kk[2]
        memcpy(kk, &t[0], 16)
        if row < 0:
            raise ValueError(f"row must be >= 0, got {row}")
        if self.count[0] >= self.limit:
            self._check_room(1)
        return self._put(kk[0], kk[1], row)

    cdef bint _put(self, uint64_t k0, uint64_t k1, int32_t row) noexcept nogil:
        cdef Py_ssize_t slot = find(self.s, self.cap, k0, k1)
        cdef bint new = slot_row(self.s[2 * slot + 1]) < 0
        if new:
            self.s[2 * slot] = k0
        qj_store_release(&self.s[2 * slot + 1], (k1 & KEY_HI) | (<uint64_t><uint32_t>row))
        if new:
            self.count[0] += 1
        return new

    def clear(self):
        """Forget every token (a reload; not while readers are being served)."""
        self.rows[:] = -1  # the keys left in an empty slot are never compared
        self.count[0] = 0

    def _check_room(self, n):
        if self.count[0] + n > self.limit:
            raise TokenIndexFull(
                f"token index full: {self.count[0]} + {n} tokens exceed {self.limit} "
                f"(capacity {self.cap}); rebuild with a larger capacity"
            )

    def insert_many(self, tokens, rows):
        """Bulk insert: tokens uint8 (n, 16), rows (n,). Returns how many were new."""
        tokens = np.ascontiguousarray(tokens, dtype=np.uint8)
        if tokens.ndim != 2 or tokens.shape[1] != 16:
            raise ValueError(f"tokens: expected shape (n, 16), got {tokens.shape}")
        cdef const int32_t[::1] rv = np.ascontiguousarray(rows, dtype=np.int32)
        cdef Py_ssize_t i, n = tokens.shape[0], added = 0
        if rv.shape[0] != n:
            raise ValueError(f"rows: expected {n} rows, got {rv.shape[0]}")
        if n and np.min(rv) < 0:
            raise ValueError("rows must be >= 0")
        self._check_room(n)
        cdef const unsigned char[:, ::1] t = tokens
        cdef uint64_t kk[2]
        with nogil:
            for i in range(n):
                memcpy(kk, &t[i, 0], 16)
                added += self._put(kk[0], kk[1], rv[i])
        return added

    def get(self, token) -> int:
        """Row of the token, or -1."""
        cdef const unsigned char[::1] t = _token(token)
        cdef uint64_t kk[2]
        memcpy(kk, &t[0], 16)
        return slot_row(self.s[2 * find(self.s, self.cap, kk[0], kk[1]) + 1])

    def lookup_batch(self, tokens, out=None):
        """Rows of N packed 16-byte tokens (bytes or a uint8 buffer); -1 for unknown."""
        cdef const unsigned char[::1] buf = np.frombuffer(tokens, dtype=np.uint8) if isinstance(tokens, (bytes, bytearray, memoryview)) else tokens
        if buf.shape[0] % 16:
            raise ValueError(f"card_tokens: {buf.shape[0]} bytes is not a whole number of 16-byte tokens")
        cdef Py_ssize_t n = buf.shape[0] // 16
        out = _out(out, n, np.int32, "rows")
        cdef int32_t[::1] o = out
        if n:
            with nogil:
                lookup_many(self.s, self.cap, &buf[0], n, &o[0])
        return out


cdef _out(out, Py_ssize_t n, dtype, str what):
    """``out`` if given (it must hold n), else a new array of n."""
    if out is None:
        return np.empty(n, dtype)
    if len(out) != n:
        raise ValueError(f"out: expected {n} {what}, got {len(out)}")
    return out


cdef const unsigned char[::1] _token(token):
    if not isinstance(token, (bytes, bytearray)) or len(token) != 16:
        raise ValueError(f"card_token: expected 16 bytes, got {len(token) if isinstance(token, (bytes, bytearray)) else type(token).__name__}")
    return np.frombuffer(token, dtype=np.uint8)


# --- the compiled eligibility check -------------------------------------------------------
# Outcome codes: the values of qianjiang.v1.Outcome and server/scenarios.py::Outcome (a test
# holds them equal). FLAG_HARD_RULE is kernel/columns.py's bit.
cdef enum:
    ALLOW = 1
    DENY_BELOW_THRESHOLD = 2
    DENY_HARD_RULE = 3
    DENY_UNPAID_DEFAULT = 4
    UNKNOWN_CARD = 5
    NOT_AUTHORISED = 6
    UNDER_18 = 7
    FLAG_HARD_RULE = 1

# A row's gate word: everything the rule reads of a citizen but the pseudonym, in 8 bytes, so
# a check costs one cache miss for them instead of five (one per column), and a writer
# changes them with one aligned 8-byte store that no reader can see half done.
#   bits  0-15  score (int16; -1: no score)      bits 16-31  unpaid defaults, a bit a scenario
#   bits 32-47  consent for each scenario (server/consent.py: the blanket, but for the
#               scenarios whose setting differs)
#   bit   48    adult                            bit  49     the blanket consent stands
#   bit   50    an active serious record (FLAG_HARD_RULE)
DEF DEFAULTS_SHIFT = 16
DEF SCENARIO_CONSENT_SHIFT = 32
DEF ADULT_BIT = 48
DEF CONSENT_BIT = 49
DEF HARD_RULE_BIT = 50
#: Scenarios a gate word has a default bit and a consent bit for (server/consent.py MAX_SCENARIOS).
MAX_GATE_SCENARIOS = 16


cdef inline uint64_t gate_word(unsigned char adult, unsigned char consent, short score, unsigned char flags,
                               unsigned int defaults, unsigned int exceptions) noexcept nogil:
    cdef uint64_t scenario_consent = ((0xFFFF if consent != 0 else 0) ^ (exceptions & 0xFFFF))
    return (<uint64_t><unsigned short>score | <uint64_t>(defaults & 0xFFFF) << DEFAULTS_SHIFT
            | scenario_consent << SCENARIO_CONSENT_SHIFT
            | <uint64_t>(adult != 0) << ADULT_BIT | <uint64_t>(consent != 0) << CONSENT_BIT
            | <uint64_t>((flags & FLAG_HARD_RULE) != 0) << HARD_RULE_BIT)


def pack_gate(adult, consent, score, flags, defaults, out=None, consent_except=None):
    """The gate words of rows from their columns (uint8 adult and consent, int16 score, uint8
    flags, uint32 defaults, uint32 consent exceptions: server/state.py's; no exceptions when
    None). ``out`` (uint64, same length), if given, is written in place, one 8-byte store a
    row: how the serving state refreshes its gate.

        >>> g = pack_gate(np.array([1], np.uint8), np.array([1], np.uint8), np.array([612], np.int16),
        ...               np.zeros(1, np.uint8), np.array([4], np.uint32))
        >>> hex(int(g[0]))
        '0x3ffff00040264'
    """
    cdef const unsigned char[::1] a = adult
    cdef const unsigned char[::1] c = consent
    cdef const short[::1] s = score
    cdef const unsigned char[::1] f = flags
    cdef const unsigned int[::1] d = defaults
    cdef Py_ssize_t i, n = a.shape[0]
    cdef const unsigned int[::1] x = np.zeros(n, np.uint32) if consent_except is None else consent_except
    if not (c.shape[0] == s.shape[0] == f.shape[0] == d.shape[0] == x.shape[0] == n):
        raise ValueError("the columns must have one length")
    out = _out(out, n, np.uint64, "gate words")
    cdef uint64_t[::1] o = out
    with nogil:
        for i in range(n):
            o[i] = gate_word(a[i], c[i], s[i], f[i], d[i], x[i])
    return out


cdef extern from *:
    void prefetch "__builtin_prefetch"(const void* addr) noexcept nogil

# A batch's tokens are random cards of a whole city: each probe and each column read is a
# cache miss. Tokens go through in groups of CHUNK, in three passes: hash and prefetch the
# slots, probe and prefetch the row's columns, then apply the rule, so the misses of a group
# overlap instead of queueing one after another (about 2x on 100,000 citizens, more on a city).
DEF CHUNK = 16
# Batches from this many tokens on (a few hundred microseconds) release the GIL.
DEF NOGIL_FROM = 16384


cdef Py_ssize_t check_many(
    const uint64_t* slots, Py_ssize_t cap,
    const unsigned char* tokens, Py_ssize_t n, const uint64_t* gate, const uint64_t* subject,
    int min_score, bint pay_later, int default_bit, int consent_bit,
    unsigned char* outcomes, uint64_t* subjects_out, int64_t* counts,
) noexcept nogil:
    """Outcome and subject of each token; sets counts[v] (8 entries) to the number of
    tokens with outcome v and returns the number allowed."""
    cdef Py_ssize_t base, i, m, slot
    counts[:8] = [0, 0, 0, 0, 0, 0, 0, 0]
    cdef Py_ssize_t homes[CHUNK]
    cdef int32_t found[CHUNK]
    cdef int32_t row
    cdef uint64_t k[2]
    cdef uint64_t g
    cdef unsigned char o
    # the scenario's own consent bit, or (-1) the blanket's
    cdef int consent_at = CONSENT_BIT if consent_bit < 0 else SCENARIO_CONSENT_SHIFT + consent_bit
    for base in range(0, n, CHUNK):
        m = min(CHUNK, n - base)
        for i in range(m):
            memcpy(k, tokens + 16 * (base + i), 8)
            slot = home(k[0], cap)
            homes[i] = slot
            prefetch(&slots[2 * slot])
        for i in range(m):
            memcpy(k, tokens + 16 * (base + i), 16)
            row = slot_row(slots[2 * probe(slots, cap, homes[i], k[0], k[1]) + 1])
            found[i] = row
            if row >= 0:
                prefetch(&gate[row])
                prefetch(&subject[row])
        for i in range(m):
            row = found[i]
            if row < 0:
                o = UNKNOWN_CARD
                subjects_out[base + i] = 0
            else:
                subjects_out[base + i] = subject[row]
                g = gate[row]  # one load: the row as one writer left it
                # precedence (proto/qianjiang/v1/eligibility.proto, the same in every API):
                # not authorised (before the age: without consent nothing about the person is
                # disclosed), under 18, (pay-later) serious record, unpaid default, threshold
                if not (g >> consent_at) & 1:
                    o = NOT_AUTHORISED
                elif not (g >> ADULT_BIT) & 1:
                    o = UNDER_18
                elif pay_later and (g >> HARD_RULE_BIT) & 1:
                    o = DENY_HARD_RULE
                elif pay_later and (g >> (DEFAULTS_SHIFT + default_bit)) & 1:
                    o = DENY_UNPAID_DEFAULT
                elif <short>(g & 0xFFFF) >= min_score:
                    o = ALLOW
                else:
                    o = DENY_BELOW_THRESHOLD
            outcomes[base + i] = o
            counts[o] += 1
    return counts[ALLOW]


def check_tokens(TokenIndex index, tokens, adult, consent, score, flags, defaults, subject,
                 int min_score, bint pay_later, int default_bit, int consent_bit=-1, consent_except=None):
    """Look up N packed 16-byte tokens and apply one scenario's rule to each, in one pass
    without the GIL. Returns (outcomes uint8 (N,), subjects uint64 (N,), allowed count):
    the subjects are the audit log's pseudonyms (0 for an unknown card).

    ``adult``, ``consent``, ``score``, ``flags``, ``defaults``, ``subject`` are the serving
    state's columns (server/state.py), indexed by citizen row. The service binds its gate
    words and pseudonyms once (:class:`Checker`); this packs the gate for one call."""
    gate = pack_gate(adult, consent, score, flags, defaults, consent_except=consent_except)
    return Checker(index, gate, subject).check(tokens, min_score, pay_later, default_bit, consent_bit=consent_bit)


cdef _check_bits(bint pay_later, int default_bit, int consent_bit):
    if pay_later and not 0 <= default_bit < MAX_GATE_SCENARIOS:
        raise ValueError(f"default_bit: {default_bit} is outside [0, {MAX_GATE_SCENARIOS})")
    if not -1 <= consent_bit < MAX_GATE_SCENARIOS:
        raise ValueError(f"consent_bit: {consent_bit} is outside [-1, {MAX_GATE_SCENARIOS})")


cdef class Checker:
    """The rule bound once to an index, the rows' gate words (:func:`pack_gate`) and their
    pseudonyms (the serving state's shared arrays, read as writers update them): a call then
    costs no array conversions (a single gate check is most of the traffic).

        >>> idx = TokenIndex.allocate(4); idx.insert(b"0123456789abcdef", 0)
        True
        >>> one = np.ones(1, np.uint8)
        >>> gate = pack_gate(one, one, np.array([700], np.int16), np.zeros(1, np.uint8), np.zeros(1, np.uint32))
        >>> chk = Checker(idx, gate, np.array([42], np.uint64))
        >>> chk.check_one(b"0123456789abcdef", 581, False, 0), chk.check_one(b"x" * 16, 581, False, 0)
        ((1, 42), (5, 0))
    """

    cdef TokenIndex index
    cdef object arrays  # keeps the gate and the pseudonyms alive
    cdef const uint64_t* gate
    cdef const uint64_t* subj

    def __cinit__(self, TokenIndex index, gate, subject):
        cdef const uint64_t[::1] g = gate
        cdef const uint64_t[::1] subj = subject
        if g.shape[0] != subj.shape[0]:
            raise ValueError(f"gate and subject must have one length, got {g.shape[0]} and {subj.shape[0]}")
        if g.shape[0] == 0:
            raise ValueError("the columns are empty")
        self.index = index
        self.arrays = (gate, subject)
        self.gate, self.subj = &g[0], &subj[0]

    def check_one(self, token, int min_score, bint pay_later, int default_bit, int consent_bit=-1):
        """(outcome, subject) of one 16-byte token; ``consent_bit``: the scenario's consent
        bit (server/consent.py), -1 for the blanket consent."""
        if not isinstance(token, bytes) or len(token) != 16:
            raise ValueError("card_token: expected 16 bytes")
        _check_bits(pay_later, default_bit, consent_bit)
        cdef const unsigned char* t = token
        cdef unsigned char o
        cdef uint64_t subj
        cdef int64_t counts[8]
        self._run(t, 1, min_score, pay_later, default_bit, consent_bit, &o, &subj, counts)
        return o, subj

    cdef Py_ssize_t _run(self, const unsigned char* tokens, Py_ssize_t n, int min_score, bint pay_later,
                         int default_bit, int consent_bit, unsigned char* outcomes, uint64_t* subjects,
                         int64_t* counts) noexcept nogil:
        return check_many(self.index.s, self.index.cap, tokens, n, self.gate, self.subj,
                          min_score, pay_later, default_bit, consent_bit, outcomes, subjects, counts)

    def check(self, tokens, int min_score, bint pay_later, int default_bit, counts=None, int consent_bit=-1):
        """(outcomes uint8 (N,), subjects uint64 (N,), allowed) of N packed tokens. ``counts``,
        if given (int64, 8 entries), receives how many tokens got each outcome value: the
        decision metrics then need no pass of their own. A large batch runs without the GIL;
        a station's batch is over in microseconds, less than handing the GIL over would cost."""
        cdef const unsigned char[::1] buf = np.frombuffer(tokens, dtype=np.uint8) if isinstance(tokens, (bytes, bytearray, memoryview)) else tokens
        if buf.shape[0] % 16:
            raise ValueError(f"card_tokens: {buf.shape[0]} bytes is not a whole number of 16-byte tokens")
        _check_bits(pay_later, default_bit, consent_bit)
        cdef int64_t local[8]
        cdef int64_t[::1] cv
        cdef int64_t* c = local
        if counts is not None:
            cv = counts
            if cv.shape[0] != 8:
                raise ValueError(f"counts: expected 8 entries, got {cv.shape[0]}")
            c = &cv[0]
        cdef Py_ssize_t n = buf.shape[0] // 16
        outcomes = np.empty(n, np.uint8)
        subjects = np.empty(n, np.uint64)
        cdef unsigned char[::1] o = outcomes
        cdef uint64_t[::1] so = subjects
        cdef Py_ssize_t allowed = 0
        if n >= NOGIL_FROM:
            with nogil:
                allowed = self._run(&buf[0], n, min_score, pay_later, default_bit, consent_bit, &o[0], &so[0], c)
        elif n:
            allowed = self._run(&buf[0], n, min_score, pay_later, default_bit, consent_bit, &o[0], &so[0], c)
        else:
            c[:8] = [0, 0, 0, 0, 0, 0, 0, 0]  # an empty batch counts nothing
        return outcomes, subjects, allowed
