"""Mutual TLS (server/tls.py): real certificates in a temporary directory and a real grpc server
on 127.0.0.1 (the standard health service, behind an interceptor that records
``caller_identity(context)`` for every call)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server import tls

CALLERS = ["citizen_app", "metro_gateway"]


class RecordCaller(grpc.ServerInterceptor):
    """Wraps every unary handler to record who the server thinks is calling."""

    def __init__(self):
        self.seen: list[str | None] = []

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behaviour(request, context):
            self.seen.append(tls.caller_identity(context))
            return inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            behaviour, handler.request_deserializer, handler.response_serializer)


class HealthServer:
    def __init__(self, credentials: grpc.ServerCredentials | None):
        self.recorder = RecordCaller()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[self.recorder])
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        if credentials is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        assert self.port
        self.server.start()

    def stop(self):
        self.server.stop(None)


def call(port: int, creds: grpc.ChannelCredentials | None, host: str = "127.0.0.1",
         name_override: str | None = None) -> grpc.StatusCode:
    """One Health.Check; the status it ended with (OK or the error's code)."""
    # A local subchannel pool: no connection (and no handshake) is shared between the
    # channels of different tests, which use different certificates.
    options = [("grpc.use_local_subchannel_pool", 1)]
    if name_override:
        options.append(("grpc.ssl_target_name_override", name_override))
    target = f"{host}:{port}"
    channel = grpc.insecure_channel(target, options) if creds is None else grpc.secure_channel(target, creds, options)
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()


def raw_creds(pki_dir: Path, cert, key) -> grpc.ChannelCredentials:
    """Trust our CA, present the given certificate and key."""
    return grpc.ssl_channel_credentials((pki_dir / "ca.pem").read_bytes(), tls.key_pem(key), tls.cert_pem(cert))


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    paths = tls.make_dev_pki(out, CALLERS)
    return out, paths


@pytest.fixture(scope="module")
def ca(pki):
    return tls.load_ca(pki[0])


@pytest.fixture(scope="module")
def mtls_server(pki):
    s = HealthServer(tls.server_credentials(pki[0]))
    yield s
    s.stop()


# --- over the wire --------------------------------------------------------------------------


@pytest.mark.parametrize("caller", CALLERS)
def test_valid_client_certificate_is_accepted_and_identified(pki, mtls_server, caller):
    mtls_server.recorder.seen.clear()
    assert call(mtls_server.port, tls.channel_credentials(pki[0], caller)) == grpc.StatusCode.OK
    assert mtls_server.recorder.seen == [caller]


def test_no_client_certificate_is_refused(pki, mtls_server):
    mtls_server.recorder.seen.clear()
    status = call(mtls_server.port, tls.channel_credentials(pki[0], None))
    assert status != grpc.StatusCode.OK  # the handshake fails: UNAVAILABLE
    assert mtls_server.recorder.seen == []  # no handler ran


def test_certificate_from_another_ca_is_refused(pki, mtls_server):
    # the other CA has the very same name as ours: only the signature differs
    cert, key, other_ca = tls.make_foreign_client_cert("citizen_app")
    assert other_ca.subject == load_cert(pki[0] / "ca.pem").subject
    mtls_server.recorder.seen.clear()
    assert call(mtls_server.port, raw_creds(pki[0], cert, key)) != grpc.StatusCode.OK
    assert mtls_server.recorder.seen == []


def test_a_fresh_certificate_from_our_ca_is_accepted(pki, ca, mtls_server):
    # the control for the refusals below: same helper, same CA, valid dates
    cert, key = tls.make_cert(*ca, "hospital")
    mtls_server.recorder.seen.clear()
    assert call(mtls_server.port, raw_creds(pki[0], cert, key)) == grpc.StatusCode.OK
    assert mtls_server.recorder.seen == ["hospital"]


def test_expired_client_certificate_is_refused(pki, mtls_server, tmp_path):
    cert_path, key_path = tls.make_expired_client_cert(pki[0], "citizen_app", tmp_path)
    assert load_cert(cert_path).not_valid_after_utc < dt.datetime.now(dt.timezone.utc)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    creds = grpc.ssl_channel_credentials((pki[0] / "ca.pem").read_bytes(), key_path.read_bytes(), cert_path.read_bytes())
    mtls_server.recorder.seen.clear()
    assert call(mtls_server.port, creds) != grpc.StatusCode.OK
    assert mtls_server.recorder.seen == []


def test_not_yet_valid_client_certificate_is_refused(pki, ca, mtls_server):
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = tls.make_cert(*ca, "citizen_app", not_before=now + dt.timedelta(days=1),
                              not_after=now + dt.timedelta(days=30))
    assert call(mtls_server.port, raw_creds(pki[0], cert, key)) != grpc.StatusCode.OK


def test_server_certificate_cannot_serve_as_a_client_certificate(pki, mtls_server):
    # same CA, valid dates, but its EKU is serverAuth only
    out = pki[0]
    creds = grpc.ssl_channel_credentials((out / "ca.pem").read_bytes(), (out / "server.key").read_bytes(),
                                         (out / "server.pem").read_bytes())
    assert call(mtls_server.port, creds) != grpc.StatusCode.OK


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_server_certificate_validates_for_localhost_and_loopback_ip(pki, mtls_server, host):
    mtls_server.recorder.seen.clear()
    assert call(mtls_server.port, tls.channel_credentials(pki[0], "citizen_app"), host=host) == grpc.StatusCode.OK
    assert mtls_server.recorder.seen == ["citizen_app"]


def test_server_certificate_does_not_validate_for_another_name(pki, mtls_server):
    creds = tls.channel_credentials(pki[0], "citizen_app")
    assert call(mtls_server.port, creds, name_override="score.example.org") != grpc.StatusCode.OK


def test_without_required_client_auth_the_caller_is_anonymous(pki):
    # require_client_auth=False: grpc does not ask for a certificate, so there is no identity
    server = HealthServer(tls.server_credentials(pki[0], require_client_auth=False))
    try:
        assert call(server.port, tls.channel_credentials(pki[0], "citizen_app")) == grpc.StatusCode.OK
        assert call(server.port, tls.channel_credentials(pki[0], None)) == grpc.StatusCode.OK
        assert server.recorder.seen == [None, None]
    finally:
        server.stop()


def test_insecure_call_has_no_identity():
    server = HealthServer(None)
    try:
        assert call(server.port, None) == grpc.StatusCode.OK
        assert server.recorder.seen == [None]
    finally:
        server.stop()


# --- caller_identity on what grpc puts in auth_context ---------------------------------------


class FakeContext:
    def __init__(self, auth: dict):
        self._auth = auth

    def auth_context(self):
        return self._auth


SSL = {"transport_security_type": [b"ssl"]}


@pytest.mark.parametrize("auth, expected", [
    # what grpcio 1.85 gives for our caller certificates
    ({**SSL, "x509_common_name": [b"citizen_app"], "x509_subject_alternative_name": [b"qianjiang://caller/citizen_app"],
      "peer_uri": [b"qianjiang://caller/citizen_app"]}, "citizen_app"),
    # the URI wins over the CN
    ({**SSL, "x509_common_name": [b"someone_else"], "peer_uri": [b"qianjiang://caller/hospital"]}, "hospital"),
    # other URIs (e.g. SPIFFE) are not caller identities
    ({**SSL, "x509_common_name": [b"library"], "peer_uri": [b"spiffe://city/ns/x", b"qianjiang://caller/library"]},
     "library"),
    # grpc without peer_uri: the mixed SAN list
    ({**SSL, "x509_common_name": [b""], "x509_subject_alternative_name": [b"x.example", b"qianjiang://caller/court"]},
     "court"),
    # a grpc that has peer_* keys but no peer_uri: the certificate has no URI SAN, whatever
    # the mixed list seems to say
    ({**SSL, "x509_common_name": [b"tax_bureau"], "peer_dns": [b"qianjiang://caller/x"],
      "x509_subject_alternative_name": [b"qianjiang://caller/x"]}, "tax_bureau"),
    # no URI SAN: the CN
    ({**SSL, "x509_common_name": [b"police"]}, "police"),
    # two different caller URIs: ambiguous
    ({**SSL, "x509_common_name": [b"a"], "peer_uri": [b"qianjiang://caller/a", b"qianjiang://caller/b"]}, None),
    # no client certificate, or no TLS at all
    (SSL, None),
    ({"transport_security_type": [b"insecure"], "security_level": [b"TSI_SECURITY_NONE"]}, None),
    ({"x509_common_name": [b"police"]}, None),
    ({}, None),
])
def test_caller_identity_from_auth_context(auth, expected):
    assert tls.caller_identity(FakeContext(auth)) == expected


# --- the certificates themselves -------------------------------------------------------------


def test_certificates_have_the_names_and_uses_they_claim(pki, ca):
    out, paths = pki
    ca_cert, ca_key = ca
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey) and ca_key.curve.name == "secp256r1"
    assert ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Qianjiang Score development CA"
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    server = load_cert(paths["server"]["cert"])
    server.verify_directly_issued_by(ca_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]

    for caller in CALLERS:
        cert = load_cert(paths["callers"][caller]["cert"])
        cert.verify_directly_issued_by(ca_cert)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == caller
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"qianjiang://caller/{caller}"]
        assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc


