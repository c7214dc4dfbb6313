"""Majority vote over real GSM8K solutions through a live gateway's /v1/rewards.

    python bench/gsm8k_rewards.py --url http://127.0.0.1:8080 --model NAME \\
        [--selection majority_vote] [--delimiter "\\n"] [--limit N] [--out PATH]

    # or let the script start a gateway with one reward model (a PRM or an outcome RM):
    python bench/gsm8k_rewards.py --serve NAME=PATH [--kind causal_prm] ...

Every problem of example_model_solutions.jsonl goes to POST /v1/rewards as one
request (its four model-written solutions as `candidates`, split into steps on
the model's delimiter by the gateway) with `selection`. The selected answer is
judged against the reference answer; the report puts it next to each single
model's accuracy, the oracle (any solution right), the plain count
(`vote_locally` with equal rewards) and `vote_locally` with the rewards the
gateway returned (which the gateway's own selection must equal, problem by
problem: ties are broken by the summed reward, then by order).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from gsm8k import MODELS, Problem, is_right, load_gsm8k_candidates, vote_locally

from bon_gateway.engine.answers import answers_equivalent, extract_answer
from bon_gateway.engine.selection import group_by_answer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gsm8k_rewards.md"


@dataclass(slots=True)
class Report:
    problems: int = 0
    single_right: collections.Counter[str] = field(default_factory=collections.Counter)
    oracle_right: int = 0
    gateway_right: int = 0
    plain_count_right: int = 0
    local_same_rewards_right: int = 0
    agree_with_local: int = 0
    disagreements: list[int] = field(default_factory=list)
    untied: int = 0  # problems whose plain count has a single most frequent answer
    untied_same_answer: int = 0  # ... where the gateway picked that answer
    seconds: float = 0.0


async def score_problem(
    client: httpx.AsyncClient, url: str, model: str, problem: Problem, selection: str
) -> dict[str, object]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": problem.question}],
        "candidates": problem.texts,
        "selection": selection,
    }
    for attempt in range(5):
        reply = await client.post(f"{url}/v1/rewards", json=body)
        if reply.status_code == 429 and attempt < 4:  # overloaded: back off and retry
            await asyncio.sleep(0.2 * 2**attempt)
            continue
        reply.raise_for_status()
        data: dict[str, object] = reply.json()
        return data
    raise RuntimeError("unreachable")


async def run(url: str, model: str, problems: list[Problem], selection: str, concurrency: int) -> Report:
    report = Report(problems=len(problems))
    gate = asyncio.Semaphore(concurrency)
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(problem: Problem) -> tuple[Problem, dict[str, object]]:
            async with gate:
                return problem, await score_problem(client, url, model, problem, selection)

        done = 0
        for next_done in asyncio.as_completed([one(p) for p in problems]):
            problem, body = await next_done
            done += 1
            if done % 100 == 0:
                print(f"{done}/{len(problems)} problems", file=sys.stderr)
            rewards = [float(item["reward"]) for item in body["data"]]  # type: ignore[index, union-attr]
            selected = body.get("selected_answer")
            right = is_right(selected if isinstance(selected, str) else None, problem)
            report.gateway_right += right
            local = vote_locally(problem, selection, rewards)  # type: ignore[arg-type]
            report.local_same_rewards_right += is_right(local.selected_answer, problem)
            if local.selected.index == body["selected_index"]:
                report.agree_with_local += 1
            else:
                report.disagreements.append(problem.index)
            plain = vote_locally(problem, "majority_vote")
            report.plain_count_right += is_right(plain.selected_answer, problem)
            sizes = sorted((len(g) for g in group_by_answer(plain.ranked)), reverse=True)
            if sizes and (len(sizes) == 1 or sizes[0] > sizes[1]):
                # A strict plurality: rewards cannot change a majority vote's answer here.
                report.untied += 1
                chosen = selected if isinstance(selected, str) else None
                report.untied_same_answer += answers_equivalent(chosen, plain.selected_answer)
            any_right = False
            for solution in problem.solutions:
                ok = is_right(extract_answer(solution.text), problem)
                report.single_right[solution.model] += ok
                any_right = any_right or ok
            report.oracle_right += any_right
    report.seconds = time.perf_counter() - started
    return report


def table(report: Report, *, model: str, selection: str) -> str:
    n = report.problems

    def pct(k: int) -> str:
        return f"{100 * k / n:.1f} % ({k}/{n})"

    rows = [f"| {m} (single model) | {pct(report.single_right[m])} |" for m in MODELS]
    rows += [
        f"| oracle (any solution right) | {pct(report.oracle_right)} |",
        f"| plain count (majority_vote, equal rewards) | {pct(report.plain_count_right)} |",
        f"| {selection} through /v1/rewards ({model}) | {pct(report.gateway_right)} |",
        f"| {selection} in process, same rewards | {pct(report.local_same_rewards_right)} |",
    ]
    return "\n".join(
        [
            f"# GSM8K: {selection} through /v1/rewards",
            "",
            f"{n} problems, 4 solutions each; reward model `{model}`; {report.seconds:.1f} s.",
            "",
            "| selection | accuracy |",
            "|---|---|",
            *rows,
            "",
            f"Gateway selection equal to the in-process selection with the returned rewards: "
            f"{report.agree_with_local}/{n}"
            + (f" (differs on problems {report.disagreements[:20]})" if report.disagreements else ""),
            "",
            f"Problems where the plain count has a single most frequent answer: {report.untied}; "
            f"the gateway picked that answer on {report.untied_same_answer} of them "
            "(elsewhere ties are broken by the summed reward, then by order).",
            "",
        ]
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(
    name: str, path: str, kind: str, delimiter: str, extra: dict[str, object] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`bon-gateway serve` with one reward model, on free loopback ports (`extra`: more
    fields of its model entry, e.g. activation, as a config file would give them)."""
    http_port = free_port()
    config = {
        "server": {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": free_port(),
            "log_level": "WARNING",
        },
        "generator": {"url": "http://127.0.0.1:9/v1", "model": "none"},  # no generation here
        "reward_models": [
            {**(extra or {}), "name": name, "path": path, "kind": kind, "steps": {"delimiter": delimiter}}
        ],
    }
    config_file = Path(tempfile.mkdtemp()) / "gateway.toml"
    config_file.write_text(_toml(config), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config_file)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise TimeoutError("the gateway did not become ready")


