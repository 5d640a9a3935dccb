"""Secret keys, from configuration and never from the repository.

    >>> keys = load_keys(Path("data"))                      # doctest: +SKIP
    >>> card_token(keys.card, "3301-0000-0000-0003").hex()   # doctest: +SKIP

* ``card`` keys the card tokens: a token is a keyed hash of the card number, so a leaked log,
  snapshot or batch request gives no card numbers (or national IDs) back.
* ``audit`` keys the audit log's pseudonymous subjects.

Each comes from the environment (``QJ_CARD_KEY``, ``QJ_AUDIT_KEY``, hex) or, for development,
from ``<data_dir>/keys/<name>.key``, created with random bytes (mode 0600) on first start.

Ed25519 signing keys (citizen apps' end-user assertions: server/end_user.py; the offline
gates' lists: server/gate_snapshot.py) are PEM files read and made by :func:`load_ed25519_key`
and :func:`new_ed25519_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Keys:
    card: bytes
    audit: bytes


def _key(name: str, data_dir: Path) -> bytes:
    env = os.environ.get(f"QJ_{name.upper()}_KEY")
    if env:
        key = bytes.fromhex(env)
        if len(key) < 16:
            raise ValueError(f"QJ_{name.upper()}_KEY: need at least 16 bytes (32 hex digits)")
        return key
    path = Path(data_dir) / "keys" / f"{name}.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32).hex().encode())
    return bytes.fromhex(path.read_text().strip())


def load_keys(data_dir: Path) -> Keys:
    return Keys(card=_key("card", data_dir), audit=_key("audit", data_dir))


def existing_card_key(data_dir: Path) -> bytes:
    """The card-token key of the server whose data directory this is (or QJ_CARD_KEY),
    never creating one: a load tool given the wrong directory would otherwise make a key of
    its own, and every token it sent would be an unknown card."""
    keys_dir = Path(data_dir) / "keys"
    if not os.environ.get("QJ_CARD_KEY") and not (keys_dir / "card.key").exists():
        raise FileNotFoundError(
            f"no card-token key in {keys_dir} (nor QJ_CARD_KEY): pass the server's data directory, "
            "or every token would be an unknown card"
        )
    return _key("card", Path(data_dir))


def card_token(key: bytes, card_number: str) -> bytes:
    """The 16-byte token of a card number (what the card or the scan QR carries)."""
    return hmac.new(key, f"card:{card_number}".encode(), hashlib.sha256).digest()[:16]


def synthetic_card_number(row: int) -> str:
    """Card numbers of the synthetic city (Hangzhou citizen cards start 3301)."""
    return f"3301-{row // 10**8 % 10**4:04d}-{row // 10**4 % 10**4:04d}-{row % 10**4:04d}"


def subject_of(key: bytes, citizen_id: str) -> int:
    """The audit log's pseudonymous subject of a citizen: the first 8 bytes of
    HMAC-SHA256(key, citizen_id), little-endian (0 is reserved for "no person")."""
    value = int.from_bytes(hmac.new(key, citizen_id.encode(), hashlib.sha256).digest()[:8], "little")
    return value or 1


def load_ed25519_key(path: str | Path):
    """An Ed25519 private key from a PEM (PKCS#8) file; ValueError naming the file if it is
    another kind of key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def new_ed25519_key(path: str | Path):
    """A new Ed25519 private key written to ``path`` (PEM, mode 0600; its directory made
    0700); refused (FileExistsError) if the file exists: a key is never overwritten."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return key


def public_pem(key) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a private key's public half."""
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
