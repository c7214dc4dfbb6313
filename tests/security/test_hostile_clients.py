"""Clients without a key that send slowly, nothing, or too much (issue 13, findings 1-3),
against the real gateway on loopback, with raw sockets: a slow body holds no in-flight
slot and is cut at body_timeout_s; silent and slow heads are closed at header_timeout_s
and give way past max_connections; a head over max_header_bytes is a 431 before
authentication. Every socket is closed; counts and waits are bounded."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config
from tests.security.conftest import KEYS, REWARDS, auth_config

pytestmark = pytest.mark.integration

USER = {"role": "user", "content": "Capital of France?"}
SLOW_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n{"
)


@contextlib.contextmanager
def raw_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connected sockets to 127.0.0.1:port, connected in order, all closed after."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def read_until_closed(sock: socket.socket, timeout_s: float) -> tuple[bytes, bool]:
    """What the server sends until it closes the connection (True), or until `timeout_s`
    passes with the connection still open (False). A reset counts as closed."""
    received = b""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received, True
        if not chunk:
            return received, True
        received += chunk
    return received, False


def closed_within(sock: socket.socket, timeout_s: float) -> bool:
    return read_until_closed(sock, timeout_s)[1]


def _value(metric: object) -> float:
    return float(metric._value.get())  # type: ignore[attr-defined]


def in_flight(served: ServedGateway, api: str) -> float:
    return _value(served.metrics.child(served.metrics.requests_in_flight, api))


def answered(served: ServedGateway, api: str, status: str) -> float:
    return _value(served.metrics.child(served.metrics.requests, api, status))


def closes(served: ServedGateway, reason: str) -> float:
    return _value(served.metrics.child(served.metrics.http_connections_closed, reason))


def wait_for(condition: object, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


# -- 1. slow bodies -------------------------------------------------------------------------


def test_slow_bodies_hold_no_in_flight_slot_and_are_cut_at_body_timeout(upstream: FakeUpstream) -> None:
    # Four senders stuck one byte into a 1,000-byte body, twice max_in_flight: they used
    # to hold every slot (HTTP 429, gRPC RESOURCE_EXHAUSTED) for as long as they stayed.
    config = gateway_config(upstream.url, limits={"max_in_flight": 2, "body_timeout_s": 2})
    with ServedGateway(config, FakeScorer(REWARDS)) as served, raw_sockets(served.http_port, 4) as slow:
        for sock in slow:
            sock.sendall(SLOW_HEAD)
        # All four have reached the guard: inside (the metrics layer counts them before the
        # guard runs) or already shed.
        assert wait_for(
            lambda: in_flight(served, "chat_completions") + answered(served, "chat_completions", "429") == 4
        )
        body = {"messages": [USER], "best_of": 2, "seed": 0}
        response = httpx.post(served.http_url + "/v1/chat/completions", json=body, timeout=10)
        assert response.status_code == 200, response.text
        with grpc.insecure_channel(served.grpc_target) as channel:
            reply = pb_grpc.BestOfNStub(channel).Generate(pb.GenerateRequest(prompt="p"), timeout=10)
        assert reply.candidates
        # Past body_timeout_s each is answered 408 and closed, and gives back everything.
        for sock in slow:
            answer, closed = read_until_closed(sock, 15)
            assert closed and answer.startswith(b"HTTP/1.1 408 "), answer[:200]
            assert b"server.limits.body_timeout_s" in answer
        assert wait_for(lambda: in_flight(served, "chat_completions") == 0)
        assert closes(served, "body_timeout") == 4


def test_a_body_that_completes_in_time_is_served(upstream: FakeUpstream) -> None:
    config = gateway_config(upstream.url, limits={"body_timeout_s": 10})
    raw = httpx.Request("POST", "http://x/", json={"messages": [USER], "best_of": 2, "seed": 0}).content
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: " + str(len(raw)).encode() + b"\r\n\r\n"
    )
    with ServedGateway(config, FakeScorer(REWARDS)) as served, raw_sockets(served.http_port, 1) as (sock,):
        sock.sendall(head)
        for start in range(0, len(raw), 16):  # the body in small pieces
            sock.sendall(raw[start : start + 16])
        answer, closed = read_until_closed(sock, 15)
    assert closed and answer.startswith(b"HTTP/1.1 200 "), answer[:200]


# -- 2. silent connections and slow heads --------------------------------------------------


def test_past_max_connections_the_oldest_silent_ones_give_way_and_health_answers(
    upstream: FakeUpstream,
) -> None:
    # 40 silent sockets over a table of 20 (a long header timeout: only the bound acts).
    config = gateway_config(upstream.url, limits={"max_connections": 20, "header_timeout_s": 300})
    with ServedGateway(config, FakeScorer(REWARDS)) as served, raw_sockets(served.http_port, 40) as silent:
        health = httpx.get(served.http_url + "/health", timeout=10)
        assert health.status_code == 200
        # The oldest were closed to make room, the newest are still open.
        assert all(closed_within(sock, 10) for sock in silent[:20])
        assert not any(closed_within(sock, 0.05) for sock in silent[-10:])
        assert closes(served, "evicted") >= 20
        open_connections = served.metrics.registry.get_sample_value("bon_http_connections_open")
        assert open_connections is not None and 0 < open_connections <= 20
        # A key holder's request on a fresh connection is served too.
        body = {"messages": [USER], "best_of": 2, "seed": 0}
        assert httpx.post(served.http_url + "/v1/chat/completions", json=body, timeout=10).status_code == 200


def test_silent_and_slow_heads_are_closed_at_header_timeout(upstream: FakeUpstream) -> None:
    config = gateway_config(upstream.url, limits={"header_timeout_s": 1})
    with ServedGateway(config, FakeScorer(REWARDS)) as served, raw_sockets(served.http_port, 2) as socks:
        silent, slow = socks
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n")  # and never the blank line
        assert closed_within(silent, 15)
        answer, closed = read_until_closed(slow, 15)
        assert closed and answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        # A keep-alive connection gets the same bound for its next request's head.
        with raw_sockets(served.http_port, 1) as (kept,):
            kept.sendall(b"GET /health HTTP/1.1\r\nHost: gateway\r\n\r\n")
            first = kept.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            kept.sendall(b"GET /health HTTP/1.1\r\n")
            answer, closed = read_until_closed(kept, 15)
            assert closed and answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert closes(served, "header_timeout") == 3


# -- 3. header size -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(upstream: FakeUpstream, keys_file: Path) -> Iterator[ServedGateway]:
    """Keys on, the default max_header_bytes (64 KiB)."""
    config = gateway_config(upstream.url, auth=auth_config(keys_file))
    with ServedGateway(config, FakeScorer(REWARDS)) as served:
        yield served


def send_head(sock: socket.socket, head: bytes) -> bytes:
    """Send `head` in 64 KiB pieces, stopping once the server answers or hangs up; then
    what it answered before it closed (or in 15 s)."""
    for start in range(0, len(head), 65536):
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            break
        try:
            sock.sendall(head[start : start + 65536])
        except OSError:  # reset or broken pipe: the server stopped reading
            break
    return read_until_closed(sock, 15)[0]


def test_an_8_mb_header_line_is_431_before_authentication(keyed: ServedGateway) -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * (8 << 20) + b"\r\n\r\n"
    with raw_sockets(keyed.http_port, 1) as (sock,):
        answer = send_head(sock, head)
    # 431, not the 401 of a request without a key: the head never became a request.
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"server.limits.max_header_bytes" in answer
    assert closes(keyed, "header_too_large") >= 1


def test_a_head_over_the_bound_in_one_piece_is_431(keyed: ServedGateway) -> None:
    head = b"GET /health HTTP/1.1\r\nHost: gateway\r\nX-Big: " + b"a" * (65 << 10) + b"\r\n\r\n"
    with raw_sockets(keyed.http_port, 1) as (sock,):
        sock.sendall(head)  # one read on the server side, most likely
        answer, closed = read_until_closed(sock, 15)
    assert closed and answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_unfinished_huge_heads_are_cut_at_the_bound_and_connections_closed(keyed: ServedGateway) -> None:
    # Four heads that never end: each is refused once 64 KiB are in, so the gateway never
    # holds more than that of any of them (they used to be buffered for ever).
    with raw_sockets(keyed.http_port, 4) as socks:
        for sock in socks:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\nX-Big: ")
        for sock in socks:
            answer = send_head(sock, b"b" * (1 << 20))
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def test_heads_under_the_bound_are_served_whole_split_or_pipelined(keyed: ServedGateway) -> None:
    authorization = b"Authorization: Bearer " + KEYS[0].encode() + b"\r\n"
    big = b"X-Big: " + b"c" * (60 << 10) + b"\r\n"  # 60 KiB: under the 64 KiB bound
    request = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n" + authorization + big + b"\r\n"
    with raw_sockets(keyed.http_port, 2) as (split, pipelined):
        for start in range(0, len(request), 1000):
            split.sendall(request[start : start + 1000])
        answer = split.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        last = b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n"
        pipelined.sendall(request + request + last)
        answers, closed = read_until_closed(pipelined, 15)
        assert closed and answers.count(b"HTTP/1.1 200 ") == 3, answers[:300]
