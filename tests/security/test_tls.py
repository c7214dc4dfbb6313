"""TLS on both fronts with a self-signed certificate made in the test."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import httpx
import pytest

from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config
from tests.security.conftest import KEYS, REWARDS, auth_config, self_signed_cert

pytestmark = pytest.mark.integration


def test_https_and_grpc_tls_with_a_self_signed_certificate(
    upstream: FakeUpstream, keys_file: Path, tmp_path: Path
) -> None:
    cert, key = self_signed_cert(tmp_path)
    config = gateway_config(
        upstream.url,
        tls={"cert_file": str(cert), "key_file": str(key)},
        auth=auth_config(keys_file),
    )
    with ServedGateway(config, FakeScorer(REWARDS)) as served:
        https = f"https://127.0.0.1:{served.http_port}"
        trust = ssl.create_default_context(cafile=str(cert))
        headers = {"Authorization": f"Bearer {KEYS[0]}"}
        with httpx.Client(base_url=https, verify=trust, timeout=10) as client:
            assert client.get("/health").status_code == 200
            assert client.get("/v1/models").status_code == 401  # keys still apply over TLS
            reply = client.post(
                "/v1/chat/completions",
                headers=headers,
                json={
                    "messages": [{"role": "user", "content": "Capital of France?"}],
                    "best_of": 4,
                    "seed": 0,
                },
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == "The capital of France is Paris."
        # A client that does not trust the certificate is refused the handshake.
        with pytest.raises(httpx.ConnectError), httpx.Client(base_url=https, timeout=10) as untrusting:
            untrusting.get("/health")
        # Plain HTTP is not served on the TLS port.
        with pytest.raises(httpx.HTTPError), httpx.Client(timeout=5) as plain:
            plain.get(f"http://127.0.0.1:{served.http_port}/health")

        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(served.grpc_target, credentials) as channel:
            stub = pb_grpc.BestOfNStub(channel)
            models = stub.ListModels(
                pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {KEYS[1]}"),), timeout=10
            )
            assert {m.name for m in models.models} >= {"fake-rm"}
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(served.grpc_target) as insecure:
            with pytest.raises(grpc.RpcError) as plaintext:
                pb_grpc.BestOfNStub(insecure).ListModels(pb.ListModelsRequest(), timeout=3)
            assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


def test_half_a_tls_pair_is_a_config_error(upstream: FakeUpstream, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cert_file and key_file"):
        gateway_config(upstream.url, tls={"cert_file": str(tmp_path / "cert.pem")})
