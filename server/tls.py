"""Mutual TLS for development: a local CA, certificates for the server and example callers,
and the gRPC credentials built from them.

    $ python -m server.tls --out data/certs                      # CA, server, default callers
    $ python -m server.tls --out data/certs --caller citizen_app --caller metro_gateway --force

    >>> pki = make_dev_pki(Path("data/certs"), ["citizen_app"])           # doctest: +SKIP
    >>> server.add_secure_port("127.0.0.1:50051", server_credentials(Path("data/certs")))  # doctest: +SKIP
    >>> creds = channel_credentials(Path("data/certs"), "citizen_app")    # doctest: +SKIP
    >>> channel = grpc.secure_channel("localhost:50051", creds)           # doctest: +SKIP

and inside a handler, ``caller_identity(context)`` is ``"citizen_app"``.

The directory holds ``ca.pem``/``ca.key``, ``server.pem``/``server.key`` and one
``<caller>.pem``/``<caller>.key`` per caller. Every caller's certificate carries its identity
twice: as the subject CN and as the URI SAN ``qianjiang://caller/<caller>``; the server reads
the URI first (see :func:`caller_identity`).

This is a *development* CA: its key sits on disk next to the certificates it signed, and there
is no revocation. Production certificates come from the city's PKI, not from here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_COMMON_NAME = "Qianjiang Score development CA"
#: A caller's identity travels as this URI SAN (and as the CN, for tools that show only that).
CALLER_URI_PREFIX = "qianjiang://caller/"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")
DEFAULT_CALLERS = (
    "citizen_app", "metro_gateway", "bus_gateway", "hospital", "library", "housing_office",
    "campus_fitness_app", "court", "police", "tax_bureau", "provident_fund", "utilities",
    "welfare_office", "volunteer_platform", "citizen_card_company", "public_credit_platform", "social_insurance",
    "housing_bureau", "blood_centre", "charity_platform", "civil_affairs", "city_services", "financial_institutions",
    "sre",
)
#: Caller names become file names and URI paths: keep them to a safe alphabet.
_CALLER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Names taken by the CA's and the server's own files.
_RESERVED = {"ca", "server"}
#: Allowance for clocks that are slightly behind the one that issued the certificate.
_CLOCK_SKEW = dt.timedelta(minutes=5)

# grpc's auth_context keys (grpcio 1.85, checked by experiment; see caller_identity).
_AUTH_SECURITY_TYPE = "transport_security_type"
_AUTH_PEER_URI = "peer_uri"                    # URI SANs only
_AUTH_ALL_SANS = "x509_subject_alternative_name"  # every SAN, of any type, mixed together
_AUTH_COMMON_NAME = "x509_common_name"
#: ssl_server_credentials gives "ssl"; the experimental grpc.experimental TLS credentials "tls".
_TLS_TRANSPORTS = (b"ssl", b"tls")


# --- keys and certificates ---------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    # EC P-256: small keys, fast handshakes and key generation (a whole PKI in milliseconds, so
    # tests make their own), and supported by every TLS stack grpc uses (BoringSSL/OpenSSL).
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _validity(not_before: dt.datetime | None, not_after: dt.datetime | None, days: int):
    start = not_before if not_before is not None else _now() - _CLOCK_SKEW
    end = not_after if not_after is not None else start + _CLOCK_SKEW + dt.timedelta(days=days)
    if end <= start:
        raise ValueError(f"not_after {end} is not after not_before {start}")
    return start, end


def make_ca(common_name: str = CA_COMMON_NAME, *, days: int = 3650,
            not_before: dt.datetime | None = None, not_after: dt.datetime | None = None):
    """A self-signed CA: ``(certificate, private key)``."""
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(not_before, not_after, days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        # path_length=0: this CA signs end-entity certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def check_caller_name(name: str) -> str:
    if not _CALLER_RE.match(name) or name.lower() in _RESERVED:
        raise ValueError(f"bad caller name {name!r}: letters, digits, '_', '.', '-' "
                         f"(at most 64, not {sorted(_RESERVED)})")
    return name


def make_cert(ca_cert: x509.Certificate, ca_key, name: str, *, client: bool = True,
              sans: Iterable[str] | None = None, days: int = 365,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None):
    """An end-entity certificate signed by ``ca_cert``/``ca_key``: ``(certificate, key)``.

    ``client=True``: a caller certificate — CN ``name``, URI SAN ``qianjiang://caller/<name>``,
    clientAuth EKU. ``client=False``: a server certificate — CN ``name``, a DNS or IP SAN for
    each of ``sans`` (default ``[name]``), serverAuth EKU. ``not_before``/``not_after`` override
    the validity (tests use them for expired and not-yet-valid certificates).
    """
    if client:
        check_caller_name(name)
        alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(CALLER_URI_PREFIX + name)]
        # EKU: a caller's certificate cannot be used to impersonate the server, nor the reverse.
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    else:
        # SAN, not the CN, is what TLS clients (grpc included) match the host name against;
        # IP literals need an IPAddress entry, a DNSName "127.0.0.1" does not match.
        alt_names = [_san_entry(s) for s in (sans if sans is not None else [name])]
        if not alt_names:
            raise ValueError("a server certificate needs at least one name")
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    key = new_key()
    start, end = _validity(not_before, not_after, days)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # ECDSA keys sign the handshake; they never encrypt a key (no keyEncipherment).
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        # Critical when the subject would otherwise say nothing: here the CN is set, so not.
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def expired_client_cert(ca_cert, ca_key, name: str):
    """A caller certificate that expired yesterday (valid for the ten days before):
    ``(certificate, key)``."""
    now = _now()
    return make_cert(ca_cert, ca_key, name, client=True,
                     not_before=now - dt.timedelta(days=11), not_after=now - dt.timedelta(days=1))


def make_foreign_client_cert(name: str, ca_common_name: str = CA_COMMON_NAME):
    """A caller certificate from *another* CA — by default one with the very same name as ours,
    so only the signature tells them apart. Returns ``(certificate, key, other_ca_certificate)``."""
    other_cert, other_key = make_ca(ca_common_name)
    cert, key = make_cert(other_cert, other_key, name, client=True)
    return cert, key, other_cert


# --- files -------------------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    # PKCS#8, unencrypted: what grpc (BoringSSL) reads without a passphrase callback.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start (no window where it is world-readable); fchmod as well, since
    # O_CREAT's mode does not apply to a file that already exists (--force).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_pair(out_dir: Path, stem: str, cert: x509.Certificate, key) -> dict[str, Path]:
    """Write ``<stem>.pem`` (0644) and ``<stem>.key`` (0600); return their paths."""
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    _write_private(key_path, key_pem(key))
    cert_path.write_bytes(cert_pem(cert))
    return {"cert": cert_path, "key": key_path}


def make_dev_pki(out_dir: Path, callers: Sequence[str],
                 server_names: Sequence[str] = DEFAULT_SERVER_NAMES, days: int = 365) -> dict:
    """Create the CA, the server certificate and one certificate per caller in ``out_dir``.

    Overwrites whatever is there (the command line guards against that). Returns
    ``{"ca": {"cert": Path, "key": Path}, "server": {...}, "callers": {name: {...}}}``.
    """
    out_dir = Path(out_dir)
    callers = list(dict.fromkeys(callers))  # de-duplicated, order kept
    for c in callers:
        check_caller_name(c)
    if not server_names:
        raise ValueError("at least one server name is needed")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The CA outlives the certificates it signs, so they never outlive it.
    ca_cert, ca_key = make_ca(days=days + 1)
    paths: dict = {"ca": write_pair(out_dir, "ca", ca_cert, ca_key)}
    srv_cert, srv_key = make_cert(ca_cert, ca_key, server_names[0], client=False, sans=server_names, days=days)
    paths["server"] = write_pair(out_dir, "server", srv_cert, srv_key)
    paths["callers"] = {}
    for c in callers:
        cert, key = make_cert(ca_cert, ca_key, c, client=True, days=days)
        paths["callers"][c] = write_pair(out_dir, c, cert, key)
    return paths


def load_ca(cert_dir: Path):
    """``(certificate, private key)`` of the CA in ``cert_dir``."""
    cert_dir = Path(cert_dir)
    cert = x509.load_pem_x509_certificate((cert_dir / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((cert_dir / "ca.key").read_bytes(), password=None)
    return cert, key


def make_expired_client_cert(cert_dir: Path, caller: str, out_dir: Path) -> tuple[Path, Path]:
    """For tests: an expired certificate for ``caller``, signed by the CA in ``cert_dir``,
    written to ``out_dir/<caller>-expired.pem`` and ``.key``. Returns ``(cert path, key path)``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cert, key = expired_client_cert(*load_ca(cert_dir), caller)
    p = write_pair(out_dir, f"{caller}-expired", cert, key)
    return p["cert"], p["key"]


