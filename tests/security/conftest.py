"""Fixtures for the security and limits tests: keys in a file, a fake upstream,
and a self-signed certificate made on the spot."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeUpstream

TEXTS = ("Paris.", "The capital of France is Paris.", "London.", "I am not sure.")
REWARDS = {TEXTS[0]: 1.5, TEXTS[1]: 3.0, TEXTS[2]: -2.0, TEXTS[3]: 0.25}
KEYS = ("key-alpha-0123456789", "key-beta-9876543210")
# An environment variable nobody sets: keys come from the file only, and the
# tests never touch os.environ.
NO_ENV = "BON_TEST_KEYS_THAT_NOBODY_SETS"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(TEXTS) as server:
        yield server


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text(f"# gateway keys\n{KEYS[0]}\n\n{KEYS[1]}\n", encoding="utf-8")
    return path


def auth_config(keys_file: Path, **extra: object) -> dict[str, object]:
    """[server.auth] reading `keys_file` only."""
    return {"api_keys_env": NO_ENV, "api_keys_file": str(keys_file), **extra}


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert.pem, key.pem); it is its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bon-gateway test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
