"""The gRPC front door, security: the bearer token, TLS and mutual TLS (certificates made per module).
Against a fake engine and the real Qwen3 tokenizer, on loopback only; the harness and fixtures are in
grpc_fixtures.py and conftest.py.
"""
from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import Unauthenticated, Unavailable
from scheduler.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # a real tokenizer, key generation, TLS handshakes


def test_auth_token(make_server):
    h = make_server(auth_token="s3cret")
    for kwargs in ({}, {"auth_token": "wrong"}):
        with pytest.raises(Unauthenticated):
            h.client(**kwargs).generate("x")
        with pytest.raises(Unauthenticated):
            h.client(**kwargs).model_info()
    assert h.client(auth_token="s3cret").generate("x", SamplingParams(max_tokens=3)).outputs[0].num_completion_tokens == 3
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(h.target))  # exempt: no token
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status in (
        health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    h.assert_clean()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out = tmp_path_factory.mktemp("certs")
    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer=None, issuer_key=None, ca=False, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(issuer_key or key, hashes.SHA256())
        (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (out / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))
        return cert, key

    ca, ca_key = make("ca", ca=True)
    make("server", ca.subject, ca_key,
         san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    make("client", ca.subject, ca_key)
    other_ca, other_key = make("other-ca", ca=True)
    make("stranger", other_ca.subject, other_key)
    return {p.stem + "_" + p.suffix[1:]: p for p in out.iterdir()}


def test_tls(make_server, certs):
    h = make_server(tls_cert_file=certs["server_crt"], tls_key_file=certs["server_key"])
    client = h.client(root_certificates=certs["ca_crt"])
    assert client.generate("x", SamplingParams(max_tokens=2)).outputs[0].num_completion_tokens == 2
    with pytest.raises(Unavailable):  # plaintext client against a TLS server
        h.client(timeout=2).model_info()
    with pytest.raises(Unavailable):  # a server certificate the client does not trust
        h.client(root_certificates=certs["other-ca_crt"], timeout=2).model_info()


def test_mutual_tls(make_server, certs):
    h = make_server(tls_cert_file=certs["server_crt"], tls_key_file=certs["server_key"],
                    tls_client_ca_file=certs["ca_crt"], auth_token="tok")
    good = h.client(root_certificates=certs["ca_crt"], client_cert=certs["client_crt"],
                    client_key=certs["client_key"], auth_token="tok")
    assert good.generate("x", SamplingParams(max_tokens=2)).outputs[0].num_completion_tokens == 2
    with pytest.raises(Unavailable):  # no client certificate
        h.client(root_certificates=certs["ca_crt"], auth_token="tok", timeout=2).model_info()
    with pytest.raises(Unavailable):  # a client certificate from another CA
        h.client(root_certificates=certs["ca_crt"], client_cert=certs["stranger_crt"],
                 client_key=certs["stranger_key"], auth_token="tok", timeout=2).model_info()
    h.assert_clean()