# --- grpc credentials --------------------------------------------------------------------------


def server_credentials(cert_dir: Path, require_client_auth: bool = True) -> grpc.ServerCredentials:
    """TLS with the server's certificate; callers must present a certificate from the CA.

    With ``require_client_auth=False`` grpc does not even ask for a client certificate (its
    Python API has no "request but don't require" mode), so it is plain server-side TLS and
    :func:`caller_identity` is always None.
    """
    cert_dir = Path(cert_dir)
    return grpc.ssl_server_credentials(
        [((cert_dir / "server.key").read_bytes(), (cert_dir / "server.pem").read_bytes())],
        root_certificates=(cert_dir / "ca.pem").read_bytes(),
        require_client_auth=require_client_auth,
    )


def channel_credentials(cert_dir: Path, caller: str | None) -> grpc.ChannelCredentials:
    """Trust only the development CA; present ``caller``'s certificate when one is given."""
    cert_dir = Path(cert_dir)
    root = (cert_dir / "ca.pem").read_bytes()
    if caller is None:
        return grpc.ssl_channel_credentials(root_certificates=root)
    check_caller_name(caller)
    return grpc.ssl_channel_credentials(
        root_certificates=root,
        private_key=(cert_dir / f"{caller}.key").read_bytes(),
        certificate_chain=(cert_dir / f"{caller}.pem").read_bytes(),
    )


