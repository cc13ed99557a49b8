"""Keys and certificates of the test cluster, and kubeconfigs for its users.

One self-signed authority (``ca.crt``) issues the API server's serving
certificate and the client certificate it shows the kubelet; the kubelet
trusts that authority only, so nothing else can talk to it. Service-account
tokens are signed with ``sa.key``. Users authenticate to the API server with
bearer tokens from ``tokens.csv``.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAMESPACE = "petseg"


def _write_key(path: Path) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return key


def _certificate(subject: x509.Name, public_key, issuer: x509.Name, signer, *, ca: bool, usage, names=()):
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(start)
               .not_valid_after(start + dt.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_pki(pki: Path, *, addresses: list[str]) -> None:
    """Write the authority, the API server's certificates and the service-account key pair.

    Args:
        pki: Directory for ``ca.crt``, ``apiserver.{crt,key}``, ``apiserver-kubelet-client.{crt,key}``
            and ``sa.{key,pub}``.
        addresses: IP addresses the API server is reached at (its certificate names them).
    """
    pki.mkdir(parents=True, exist_ok=True)
    ca_key = _write_key(pki / "ca.key")
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "petseg-test-ca")])
    ca = _certificate(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True, usage=None)
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    key = _write_key(pki / "apiserver.key")
    names = [x509.DNSName(n) for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = _certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]), key.public_key(),
                        ca_name, ca_key, ca=False, usage=[ExtendedKeyUsageOID.SERVER_AUTH], names=names)
    (pki / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    # What the API server shows the kubelet for logs and exec: a cluster administrator.
    key = _write_key(pki / "apiserver-kubelet-client.key")
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver-kubelet-client")])
    cert = _certificate(subject, key.public_key(), ca_name, ca_key, ca=False, usage=[ExtendedKeyUsageOID.CLIENT_AUTH])
    (pki / "apiserver-kubelet-client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    sa_key = _write_key(pki / "sa.key")
    (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                  serialization.PublicFormat.SubjectPublicKeyInfo))


def write_kubeconfig(path: Path, *, server: str, ca_file: Path, user: str, token: str,
                     namespace: str = NAMESPACE) -> None:
    """Write a kubeconfig for one token user, readable by its owner only.

    Args:
        path: Where to write it.
        server: The API server's URL.
        ca_file: PEM file that verifies the server's certificate.
        user: A name for the user entry.
        token: The bearer token.
        namespace: The context's namespace.
    """
    ca = base64.b64encode(ca_file.read_bytes()).decode()
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "petseg-test", "cluster": {"server": server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "petseg-test", "user": user, "namespace": namespace}}],
        "current-context": user,
    }
    path.write_text(json.dumps(kubeconfig, indent=2))
    path.chmod(0o600)
