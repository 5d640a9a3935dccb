"""Decision ids that reveal neither how many decisions were made nor which worker made them.

An id is ``d-`` + 32 lowercase hex digits: one AES-128 block (a keyed pseudo-random
permutation of 128-bit strings) over ``writer || seq``, both 8-byte big-endian, where
``writer`` is a random 64-bit number per writer (process) and ``seq`` counts its decisions
from 1. Item i of a batch is ``<batch id>-<i>`` (decimal). Without the key two ids of one
worker look unrelated, and an id says nothing about volume; with it, ``parse`` gives back
(writer, seq, item) — which the audit log uses to find the entry of a past decision.

    ids = DecisionIds(ids_key(audit_key))          # one per process (random writer)
    seq, decision_id = ids.next()                  # (1, "d-3f0c...")
    ids.id_of(seq, 7)                              # item 7 of batch ``seq``
    ids.parse(decision_id)                         # (writer, 1, None)

Ids made under another key do not parse (ValueError): ``seq`` must be below ``SEQ_LIMIT``
(2**48: 89 years at 100,000 decisions a second from one process), so a block decrypted
with the wrong key passes with probability 2**-16, and the audit log then finds no writer
of that number. Without the audit log (``--no-audit``) any 16 random bytes do as a key.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import secrets
import threading

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEQ_LIMIT = 1 << 48
_ID_RE = re.compile(r"d-([0-9a-f]{32})(?:-(0|[1-9][0-9]{0,9}))?")
_U32 = (1 << 32) - 1


def ids_key(audit_key: bytes) -> bytes:
    """The 16-byte decision-id key derived from the audit key (one secret to configure;
    knowing the id key does not give the pseudonym key back)."""
    return hmac.new(bytes(audit_key), b"qianjiang decision ids", hashlib.sha256).digest()[:16]


class DecisionIds:
    def __init__(self, key: bytes, writer: int | None = None):
        if not isinstance(key, (bytes, bytearray)) or len(key) != 16:
            raise ValueError("the decision-id key must be 16 bytes (AES-128), e.g. ids_key(audit_key)")
        if writer is None:
            writer = secrets.randbits(64)
        if not 0 <= writer < 1 << 64:
            raise ValueError(f"writer {writer!r} does not fit 64 bits")
        self.writer = int(writer)
        cipher = Cipher(algorithms.AES(bytes(key)), modes.ECB())
        # ECB on exactly one block keeps no state between update() calls, so one context of
        # each serves every id; the lock only guards against concurrent use of the C object.
        self._enc = cipher.encryptor()
        self._dec = cipher.decryptor()
        self._lock = threading.Lock()
        self._prefix = self.writer.to_bytes(8, "big")
        self._counter = itertools.count(1)

    def next(self) -> tuple[int, str]:
        """(seq, decision id) of the next decision of this writer (thread-safe)."""
        seq = next(self._counter)  # atomic under the GIL
        if seq >= SEQ_LIMIT:
            raise OverflowError("this writer has used all its decision numbers; restart the process")
        with self._lock:
            block = self._enc.update(self._prefix + seq.to_bytes(8, "big"))
        return seq, "d-" + block.hex()

    def id_of(self, seq: int, batch_index: int | None = None) -> str:
        """The id of decision ``seq`` of this writer (item ``batch_index`` of a batch)."""
        return self.encode(self.writer, seq, batch_index)

    def encode(self, writer: int, seq: int, batch_index: int | None = None) -> str:
        """The id of decision ``seq`` of any ``writer`` (the audit log rebuilds ids of all)."""
        with self._lock:
            block = self._enc.update(writer.to_bytes(8, "big") + seq.to_bytes(8, "big"))
        base = "d-" + block.hex()
        return base if batch_index is None else f"{base}-{batch_index}"

    def encode_many(self, writers, seqs) -> list[str]:
        """``d-<hex>`` of many (writer, seq) pairs with one cipher call (ECB encrypts each
        16-byte block independently): the audit log's readers build ids in bulk."""
        import numpy as np

        blocks = np.empty(len(seqs), dtype=[("writer", ">u8"), ("seq", ">u8")])
        blocks["writer"] = writers
        blocks["seq"] = seqs
        with self._lock:
            out = self._enc.update(blocks.tobytes())
        hexed = out.hex()
        return ["d-" + hexed[i : i + 32] for i in range(0, len(hexed), 32)]

    def parse(self, decision_id: str) -> tuple[int, int, int | None]:
        """(writer, seq, batch_index or None) of an id made with this key."""
        if not isinstance(decision_id, str):
            raise ValueError(f"a decision id is a string, not {type(decision_id).__name__}")
        m = _ID_RE.fullmatch(decision_id)
        if m is None:
            raise ValueError(f"{decision_id[:80]!r} is not a decision id (d-<32 hex digits>[-<item>])")
        with self._lock:
            block = self._dec.update(bytes.fromhex(m.group(1)))
        writer, seq = int.from_bytes(block[:8], "big"), int.from_bytes(block[8:], "big")
        if not 0 <= seq < SEQ_LIMIT:  # (0 is never issued by next(), but the audit log takes it)
            raise ValueError(f"{decision_id[:80]!r} was not made with this key")
        item = m.group(2)
        if item is not None and int(item) >= _U32:
            raise ValueError(f"{decision_id[:80]!r}: item {item} is beyond any batch")
        return writer, seq, None if item is None else int(item)