def _toml(data: dict[str, dict[str, object] | list[dict[str, object]]]) -> str:
    """Just enough TOML for the config above (tables, an array of tables, one nested table)."""
    lines: list[str] = []
    for section, value in data.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            lines.append(f"[[{section}]]" if isinstance(value, list) else f"[{section}]")
            nested = []
            for key, v in item.items():
                if isinstance(v, dict):
                    nested.append((key, v))
                else:
                    lines.append(f"{key} = {json.dumps(v)}")
            for key, table_ in nested:
                lines.append(f"[{section}.{key}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in table_.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running gateway, e.g. http://127.0.0.1:8080")
    parser.add_argument("--model", help="the reward model name on that gateway")
    parser.add_argument("--serve", metavar="NAME=PATH", help="start a gateway with this reward model")
    parser.add_argument("--kind", default="auto", choices=["auto", "judge", "causal_prm"])
    parser.add_argument(
        "--delimiter", default="\n", help="step delimiter when serving (GSM8K: one step a line)"
    )
    parser.add_argument(
        "--selection", default="majority_vote", choices=["majority_vote", "weighted_vote", "argmax"]
    )
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    proc = None
    if args.serve:
        name, path = args.serve.split("=", 1)
        proc, url = start_gateway(name, path, args.kind, args.delimiter)
        model = name
    elif args.url and args.model:
        url, model = args.url.rstrip("/"), args.model
    else:
        parser.error("give --url and --model, or --serve NAME=PATH")
    try:
        problems = load_gsm8k_candidates(args.data)[: args.limit]
        report = asyncio.run(run(url, model, problems, args.selection, args.concurrency))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    text = table(report, model=model, selection=args.selection)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