def _text(values) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values or ()]


def caller_identity(context) -> str | None:
    """The caller named by the verified client certificate of this call, or None.

    What grpcio 1.85's ``context.auth_context()`` holds on a mutual-TLS call with one of these
    certificates (every value is a list of bytes)::

        transport_security_type        [b"ssl"]
        security_level                 [b"TSI_PRIVACY_AND_INTEGRITY"]
        ssl_tls_version, ssl_session_reused, ssl_negotiated_key_exchange_group,
        ssl_requested_server_name      (the last only when the client sent SNI, e.g. "localhost")
        x509_pem_cert                  [the client's certificate, PEM]
        x509_subject                   [b"CN=citizen_app"]
        x509_common_name               [b"citizen_app"]         ([b""] when the subject has no CN)
        x509_subject_alternative_name  [b"qianjiang://caller/citizen_app"]  (all SAN types mixed)
        peer_uri                       [b"qianjiang://caller/citizen_app"]  (URI SANs only;
                                       likewise peer_dns, peer_ip, peer_email when present)

    ``peer_identity_key()`` is "x509_subject_alternative_name" (or "x509_common_name" when the
    certificate has no SAN). There is no "x509_uri_sans" key. Without a client certificate the
    x509_* and peer_* keys are absent; an insecure port gives ``transport_security_type``
    [b"insecure"].

    The URI SAN comes first (it says "this is a Qianjiang caller", which a bare CN cannot),
    then the CN. The server credentials above either require *and verify* a client certificate
    or never request one, so an x509 entry here is always a verified one. Two different
    caller URIs in one certificate are ambiguous: None, not a guess.
    """
    auth = context.auth_context() or {}
    if not any(t in _TLS_TRANSPORTS for t in auth.get(_AUTH_SECURITY_TYPE) or ()):
        return None
    # peer_uri holds URI SANs only. A grpc without any peer_* keys (older releases) gets the
    # mixed list, where only a URI can start with "qianjiang://"; a grpc with peer_dns etc.
    # but no peer_uri is saying the certificate has no URI SAN.
    uri_sans = auth.get(_AUTH_PEER_URI)
    if uri_sans is None and not any(k.startswith("peer_") for k in auth):
        uri_sans = auth.get(_AUTH_ALL_SANS)
    callers = {u[len(CALLER_URI_PREFIX):] for u in _text(uri_sans) if u.startswith(CALLER_URI_PREFIX)}
    callers.discard("")
    if len(callers) == 1:
        return callers.pop()
    if callers:
        return None
    names = [n for n in _text(auth.get(_AUTH_COMMON_NAME)) if n]
    return names[0] if len(names) == 1 else None


# --- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.tls",
        description="Create a development CA, the server's certificate and callers' certificates.")
    parser.add_argument("--out", type=Path, default=Path("data/certs"), help="directory (default data/certs)")
    parser.add_argument("--caller", action="append", default=None,
                        help="a caller identity (repeatable; default: the example callers)")
    parser.add_argument("--server-name", action="append", default=None,
                        help="DNS name or IP address for the server certificate (repeatable; "
                             "default: localhost, 127.0.0.1)")
    parser.add_argument("--days", type=int, default=365, help="validity of the certificates (default 365)")
    parser.add_argument("--force", action="store_true", help="replace an existing CA and its certificates")
    args = parser.parse_args(argv)
    if args.days < 1:
        parser.error("--days must be at least 1")
    callers = args.caller or list(DEFAULT_CALLERS)
    try:
        for c in callers:
            check_caller_name(c)
    except ValueError as e:
        parser.error(str(e))
    existing = [p for p in (args.out / "ca.pem", args.out / "ca.key") if p.exists()]
    if existing and not args.force:
        # A new CA would silently invalidate every certificate the old one signed.
        print(f"{existing[0]} exists; not replacing the CA (use --force)", file=sys.stderr)
        return 1
    paths = make_dev_pki(args.out, callers, server_names=args.server_name or DEFAULT_SERVER_NAMES, days=args.days)
    print(f"ca       {paths['ca']['cert']}  {paths['ca']['key']}")
    print(f"server   {paths['server']['cert']}  {paths['server']['key']}  "
          f"({', '.join(args.server_name or DEFAULT_SERVER_NAMES)})")
    for name, p in paths["callers"].items():
        print(f"caller   {p['cert']}  {p['key']}  ({CALLER_URI_PREFIX}{name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
