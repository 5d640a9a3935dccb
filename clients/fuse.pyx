# Binary fuse filters and the filter cascade of an offline gate's snapshot (issue 19;
# server/gate_snapshot.py builds them, clients/gate.py queries them; the design and its
# figures are in server/gate_snapshot.py's docstring and docs/offline_gates.md).
#
# A key is 96 bits of a card token: bytes 0-7 (``k0``, little-endian) and bytes 12-15 (``k1``),
# exactly the bits the server's token index keeps (server/token_index.pyx), so the enrolled
# universe is read straight out of the index and a gate keys a scanned token the same way.
#
# The filter is Graf & Lemire's 3-wise binary fuse filter (ACM JEA 2022, "Binary Fuse
# Filters: Fast and Smaller Than Xor Filters"; the construction follows their reference
# xor_singleheader/binary_fuse8_populate): an array of ``array_length`` fingerprints of ``bits``
# bits (1..32), a key is in it when the xor of its three slots equals its fingerprint. About
# 1.125 slots a key at a city's size (more for small sets), a false-positive rate of 2**-bits.
# The fingerprints are stored packed (bit offset i * bits, little-endian), read with one
# unaligned 8-byte load: 17-bit fingerprints cost 17 bits a slot, not 32.
#
# Hashing: h = murmur64(k0 ^ murmur64(k1 + seed)) with the filter's 64-bit seed (kept in the
# snapshot's manifest); the three slots and the fingerprint come from h as in the reference.
# numpy reference of all of it: tests/test_gate_filter.py.

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, calloc, free
from libc.math cimport log, floor, round as cround

import numpy as np

cdef extern from *:
    """
    static inline uint64_t qj_mulhi(uint64_t a, uint64_t b) { return (uint64_t)(((unsigned __int128)a * b) >> 64); }
    """
    uint64_t qj_mulhi(uint64_t a, uint64_t b) noexcept nogil

#: Most tries at a construction with fresh seeds (each fails with a tiny probability).
DEF MAX_TRIES = 100


cdef inline uint64_t murmur64(uint64_t h) noexcept nogil:
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    return h


cdef inline uint64_t key_hash(uint64_t k0, uint64_t k1, uint64_t seed) noexcept nogil:
    return murmur64(k0 ^ murmur64(k1 + seed))


cdef inline uint64_t splitmix(uint64_t* state) noexcept nogil:
    state[0] += 0x9E3779B97F4A7C15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef struct Fuse:
    uint64_t seed
    uint32_t seglen
    uint32_t seglen_mask
    uint32_t segcount_len
    uint32_t array_len
    int bits
    uint32_t fp_mask
    const uint8_t* data  # packed fingerprints, padded by 8 bytes


cdef inline uint32_t slot_of(const Fuse* f, int index, uint64_t h) noexcept nogil:
    cdef uint64_t s = qj_mulhi(h, f.segcount_len) + <uint64_t>index * f.seglen
    cdef uint64_t hh = h & ((1ULL << 36) - 1)
    s ^= (hh >> (36 - 18 * index)) & f.seglen_mask
    return <uint32_t>s


cdef inline uint32_t fingerprint(const Fuse* f, uint64_t h) noexcept nogil:
    return <uint32_t>((h ^ (h >> 32)) & f.fp_mask)


cdef inline uint32_t read_fp(const Fuse* f, uint32_t i) noexcept nogil:
    cdef uint64_t bit = <uint64_t>i * f.bits
    cdef uint64_t word
    memcpy(&word, f.data + (bit >> 3), 8)
    return <uint32_t>((word >> (bit & 7)) & f.fp_mask)


cdef inline bint fuse_contains(const Fuse* f, uint64_t k0, uint64_t k1) noexcept nogil:
    if f.array_len == 0:
        return False
    cdef uint64_t h = key_hash(k0, k1, f.seed)
    return (read_fp(f, slot_of(f, 0, h)) ^ read_fp(f, slot_of(f, 1, h)) ^ read_fp(f, slot_of(f, 2, h))) == fingerprint(f, h)