def test_certificates_pass_an_independent_verifier(pki, ca):
    # cryptography's own path validation (RFC 5280 + web PKI profile), not grpc's
    out, paths = pki
    builder = PolicyBuilder().store(Store([ca[0]]))
    server = load_cert(paths["server"]["cert"])
    for name in (x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        builder.build_server_verifier(name).verify(server, [])
    with pytest.raises(VerificationError):
        builder.build_server_verifier(x509.DNSName("score.example.org")).verify(server, [])
    verified = builder.build_client_verifier().verify(load_cert(paths["callers"]["citizen_app"]["cert"]), [])
    assert verified.subjects == [x509.UniformResourceIdentifier("qianjiang://caller/citizen_app")]
    with pytest.raises(VerificationError):  # EKU: serverAuth only
        builder.build_client_verifier().verify(server, [])


def test_key_files_are_private(pki):
    out, _ = pki
    keys = sorted(out.glob("*.key"))
    assert {k.stem for k in keys} == {"ca", "server", *CALLERS}
    for k in keys:
        assert stat.S_IMODE(k.stat().st_mode) == 0o600, k


@pytest.mark.parametrize("bad", ["ca", "server", "../etc", "", "a b", "x" * 65])
def test_bad_caller_names_are_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        tls.make_dev_pki(tmp_path, [bad])


# --- the command ------------------------------------------------------------------------------


def test_main_writes_the_default_callers(tmp_path, capsys):
    out = tmp_path / "certs"
    assert tls.main(["--out", str(out)]) == 0
    assert {p.stem for p in out.glob("*.pem")} == {"ca", "server", *tls.DEFAULT_CALLERS}
    printed = capsys.readouterr().out
    assert "qianjiang://caller/sre" in printed and str(out / "ca.pem") in printed


def test_main_refuses_to_replace_a_ca_without_force(tmp_path, capsys):
    out = tmp_path / "certs"
    assert tls.main(["--out", str(out), "--caller", "citizen_app"]) == 0
    first = (out / "ca.pem").read_bytes()

    assert tls.main(["--out", str(out), "--caller", "citizen_app"]) != 0
    assert "--force" in capsys.readouterr().err
    assert (out / "ca.pem").read_bytes() == first

    (out / "server.key").chmod(0o644)  # --force must leave keys private even if they were not
    assert tls.main(["--out", str(out), "--caller", "citizen_app", "--force"]) == 0
    assert (out / "ca.pem").read_bytes() != first
    load_cert(out / "citizen_app.pem").verify_directly_issued_by(load_cert(out / "ca.pem"))
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
