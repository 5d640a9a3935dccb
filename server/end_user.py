"""The citizen bound to a request: a citizen app's back end says which end user it
authenticated, signed with its own Ed25519 key, and the service lets the call read or change
only that citizen.

    >>> key = Ed25519PrivateKey.generate()
    >>> header = sign_assertion(key, "citizen_app", "c00000003", now=1_800_000_000)
    >>> verify_assertion(header, {"citizen_app": key.public_key()}, "citizen_app", now=1_800_000_060)
    'c00000003'

Why: the back end's transport identity (its certificate or token) says *which app* calls,
not *for whom*; without this, a compromised or buggy app back end could read any citizen's
score and "who checked me" list. With it, every call of a citizen app to a citizen-facing
method (auth.py ``CITIZEN_BOUND``) must carry the metadata ``qj-end-user``:

    v1.<base64url(payload)>.<base64url(signature)>

where the payload is compact JSON ``{"iss": <caller identity>, "sub": <citizen id>, "aud":
"qianjiang-score", "iat": <unix s>, "exp": <unix s>}`` and the signature is Ed25519 over
``b"qj-end-user.v1." + payload``. The service checks the signature with the key of the
calling identity (so one app cannot speak for another's users), the audience, and that it is
current: issued at most ``MAX_SKEW_S`` ahead of the service's clock, expired not yet, and
valid for at most ``MAX_LIFETIME_S``. A failed check is UNAUTHENTICATED saying which; a valid
assertion for another citizen than the request names is PERMISSION_DENIED. The audit log
records the app and that the call was the citizen's own (CheckEntry.by_the_citizen).

Keys: the service holds each citizen app's *public* key, ``<data_dir>/keys/end_user/
<identity>.pub`` (PEM). In development (not ``--production``) a missing pair is created there
(``<identity>.key`` beside it, mode 0600: what ``qjscore --end-user-key`` and the tests sign
with); ``--production`` refuses to start without the public key, naming the file.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from server.errors import Unauthenticated
from server.keys import load_ed25519_key, new_ed25519_key, public_pem

METADATA_KEY = "qj-end-user"
AUDIENCE = "qianjiang-score"
_DOMAIN = b"qj-end-user.v1."
#: Longest validity an assertion may claim, and the clock difference tolerated.
MAX_LIFETIME_S = 300
MAX_SKEW_S = 60
#: Longest header accepted (an assertion is about 200 bytes).
MAX_HEADER_BYTES = 1024


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_assertion(key: Ed25519PrivateKey, issuer: str, citizen_id: str, now: float | None = None,
                   lifetime_s: int = 120) -> str:
    """The ``qj-end-user`` header value: ``issuer`` (the app's caller identity) vouches that
    its end user is ``citizen_id``, for ``lifetime_s`` seconds from ``now``."""
    now = int(time.time() if now is None else now)
    payload = json.dumps({"iss": issuer, "sub": citizen_id, "aud": AUDIENCE, "iat": now, "exp": now + lifetime_s},
                         separators=(",", ":"), sort_keys=True).encode()
    return f"v1.{_b64(payload)}.{_b64(key.sign(_DOMAIN + payload))}"


def verify_assertion(header: str, keys: dict[str, Ed25519PublicKey], identity: str, now: float | None = None) -> str:
    """The citizen id ``header`` binds the call to, for caller ``identity``; Unauthenticated
    naming what is wrong otherwise."""
    if len(header) > MAX_HEADER_BYTES:
        raise Unauthenticated(f"{METADATA_KEY}: longer than {MAX_HEADER_BYTES} bytes")
    version, _, rest = header.partition(".")
    body, _, signature = rest.partition(".")
    if version != "v1" or not body or not signature:
        raise Unauthenticated(f"{METADATA_KEY}: expected v1.<payload>.<signature>")
    key = keys.get(identity)
    if key is None:
        raise Unauthenticated(f"{METADATA_KEY}: the service holds no end-user key for {identity}")
    try:
        payload, sig = _unb64(body), _unb64(signature)
    except (ValueError, TypeError):
        raise Unauthenticated(f"{METADATA_KEY}: not base64url") from None
    try:
        key.verify(sig, _DOMAIN + payload)
    except InvalidSignature:
        raise Unauthenticated(f"{METADATA_KEY}: the signature is not {identity}'s") from None
    try:
        claims = json.loads(payload)
        iss, sub, aud, iat, exp = (claims[k] for k in ("iss", "sub", "aud", "iat", "exp"))
    except (ValueError, KeyError, TypeError):
        raise Unauthenticated(f"{METADATA_KEY}: the payload is not the assertion's JSON") from None
    if iss != identity:
        raise Unauthenticated(f"{METADATA_KEY}: issued by {str(iss)[:64]!r}, but {identity} is calling")
    if aud != AUDIENCE:
        raise Unauthenticated(f"{METADATA_KEY}: meant for {str(aud)[:64]!r}, not {AUDIENCE}")
    if not (isinstance(sub, str) and sub and isinstance(iat, int) and isinstance(exp, int)):
        raise Unauthenticated(f"{METADATA_KEY}: sub, iat and exp must be a citizen id and two integers")
    now = time.time() if now is None else now
    if exp - iat > MAX_LIFETIME_S:
        raise Unauthenticated(f"{METADATA_KEY}: valid for {exp - iat} s, more than the {MAX_LIFETIME_S} s allowed")
    if iat > now + MAX_SKEW_S:
        raise Unauthenticated(f"{METADATA_KEY}: issued {int(iat - now)} s in the future (check the app's clock)")
    if exp <= now:
        raise Unauthenticated(f"{METADATA_KEY}: expired {int(now - exp)} s ago")
    return sub


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """A citizen app's signing key (PEM, PKCS#8), as ``qjscore --end-user-key`` reads it."""
    return load_ed25519_key(path)


def key_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "keys" / "end_user"


def load_public_keys(data_dir: str | Path, identities, create: bool) -> dict[str, Ed25519PublicKey]:
    """The public keys of the citizen apps ``identities``; with ``create`` (development), a
    missing pair is made. Without it, a missing key is a ValueError naming the file."""
    out = {}
    folder = key_dir(data_dir)
    for identity in sorted(identities):
        pub = folder / f"{identity}.pub"
        if not pub.exists():
            if not create:
                raise ValueError(f"{pub}: the Ed25519 public key citizen app {identity!r} signs its end users with is "
                                 "missing (PEM; the app keeps the private key)")
            _create_pair(folder, identity)
        key = serialization.load_pem_public_key(pub.read_bytes())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"{pub}: not an Ed25519 public key")
        out[identity] = key
    return out


def _create_pair(folder: Path, identity: str) -> None:
    (folder / f"{identity}.key").unlink(missing_ok=True)  # a pair cut short before its public key
    key = new_ed25519_key(folder / f"{identity}.key")
    tmp = folder / f"{identity}.pub.tmp"
    tmp.write_bytes(public_pem(key))
    os.replace(tmp, folder / f"{identity}.pub")  # the public key last: its presence means the pair is whole
