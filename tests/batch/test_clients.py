"""The HTTP client of a batch job: base URL, API key, which failures are retried."""

from __future__ import annotations

import httpx
import pytest

from bon_gateway.batch.clients import GatewayHttpClient, RequestFailed


def _client(handler: object, url: str = "http://gw:8080") -> GatewayHttpClient:
    return GatewayHttpClient(url, api_key="k", transport=httpx.MockTransport(handler))  # type: ignore[arg-type]


async def test_posts_to_v1_with_the_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"candidates": []})

    for url in ("http://gw:8080", "http://gw:8080/v1/"):
        client = _client(handler, url)
        assert await client.complete({"messages": []}) == {"candidates": []}
        await client.aclose()
    assert [str(r.url) for r in seen] == ["http://gw:8080/v1/chat/completions"] * 2
    assert all(r.headers["authorization"] == "Bearer k" for r in seen)


@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (401, False), (429, True), (503, True), (504, True)]
)
async def test_failures_say_whether_to_retry(status: int, retryable: bool) -> None:
    client = _client(lambda request: httpx.Response(status, json={"error": {"message": "nope"}}))
    with pytest.raises(RequestFailed) as failure:
        await client.complete({})
    await client.aclose()
    assert failure.value.retryable is retryable and failure.value.status == status
    assert "nope" in str(failure.value)


async def test_start_fails_fast_on_a_refused_key_or_no_gateway() -> None:
    client = _client(lambda request: httpx.Response(401))
    with pytest.raises(RequestFailed, match="API key"):
        await client.start()
    await client.aclose()

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    client = _client(down)
    with pytest.raises(RequestFailed, match="unreachable"):
        await client.start()
    await client.aclose()
