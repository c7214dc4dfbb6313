"""A fault-injecting OpenAI-compatible upstream for bench/soak.py.

Plain asyncio HTTP/1.1 (keep-alive, Content-Length bodies) rather than a web
framework, because one of its faults is a TCP reset mid-request, which ASGI
servers do not let an app produce.

A call with seed s answers TEXTS[s % len(TEXTS)], so the soak can check every
reply. With probability --fault-rate a call instead gets one of, equally:
  error   - HTTP 500 with an OpenAI error body
  timeout - an answer only after --stall-s (longer than the gateway's timeout)
  reset   - the connection is reset (RST) without an answer
GET /stats returns the counts as JSON.

    python bench/fault_upstream.py --port 8001 --fault-rate 0.1 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import struct
import time
from collections import Counter
from typing import Any

TEXTS = (
    "Paris.",
    "The capital of France is Paris.",
    "London.",
    "I am not sure.",
    "It is Paris, on the Seine.",
    "Lyon is the capital.",
    "Paris has been the capital since 987.",
    "Marseille.",
)
FAULTS = ("error", "timeout", "reset")


class FaultUpstream:
    def __init__(self, fault_rate: float, stall_s: float, seed: int) -> None:
        self.fault_rate = fault_rate
        self.stall_s = stall_s
        self.rng = random.Random(seed)
        self.stats: Counter[str] = Counter()

    def pick_fault(self) -> str | None:
        if self.rng.random() >= self.fault_rate:
            return None
        return self.rng.choice(FAULTS)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, body = request
                if method == "GET" and path == "/stats":
                    await _respond(writer, 200, dict(self.stats))
                    continue
                if method != "POST" or not path.endswith("completions"):
                    await _respond(writer, 404, {"error": {"message": "not found"}})
                    continue
                self.stats["calls"] += 1
                fault = self.pick_fault()
                if fault is not None:
                    self.stats[fault] += 1
                if fault == "reset":
                    _reset(writer)
                    return
                if fault == "error":
                    await _respond(writer, 500, {"error": {"message": "injected", "type": "server_error"}})
                    continue
                if fault == "timeout":
                    await asyncio.sleep(self.stall_s)
                await _respond(writer, 200, _answer(path, body))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER with a zero timeout turns close() into a TCP RST.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _answer(path: str, body: dict[str, Any]) -> dict[str, Any]:
    seed = int(body.get("seed") or 0)
    text = TEXTS[seed % len(TEXTS)]
    usage = {
        "prompt_tokens": 8,
        "completion_tokens": len(text.split()),
        "total_tokens": 8 + len(text.split()),
    }
    if path.endswith("chat/completions"):
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}
        obj = "text_completion"
    return {
        "id": "soak",
        "object": obj,
        "created": int(time.time()),
        "model": body.get("model", "soak"),
        "choices": [choice],
        "usage": usage,
    }


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, Any]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    raw = await reader.readexactly(length) if length else b""
    body = json.loads(raw) if raw else {}
    return method, path, body if isinstance(body, dict) else {}


async def _respond(writer: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}[status]
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: keep-alive\r\n\r\n".encode()
        + data
    )
    await writer.drain()


async def serve(port: int, fault_rate: float, stall_s: float, seed: int) -> None:
    upstream = FaultUpstream(fault_rate, stall_s, seed)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fault-rate", type=float, default=0.10)
    parser.add_argument("--stall-s", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.fault_rate, args.stall_s, args.seed))


if __name__ == "__main__":
    main()