def geometry(int64_t n):
    """(segment_length, array_length, segment_count_length) of a 3-wise binary fuse filter of
    n keys (the reference's sizing; small sets get a floor so that they build)."""
    cdef int64_t seglen, capacity, segcount, array_len
    if n <= 0:
        return 0, 0, 0
    if n < 2:
        seglen = 4
    else:
        seglen = 1 << <int>floor(log(<double>n) / log(3.33) + 2.25)
    seglen = min(seglen, 262144)
    seglen = max(seglen, 4)
    cdef double factor = 2.0 if n < 2 else max(1.125, 0.875 + 0.25 * log(1000000.0) / log(<double>n))
    capacity = <int64_t>cround(<double>n * factor)
    capacity = max(capacity, 3 * seglen)
    segcount = (capacity + seglen - 1) // seglen - 2
    if segcount < 1:
        segcount = 1
    array_len = (segcount + 2) * seglen
    if array_len >= (1 << 32) - 1:
        raise ValueError(f"{n} keys are too many for one filter")
    return seglen, array_len, segcount * seglen


def packed_bytes(int64_t array_len, int bits) -> int:
    """Bytes of ``array_len`` packed ``bits``-bit fingerprints (without the 8 of padding)."""
    return (array_len * bits + 7) // 8


cdef class FuseFilter:
    """A 3-wise binary fuse filter over 96-bit keys, fingerprints packed ``bits`` bits each.

        >>> k0 = np.arange(1000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        >>> k1 = np.arange(1000, dtype=np.uint32)
        >>> f = FuseFilter.build(k0, k1, bits=17, seed=7)
        >>> bool(f.contains_keys(k0, k1).all())
        True
        >>> g = FuseFilter.from_parts(f.params(), f.payload())
        >>> bool((g.contains_keys(k0, k1) == 1).all()), g.n
        (True, 1000)
    """

    cdef Fuse f
    cdef readonly object data  # uint8, the packed fingerprints + 8 bytes of padding
    cdef readonly int64_t n     # keys it was built over

    @property
    def seed(self):
        return self.f.seed

    @property
    def bits(self):
        return self.f.bits

    @property
    def array_length(self):
        return self.f.array_len

    @property
    def nbytes(self):
        """The packed fingerprints' bytes (what a snapshot ships of this filter)."""
        return packed_bytes(self.f.array_len, self.f.bits)

    def params(self) -> dict:
        """What besides the payload a reader needs (the manifest keeps it)."""
        return {"n": int(self.n), "bits": int(self.f.bits), "seed": int(self.f.seed), "seglen": int(self.f.seglen),
                "array_length": int(self.f.array_len), "segment_count_length": int(self.f.segcount_len)}

    def payload(self) -> bytes:
        return bytes(self.data[: self.nbytes])

    cdef _bind(self, int64_t n, int bits, uint64_t seed, uint32_t seglen, uint32_t array_len, uint32_t segcount_len, data):
        if not 1 <= bits <= 32:
            raise ValueError(f"bits: expected 1..32, got {bits}")
        self.n = n
        self.data = data
        cdef uint8_t[::1] d = data
        self.f.seed = seed
        self.f.seglen = seglen
        self.f.seglen_mask = seglen - 1 if seglen else 0
        self.f.segcount_len = segcount_len
        self.f.array_len = array_len
        self.f.bits = bits
        self.f.fp_mask = <uint32_t>((1ULL << bits) - 1)
        self.f.data = &d[0]

    @staticmethod
    def from_parts(params: dict, payload):
        """A filter from its manifest entry and payload bytes; ValueError if they disagree."""
        try:
            n, bits, seed = int(params["n"]), int(params["bits"]), int(params["seed"])
            seglen, array_len, scl = int(params["seglen"]), int(params["array_length"]), int(params["segment_count_length"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"filter parameters: {exc}") from None
        if not 1 <= bits <= 32 or not 0 <= seed < 1 << 64 or n < 0:
            raise ValueError("filter parameters out of range")
        if (seglen, array_len, scl) != geometry(n):
            raise ValueError(f"filter geometry {seglen, array_len, scl} does not match {n} keys")
        size = packed_bytes(array_len, bits)
        if len(payload) != size:
            raise ValueError(f"filter payload: expected {size} bytes, got {len(payload)}")
        data = np.zeros(size + 8, np.uint8)
        data[:size] = np.frombuffer(payload, np.uint8)
        out = FuseFilter()
        out._bind(n, bits, seed, seglen, array_len, scl, data)
        return out

    @staticmethod
    def build(k0, k1, int bits=17, uint64_t seed=0):
        """The filter of the keys (k0 uint64, k1 uint32, one key each; duplicates allowed).
        ``seed`` starts the seed sequence (a failed try takes the next)."""
        cdef const uint64_t[::1] a = np.ascontiguousarray(k0, np.uint64)
        cdef const uint32_t[::1] b = np.ascontiguousarray(k1, np.uint32)
        if a.shape[0] != b.shape[0]:
            raise ValueError("k0 and k1 must have one length")
        if not 1 <= bits <= 32:
            raise ValueError(f"bits: expected 1..32, got {bits}")
        cdef int64_t n = a.shape[0]
        seglen, array_len, scl = geometry(n)
        out = FuseFilter()
        data = np.zeros(packed_bytes(array_len, bits) + 8, np.uint8)
        cdef uint64_t rng = seed ^ 0x726b2b9d438b9d4dULL
        out._bind(n, bits, splitmix(&rng), seglen, array_len, scl, data)
        if n == 0:
            return out
        cdef int rc
        cdef uint8_t[::1] d = data
        with nogil:
            rc = populate(&out.f, &a[0], &b[0], n, &rng, &d[0])
        if rc != 0:
            raise RuntimeError("binary fuse construction failed (too many duplicate keys?)")
        return out

    def contains_keys(self, k0, k1):
        """uint8 (n,): 1 where the filter holds key i."""
        cdef const uint64_t[::1] a = np.ascontiguousarray(k0, np.uint64)
        cdef const uint32_t[::1] b = np.ascontiguousarray(k1, np.uint32)
        cdef Py_ssize_t i, n = a.shape[0]
        out = np.empty(n, np.uint8)
        cdef uint8_t[::1] o = out
        with nogil:
            for i in range(n):
                o[i] = fuse_contains(&self.f, a[i], b[i])
        return out


cdef int populate(Fuse* f, const uint64_t* k0, const uint32_t* k1, int64_t size, uint64_t* rng,
                  uint8_t* packed) noexcept nogil:
    """The reference's construction (peeling), then the fingerprints packed into ``packed``.
    Returns 0, or -1 after MAX_TRIES failed seeds (or out of memory)."""
    cdef uint32_t capacity = f.array_len
    cdef uint64_t* order = <uint64_t*>calloc(size + 1, 8)
    cdef uint32_t* alone = <uint32_t*>malloc(<size_t>capacity * 4)
    cdef uint8_t* t2count = <uint8_t*>calloc(capacity, 1)
    cdef uint8_t* rev_h = <uint8_t*>malloc(size)
    cdef uint64_t* t2hash = <uint64_t*>calloc(capacity, 8)
    cdef uint32_t* fps = <uint32_t*>calloc(capacity, 4)
    cdef uint32_t block_bits = 1
    while (<uint32_t>1 << block_bits) < f.segcount_len // f.seglen:
        block_bits += 1
    cdef uint32_t block = <uint32_t>1 << block_bits
    cdef uint32_t* start = <uint32_t*>malloc(<size_t>block * 4)
    cdef int rc = -1
    cdef int loop
    cdef int64_t i
    cdef uint64_t h, seg, maskblock = block - 1
    cdef uint32_t h0, h1, h2, index, other, q, stack, duplicates
    cdef uint32_t h012[5]
    cdef uint8_t found
    cdef bint error
    cdef uint64_t bit, word, v
    if order == NULL or alone == NULL or t2count == NULL or rev_h == NULL or t2hash == NULL or fps == NULL or start == NULL:
        rc = -1
    else:
        order[size] = 1
        for loop in range(MAX_TRIES):
            if loop:
                f.seed = splitmix(rng)
                memset(order, 0, 8 * size)
                memset(t2count, 0, capacity)
                memset(t2hash, 0, 8 * <size_t>capacity)
            for i in range(block):
                start[i] = <uint32_t>((<uint64_t>i * size) >> block_bits)
            for i in range(size):
                h = key_hash(k0[i], k1[i], f.seed)
                seg = h >> (64 - block_bits)
                while order[start[seg]] != 0:
                    seg = (seg + 1) & maskblock
                order[start[seg]] = h
                start[seg] += 1
            error = False
            duplicates = 0
            for i in range(size):
                h = order[i]
                h0 = slot_of(f, 0, h)
                h1 = slot_of(f, 1, h)
                h2 = slot_of(f, 2, h)
                t2count[h0] += 4
                t2hash[h0] ^= h
                t2count[h1] += 4
                t2count[h1] ^= 1
                t2hash[h1] ^= h
                t2count[h2] += 4
                t2hash[h2] ^= h
                t2count[h2] ^= 2
                if (t2hash[h0] & t2hash[h1] & t2hash[h2]) == 0:
                    if ((t2hash[h0] == 0 and t2count[h0] == 8) or (t2hash[h1] == 0 and t2count[h1] == 8)
                            or (t2hash[h2] == 0 and t2count[h2] == 8)):
                        duplicates += 1
                        t2count[h0] -= 4
                        t2hash[h0] ^= h
                        t2count[h1] -= 4
                        t2count[h1] ^= 1
                        t2hash[h1] ^= h
                        t2count[h2] -= 4
                        t2count[h2] ^= 2
                        t2hash[h2] ^= h
                if t2count[h0] < 4 or t2count[h1] < 4 or t2count[h2] < 4:
                    error = True
            if error:
                continue
            q = 0
            for i in range(capacity):
                alone[q] = <uint32_t>i
                if (t2count[i] >> 2) == 1:
                    q += 1
            stack = 0
            while q > 0:
                q -= 1
                index = alone[q]
                if (t2count[index] >> 2) == 1:
                    h = t2hash[index]
                    h012[1] = slot_of(f, 1, h)
                    h012[2] = slot_of(f, 2, h)
                    h012[3] = slot_of(f, 0, h)
                    h012[4] = h012[1]
                    found = t2count[index] & 3
                    rev_h[stack] = found
                    order[stack] = h
                    stack += 1
                    other = h012[found + 1]
                    alone[q] = other
                    if (t2count[other] >> 2) == 2:
                        q += 1
                    t2count[other] -= 4
                    t2count[other] ^= (found + 1) % 3
                    t2hash[other] ^= h
                    other = h012[found + 2]
                    alone[q] = other
                    if (t2count[other] >> 2) == 2:
                        q += 1
                    t2count[other] -= 4
                    t2count[other] ^= (found + 2) % 3
                    t2hash[other] ^= h
            if stack + duplicates == size:
                rc = 0
                size = stack
                break
        if rc == 0:
            i = size - 1
            while i >= 0:
                h = order[i]
                found = rev_h[i]
                h012[0] = slot_of(f, 0, h)
                h012[1] = slot_of(f, 1, h)
                h012[2] = slot_of(f, 2, h)
                h012[3] = h012[0]
                h012[4] = h012[1]
                fps[h012[found]] = fingerprint(f, h) ^ fps[h012[found + 1]] ^ fps[h012[found + 2]]
                i -= 1
            # pack: slot i at bit i * bits (the buffer is zero and 8 bytes longer than needed)
            for i in range(capacity):
                bit = <uint64_t>i * f.bits
                memcpy(&word, packed + (bit >> 3), 8)
                v = <uint64_t>fps[i]
                word |= v << (bit & 7)
                memcpy(packed + (bit >> 3), &word, 8)
    free(order)
    free(alone)
    free(t2count)
    free(rev_h)
    free(t2hash)
    free(fps)
    free(start)
    return rc


# --- keys of card tokens ---------------------------------------------------------------------

def token_keys(tokens):
    """(k0 uint64, k1 uint32) of N packed 16-byte tokens (bytes, or uint8 (N, 16))."""
    buf = np.frombuffer(tokens, np.uint8) if isinstance(tokens, (bytes, bytearray, memoryview)) else np.ascontiguousarray(tokens, np.uint8).reshape(-1)
    if buf.shape[0] % 16:
        raise ValueError(f"card_tokens: {buf.shape[0]} bytes is not a whole number of 16-byte tokens")
    t = buf.reshape(-1, 16)
    return np.ascontiguousarray(t[:, :8]).view("<u8").reshape(-1).astype(np.uint64), \
        np.ascontiguousarray(t[:, 12:]).view("<u4").reshape(-1).astype(np.uint32)


def token_key(token) -> bytes:
    """The 12 bytes of a 16-byte token a key is made of (bytes 0-7 and 12-15): a gate's
    delta overlay is keyed by them."""
    return bytes(token[:8]) + bytes(token[12:16])


# --- the cascade -------------------------------------------------------------------------------

DEF MAX_LEVELS = 64
#: Keys whose first-level slots are prefetched together in a batch query.
DEF PREFETCH_GROUP = 16


cdef extern from *:
    void prefetch "__builtin_prefetch"(const void* addr) noexcept nogil


cdef class Cascade:
    """A filter cascade (CRLite): level 1 holds the allowed keys, level 2 the enrolled keys
    not allowed that level 1 passes, level 3 the allowed ones level 2 passes, ... until a
    level has no false positive over the enrolled universe. A key's answer is the parity
    of the first level that does not hold it (1-based: level 1 missing -> not allowed;
    level 2 missing -> allowed; every level holds it -> the parity of their count), exact
    for every key of the universe it was built over.

        >>> k0 = np.arange(2000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        >>> k1 = np.zeros(2000, np.uint32)
        >>> allowed = (np.arange(2000) % 3 == 0)
        >>> c = Cascade.build(k0, k1, allowed, bits=[8], seed=1)
        >>> bool((c.query_keys(k0, k1) == allowed).all())
        True
    """

    cdef Fuse views[MAX_LEVELS]
    cdef readonly list levels

    def __init__(self, levels):
        levels = list(levels)
        if not 1 <= len(levels) <= MAX_LEVELS:
            raise ValueError(f"a cascade has 1..{MAX_LEVELS} levels, got {len(levels)}")
        self.levels = levels
        cdef FuseFilter lv
        for i, lv in enumerate(levels):
            self.views[i] = lv.f

    @staticmethod
    def build(k0, k1, allowed, bits=(17, 16), uint64_t seed=0):
        """The cascade of the universe (k0, k1: unique keys) with ``allowed`` (bool, per key).
        ``bits``: fingerprint bits of levels 1, 2, ... (the last repeats for deeper levels)."""
        k0 = np.ascontiguousarray(k0, np.uint64)
        k1 = np.ascontiguousarray(k1, np.uint32)
        allowed = np.asarray(allowed, bool)
        bits = list(bits)
        inside = [np.flatnonzero(allowed), np.flatnonzero(~allowed)]  # keys of each side still passing
        levels = []
        side = 0
        while True:
            take = inside[side]
            lv = FuseFilter.build(k0[take], k1[take], bits=bits[min(len(levels), len(bits) - 1)],
                                  seed=seed + 0x1000 * len(levels))
            levels.append(lv)
            other = inside[1 - side]
            if len(other):
                other = other[lv.contains_keys(k0[other], k1[other]).astype(bool)]
            inside[1 - side] = other
            if len(other) == 0:
                break
            if len(levels) >= MAX_LEVELS:
                raise RuntimeError("filter cascade did not converge")
            side = 1 - side
        return Cascade(levels)

    @property
    def nbytes(self):
        return sum(lv.nbytes for lv in self.levels)

    def query_keys(self, k0, k1):
        """uint8 (n,): 1 where key i is allowed."""
        cdef const uint64_t[::1] a = np.ascontiguousarray(k0, np.uint64)
        cdef const uint32_t[::1] b = np.ascontiguousarray(k1, np.uint32)
        cdef Py_ssize_t i, n = a.shape[0]
        cdef int depth = len(self.levels), j
        out = np.empty(n, np.uint8)
        cdef uint8_t[::1] o = out
        with nogil:
            for i in range(n):
                j = 0
                while j < depth and fuse_contains(&self.views[j], a[i], b[i]):
                    j += 1
                o[i] = j & 1
        return out

    def query_tokens(self, tokens):
        """uint8 (N,): 1 where packed 16-byte token i is allowed (bytes or a uint8 buffer)."""
        cdef const unsigned char[::1] buf = np.frombuffer(tokens, dtype=np.uint8) if isinstance(tokens, (bytes, bytearray, memoryview)) else np.ascontiguousarray(tokens, np.uint8).reshape(-1)
        if buf.shape[0] % 16:
            raise ValueError(f"card_tokens: {buf.shape[0]} bytes is not a whole number of 16-byte tokens")
        cdef Py_ssize_t i, n = buf.shape[0] // 16
        cdef int depth = len(self.levels), j
        cdef uint64_t k0
        cdef uint32_t k1
        out = np.empty(n, np.uint8)
        cdef uint8_t[::1] o = out
        if n == 0:
            return out
        cdef Py_ssize_t base, m, q
        cdef uint64_t h
        cdef const Fuse* first = &self.views[0]
        cdef uint32_t s0[PREFETCH_GROUP]
        cdef uint32_t s1[PREFETCH_GROUP]
        cdef uint32_t s2[PREFETCH_GROUP]
        cdef uint64_t hs[PREFETCH_GROUP]
        with nogil:
            # A city's filter is tens of MB: each of a key's three slots is a cache miss. Keys go
            # through in groups: hash and prefetch the first level's slots of the whole group,
            # then decide each, so the misses of a group overlap instead of queueing.
            for base in range(0, n, PREFETCH_GROUP):
                m = min(PREFETCH_GROUP, n - base)
                if first.array_len:
                    for q in range(m):
                        memcpy(&k0, &buf[16 * (base + q)], 8)
                        memcpy(&k1, &buf[16 * (base + q) + 12], 4)
                        h = key_hash(k0, k1, first.seed)
                        hs[q] = h
                        s0[q] = slot_of(first, 0, h)
                        s1[q] = slot_of(first, 1, h)
                        s2[q] = slot_of(first, 2, h)
                        prefetch(first.data + ((<uint64_t>s0[q] * first.bits) >> 3))
                        prefetch(first.data + ((<uint64_t>s1[q] * first.bits) >> 3))
                        prefetch(first.data + ((<uint64_t>s2[q] * first.bits) >> 3))
                for q in range(m):
                    i = base + q
                    if first.array_len == 0 or (read_fp(first, s0[q]) ^ read_fp(first, s1[q]) ^ read_fp(first, s2[q])) != fingerprint(first, hs[q]):
                        o[i] = 0  # not in level 1: not allowed
                        continue
                    memcpy(&k0, &buf[16 * i], 8)
                    memcpy(&k1, &buf[16 * i + 12], 4)
                    j = 1
                    while j < depth and fuse_contains(&self.views[j], k0, k1):
                        j += 1
                    o[i] = j & 1
        return out

    def allows(self, token) -> bool:
        """One 16-byte token (bytes): allowed?"""
        if not isinstance(token, bytes) or len(token) != 16:
            raise ValueError("card_token: expected 16 bytes")
        cdef const unsigned char* t = token
        cdef uint64_t k0
        cdef uint32_t k1
        memcpy(&k0, t, 8)
        memcpy(&k1, t + 12, 4)
        cdef int depth = len(self.levels), j = 0
        while j < depth and fuse_contains(&self.views[j], k0, k1):
            j += 1
        return bool(j & 1)
